"""GPT-2 (`GPT2LMHeadModel`) beyond the tiny families' parity matrix (tests/e2e/test_parity.py, which has it):
the original hub checkpoints' layout (no `transformer.` prefix, `attn.bias` mask buffers) loads to the same
tokens, `scale_attn_weights` false matches transformers, the learned positions cap max_model_len, and what
weir does not serve (a per-layer softmax scale, quantized weights, cross-attention) is refused at start; PEFT
adapters on its Conv1D projections give PEFT's tokens."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from engine import LLM, LoRARequest, SamplingParams
from engine.errors import LoRAAdapterError
from tests.e2e.test_parity import _prompts, hf_greedy
from tests.peft_adapters import assert_engine_matches_peft, random_peft_adapter
from tests.tiny_models import copy_with_config

PARAMS = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)


def _tokens(model_dir: Path, prompts: list[list[int]], **kw: object) -> list[list[int]]:
    outs = LLM(str(model_dir), device="cpu", dtype="float32", **kw).generate(prompts, PARAMS, use_tqdm=False)
    return [o.outputs[0].token_ids for o in outs]


def test_hub_layout_without_the_prefix_loads(tiny_model_dirs: dict[str, Path], tmp_path: Path) -> None:
    """gpt2's own model.safetensors names `h.0.attn.c_attn.weight`, `wte.weight` (a GPT2Model's) and holds
    each layer's causal-mask buffers `attn.bias` / `attn.masked_bias`: weir reads it as save_pretrained's."""
    src = tiny_model_dirs["gpt2"]
    dst = copy_with_config(src, tmp_path / "hub")
    tensors = load_file(str(src / "model.safetensors"))
    assert "transformer.h.0.attn.c_attn.weight" in tensors and "lm_head.weight" not in tensors
    hub = {k.removeprefix("transformer."): v for k, v in tensors.items()}
    for i in range(2):
        hub[f"h.{i}.attn.bias"] = torch.tril(torch.ones(1, 1, 256, 256))
        hub[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    save_file(hub, str(dst / "model.safetensors"), metadata={"format": "pt"})
    prompts = _prompts()[:3]
    expected, _ = hf_greedy(src, _prompts())
    assert _tokens(dst, prompts) == expected[:3]


def test_unscaled_attention_matches_transformers(tiny_model_dirs: dict[str, Path], tmp_path: Path) -> None:
    """`scale_attn_weights` false: the softmax scale 1, not head_dim ** -0.5; transformers' tokens, which differ
    from the scaled model's."""
    dst = copy_with_config(tiny_model_dirs["gpt2"], tmp_path / "unscaled", scale_attn_weights=False)
    prompts = _prompts()[:3]
    expected, _ = hf_greedy(dst, _prompts())
    scaled, _ = hf_greedy(tiny_model_dirs["gpt2"], _prompts())
    assert expected[:3] != scaled[:3]
    assert _tokens(dst, prompts) == expected[:3]


def test_max_model_len_is_capped_by_the_learned_positions(tiny_model_dirs: dict[str, Path]) -> None:
    llm = LLM(str(tiny_model_dirs["gpt2"]), device="cpu", dtype="float32")
    assert llm.llm_engine.config.model.max_model_len == 256  # n_positions
    with pytest.raises(
        ValueError, match=r"max_model_len \(257\) is larger than the model's max_position_embeddings \(256\)"
    ):
        LLM(str(tiny_model_dirs["gpt2"]), device="cpu", dtype="float32", max_model_len=257)


@pytest.mark.parametrize(
    ("config", "kw", "message"),
    [
        (
            {"scale_attn_by_inverse_layer_idx": True},
            {},
            "unsupported scale_attn_by_inverse_layer_idx true in .*config.json for GPT2LMHeadModel: weir serves "
            "GPT-2 and GPT-J decoders with one softmax scale and no cross-attention",
        ),
        ({"add_cross_attention": True}, {}, "unsupported add_cross_attention true in .*config.json"),
        (
            {},
            {"quantization": "fp8"},
            r"quantization 'fp8' \(.*online.*\) is not supported for GPT2LMHeadModel: its Conv1D weights "
            r"are stored \[in, out\] and transposed at load, which only float weights take",
        ),
        (
            {"activation_function": "swish"},
            {},
            "unsupported activation_function 'swish' in .*; only 'gelu_new'",
        ),
    ],
)
def test_unsupported_settings_are_refused(
    tiny_model_dirs: dict[str, Path], tmp_path: Path, config: dict, kw: dict, message: str
) -> None:
    dst = copy_with_config(tiny_model_dirs["gpt2"], tmp_path / "m", **config)
    with pytest.raises(ValueError, match=message):
        LLM(str(dst), device="cpu", dtype="float32", **kw)


def test_peft_adapter_on_its_conv1d_layers_matches_peft(
    tiny_model_dirs: dict[str, Path], tmp_path: Path
) -> None:
    """PEFT adapts GPT-2's Conv1D projections with `fan_in_fan_out` (saved in the config; A and B keep
    their usual [r, in] / [out, r]): on c_attn whole (B's rows q, k, v), attn.c_proj, mlp.c_fc and
    mlp.c_proj, weir gives PEFT's tokens; the same config on a model with Linear weights is refused."""
    model_dir = tiny_model_dirs["gpt2"]
    adapter = random_peft_adapter(model_dir, tmp_path / "a", ["c_attn", "c_proj", "c_fc"])
    assert json.loads((adapter / "adapter_config.json").read_text())["fan_in_fan_out"] is True
    prompts = _prompts()[:3]
    assert_engine_matches_peft(model_dir, adapter, prompts)

    llama_adapter = random_peft_adapter(tiny_model_dirs["llama"], tmp_path / "l", ["q_proj"])
    cfg = json.loads((llama_adapter / "adapter_config.json").read_text())
    (llama_adapter / "adapter_config.json").write_text(json.dumps({**cfg, "fan_in_fan_out": True}))
    llama = LLM(
        str(tiny_model_dirs["llama"]), device="cpu", dtype="float32", enable_lora=True, max_lora_rank=8
    )
    with pytest.raises(LoRAAdapterError, match="fan_in_fan_out.*not supported for this model"):
        llama.generate(
            prompts[:1], PARAMS, use_tqdm=False, lora_request=LoRARequest("l", 2, str(llama_adapter))
        )


def test_starcoder_multi_query_adapter_and_refusals(tiny_model_dirs: dict[str, Path], tmp_path: Path) -> None:
    """GPTBigCode (StarCoder): one K/V head in its fused c_attn ([q | k | v]); a PEFT adapter on its Linear
    c_attn, c_proj and c_fc (no fan_in_fan_out) gives PEFT's tokens; multi_query false (c_attn's rows per
    head) and quantized weights are refused at start."""
    model_dir = tiny_model_dirs["gpt_bigcode"]
    tensors = load_file(str(model_dir / "model.safetensors"))
    assert tuple(tensors["transformer.h.0.attn.c_attn.weight"].shape) == (64 + 2 * 16, 64)  # q, one k, one v
    adapter = random_peft_adapter(model_dir, tmp_path / "a", ["c_attn", "c_proj", "c_fc"])
    assert not json.loads((adapter / "adapter_config.json").read_text())["fan_in_fan_out"]
    assert_engine_matches_peft(model_dir, adapter, _prompts()[:3])
    dst = copy_with_config(model_dir, tmp_path / "mha", multi_query=False)
    with pytest.raises(
        ValueError, match=r"unsupported multi_query false in .*config.json for GPTBigCodeForCausalLM"
    ):
        LLM(str(dst), device="cpu", dtype="float32")
    with pytest.raises(ValueError, match=r"weir serves float GPTBigCodeForCausalLM checkpoints only"):
        LLM(str(model_dir), device="cpu", dtype="float32", quantization="fp8")
