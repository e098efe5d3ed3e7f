"""Phi-3 beyond the parity tests every family gets (tests/e2e/test_parity.py): pre-fused qkv_proj /
gate_up_proj tensors sliced per tensor-parallel rank section by section, longrope's short and long
factors on both sides of weir's once-per-engine switch against transformers, PEFT adapters on the
fused projections against PEFT, Phi-3-mini-4k's window and the config errors."""

from __future__ import annotations

import json
import logging
import math
import random
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import Phi3Config

from engine import LLM, LoRARequest, SamplingParams
from engine.errors import LoRAAdapterError
from engine.model.build_context import BuildContext
from engine.model.layers.rotary import build_cos_sin_cache
from engine.model.models.llama import LlamaForCausalLM
from engine.model.weight_loader import load_weights
from engine.model_config import ModelConfig
from tests.tiny_models import build_model, hf_causal_lm, longrope_parameters

ORIGINAL = 32  # original_max_position_embeddings of the switch model: small, so a test crosses it
MAX_POSITIONS = 128


@pytest.fixture(scope="module")
def longrope_dir(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer_dir: Path) -> Path:
    """Phi-4-mini's shape at toy size: 3/4 of each 16-dim head rotates, longrope over a pretraining
    length of 32 extended to 128 (attention factor from their ratio, as Phi-3 configs leave it)."""
    path = tmp_path_factory.mktemp("phi3") / "longrope"
    rope = longrope_parameters(12, ORIGINAL, partial_rotary_factor=0.75)
    return build_model(
        "phi3",
        path,
        tiny_tokenizer_dir,
        max_position_embeddings=MAX_POSITIONS,
        original_max_position_embeddings=ORIGINAL,
        rope_parameters=rope,
    )


def _hf_greedy(model_dir: Path, prompt: list[int], max_tokens: int) -> list[int]:
    model = hf_causal_lm(str(model_dir), dtype=torch.float32).eval()
    return _hf_greedy_model(model, prompt, max_tokens)


def _greedy(max_tokens: int) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)


def _prompt(n: int, seed: int = 0) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, 500) for _ in range(n)]


# ---------------------------------------------------------------------------------- longrope
def _hf_cos_sin(hf_config: Phi3Config, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    from transformers.models.phi3.modeling_phi3 import Phi3RotaryEmbedding

    rope = Phi3RotaryEmbedding(hf_config)
    cos, sin = rope(torch.zeros(1, dtype=torch.float32), torch.arange(seq_len)[None])
    return cos[0], sin[0]  # [seq_len, rotary_dim] each: both halves the same


@pytest.mark.parametrize("max_model_len", [ORIGINAL, MAX_POSITIONS])
def test_longrope_cache_matches_transformers_on_its_side(longrope_dir: Path, max_model_len: int) -> None:
    config = ModelConfig.from_pretrained(longrope_dir, max_model_len=max_model_len, device="cpu")
    scaling = config.rope_scaling
    assert config.rotary_dim == 12 and scaling is not None
    assert scaling["use_long_factor"] is (max_model_len > ORIGINAL)
    assert scaling["attention_factor"] == pytest.approx(math.sqrt(1 + math.log(128 / 32) / math.log(32)))
    ours = build_cos_sin_cache(config.rotary_dim, max_model_len, config.rope_theta, scaling)
    assert ours.shape == (max_model_len, 12)
    # transformers picks the factors from the longest position in the call: the whole table at once.
    cos, sin = _hf_cos_sin(Phi3Config.from_pretrained(str(longrope_dir)), max_model_len)
    assert torch.equal(ours[:, :6], cos[:, :6]) and torch.equal(ours[:, 6:], sin[:, :6])


def test_longrope_short_factors_when_max_model_len_fits_the_original(longrope_dir: Path, caplog) -> None:
    # 12 + 20 = 32 tokens: transformers never passes original_max_position_embeddings, so it uses the
    # short factors throughout, and so does an engine capped at that length.
    prompt = _prompt(12)
    expected = _hf_greedy(longrope_dir, prompt, 20)
    with caplog.at_level(logging.INFO, logger="weir.engine"):
        llm = LLM(str(longrope_dir), device="cpu", dtype="float32", max_model_len=ORIGINAL)
    assert "longrope: short factors for every request" in caplog.text
    (out,) = llm.generate([prompt], _greedy(20), use_tqdm=False)
    assert out.outputs[0].token_ids == expected


def test_longrope_long_factors_when_max_model_len_exceeds_the_original(longrope_dir: Path) -> None:
    # A 40-token prompt is already past 32: transformers uses the long factors from its first
    # forward, as does an engine whose max_model_len (128) is past 32, for every request.
    prompt = _prompt(40, seed=1)
    expected = _hf_greedy(longrope_dir, prompt, 16)
    llm = LLM(str(longrope_dir), device="cpu", dtype="float32", max_num_batched_tokens=16)
    (out,) = llm.generate([prompt], _greedy(16), use_tqdm=False)  # chunked: 16 + 16 + 8
    assert out.outputs[0].token_ids == expected
    # A short prompt on this engine still gets the long factors (weir does not recompute at the
    # crossing as transformers does): its first token's logprob is not the short engine's.
    short = LLM(str(longrope_dir), device="cpu", dtype="float32", max_model_len=ORIGINAL)
    params = SamplingParams(temperature=0.0, max_tokens=1, logprobs=0)
    (a,) = llm.generate([_prompt(8)], params, use_tqdm=False)
    (b,) = short.generate([_prompt(8)], params, use_tqdm=False)
    lp_long = a.outputs[0].logprobs[0][a.outputs[0].token_ids[0]].logprob
    lp_short = b.outputs[0].logprobs[0][b.outputs[0].token_ids[0]].logprob
    assert abs(lp_long - lp_short) > 1e-3


# ---------------------------------------------------------------------------------- tensor parallel
@pytest.mark.parametrize("num_kv_heads", [2, 1])
@pytest.mark.parametrize("rank", [0, 1])
def test_fused_checkpoint_tensors_split_per_rank_section(
    tmp_path: Path, tiny_tokenizer_dir: Path, rank: int, num_kv_heads: int
) -> None:
    # Each rank takes its query heads, its KV heads (or the one replicated), its half of gate and
    # its half of up: not a contiguous slice of the fused tensor.
    model_dir = build_model("phi3", tmp_path / "phi3", tiny_tokenizer_dir, num_key_value_heads=num_kv_heads)
    config = ModelConfig.from_pretrained(str(model_dir), dtype="float32", device="cpu")
    model = LlamaForCausalLM(config, BuildContext(tp_rank=rank, tp_size=2))
    load_weights(model, model_dir)
    full = load_file(str(model_dir / "model.safetensors"))
    qkv = full["model.layers.1.self_attn.qkv_proj.weight"]  # [(4 + 2 * kv) * 16, 64]
    q, k, v = qkv.split([64, num_kv_heads * 16, num_kv_heads * 16])
    kv_rows = slice(rank * 16, (rank + 1) * 16) if num_kv_heads == 2 else slice(0, 16)
    layer = model.model.layers[1]
    expected = torch.cat([q[rank * 32 : (rank + 1) * 32], k[kv_rows], v[kv_rows]])
    assert torch.equal(layer.self_attn.qkv_proj.weight, expected)
    gate, up = full["model.layers.1.mlp.gate_up_proj.weight"].chunk(2)  # [128, 64] each
    expected = torch.cat([gate[rank * 64 : (rank + 1) * 64], up[rank * 64 : (rank + 1) * 64]])
    assert torch.equal(layer.mlp.gate_up_proj.weight, expected)
    o = full["model.layers.1.self_attn.o_proj.weight"]  # [64, 64]
    assert torch.equal(layer.self_attn.o_proj.weight, o[:, rank * 32 : (rank + 1) * 32])


# ---------------------------------------------------------------------------------- config
_PHI3 = {
    "architectures": ["Phi3ForCausalLM"],
    "hidden_size": 64,
    "num_attention_heads": 4,
    "num_hidden_layers": 2,
    "intermediate_size": 128,
    "vocab_size": 512,
    "max_position_embeddings": 4096,
    "original_max_position_embeddings": 4096,
}


def test_phi3_mini_4k_window_is_every_layers_and_leaves_max_model_len(caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="weir.engine"):
        config = ModelConfig.from_dicts("phi-3-mini-4k", {**_PHI3, "sliding_window": 2047}, device="cpu")
    assert config.max_model_len == 4096 and config.sliding_window == 2047
    assert [config.layer_window(i) for i in range(2)] == [2047, 2047]
    assert "capping" not in caplog.text
    assert (config.rotary_dim, config.rope_scaling) == (16, None)


def test_phi3_legacy_su_rope_and_errors() -> None:
    # transformers < 5 format: rope_scaling with type "su", partial_rotary_factor at the top level.
    legacy = {
        **_PHI3,
        "max_position_embeddings": 131072,
        "partial_rotary_factor": 0.5,
        "rope_scaling": {"type": "su", "short_factor": [1.0] * 4, "long_factor": [2.0] * 4},
    }
    config = ModelConfig.from_dicts("phi", legacy, device="cpu")
    assert config.rotary_dim == 8 and config.max_model_len == 131072
    assert config.rope_scaling is not None and config.rope_scaling["rope_type"] == "longrope"
    assert config.rope_scaling["use_long_factor"] is True
    assert config.rope_scaling["attention_factor"] == pytest.approx(math.sqrt(1 + 5 / 12))  # ln 32 / ln 4096
    capped = ModelConfig.from_dicts("phi", legacy, max_model_len=4096, device="cpu").rope_scaling
    assert capped is not None and capped["use_long_factor"] is False

    bad = {
        **legacy,
        "rope_scaling": {"type": "longrope", "short_factor": [1.0] * 3, "long_factor": [2.0] * 4},
    }
    with pytest.raises(ValueError, match=r"short_factor must be a list of rotary_dim / 2 = 4 numbers; got 3"):
        ModelConfig.from_dicts("phi", bad, device="cpu")
    with pytest.raises(ValueError, match=r"rope scaling 'longrope' in phi is missing 'long_factor'"):
        ModelConfig.from_dicts("phi", {**legacy, "rope_scaling": {"type": "su", "short_factor": [1.0] * 4}})
    with pytest.raises(
        ValueError, match=r"partial_rotary_factor 0.1 in phi gives rotary_dim 1 for head_dim 16"
    ):
        ModelConfig.from_dicts("phi", {**_PHI3, "partial_rotary_factor": 0.1}, device="cpu")


# ---------------------------------------------------------------------------------- LoRA
# PEFT adapts Phi-3's fused projections whole: one A for q, k and v, B's rows split among them.
PHI3_ADAPTERS = {  # name -> (rank, lora_alpha, target_modules, use_rslora)
    "r4-qkv": (4, 8, ["qkv_proj"], False),
    "r8-all": (8, 16, ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"], True),
}


def test_peft_adapters_on_fused_projections_match_peft(
    tiny_model_dirs: dict[str, Path], tmp_path: Path
) -> None:
    from peft import LoraConfig, PeftModel, get_peft_model

    model_dir = tiny_model_dirs["phi3_partial"]
    requests = {}
    for i, (name, (rank, alpha, targets, rslora)) in enumerate(PHI3_ADAPTERS.items()):
        base = hf_causal_lm(str(model_dir), dtype=torch.float32)
        peft_model = get_peft_model(
            base, LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, use_rslora=rslora)
        )
        gen = torch.Generator().manual_seed(200 + i)
        with torch.no_grad():
            for pname, p in peft_model.named_parameters():
                if "lora_" in pname:
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.15)
        peft_model.save_pretrained(str(tmp_path / name))
        requests[name] = LoRARequest(name, i + 1, str(tmp_path / name))

    prompts = [_prompt(n, seed=n) for n in (6, 19, 11)]
    adapters = [None, "r4-qkv", "r8-all"]
    expected = []
    for prompt, adapter in zip(prompts, adapters, strict=True):
        base = hf_causal_lm(str(model_dir), dtype=torch.float32)
        model = base if adapter is None else PeftModel.from_pretrained(base, requests[adapter].lora_path)
        expected.append(_hf_greedy_model(model.eval(), prompt, 8))
    # each adapter changes the output: the test would catch one not applied
    assert expected[1] != _hf_greedy(model_dir, prompts[1], 8)
    assert expected[2] != _hf_greedy(model_dir, prompts[2], 8)

    llm = LLM(str(model_dir), device="cpu", dtype="float32", enable_lora=True, max_loras=2)
    loras = [requests[a] if a else None for a in adapters]
    outs = llm.generate(prompts, _greedy(8), use_tqdm=False, lora_request=loras)
    assert [o.outputs[0].token_ids for o in outs] == expected

    # An adapter naming the split projections of a Llama checkpoint does not fit Phi-3's modules.
    bad = tmp_path / "split-names"
    shutil.copytree(tmp_path / "r4-qkv", bad)
    config = json.loads((bad / "adapter_config.json").read_text())
    (bad / "adapter_config.json").write_text(json.dumps({**config, "target_modules": ["q_proj", "v_proj"]}))
    with pytest.raises(
        LoRAAdapterError,
        match=r"'q_proj' is not supported \(supported: down_proj, gate_up_proj, o_proj, qkv_proj\)",
    ):
        llm.generate(prompts[:1], _greedy(1), use_tqdm=False, lora_request=LoRARequest("split", 9, str(bad)))


def _hf_greedy_model(model: torch.nn.Module, prompt: list[int], max_tokens: int) -> list[int]:
    out = model.generate(
        torch.tensor([prompt]), max_new_tokens=max_tokens, do_sample=False, eos_token_id=None, pad_token_id=0
    )
    return out[0, len(prompt) :].tolist()
