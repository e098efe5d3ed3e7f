"""GPT-NeoX beyond the tiny family's parity matrix (tests/e2e/test_parity.py runs the parallel-residual
layout of Pythia): the sequential residual (`use_parallel_residual` false) with the config's own rope key
names (`rotary_emb_base`, `rotary_pct`), the per-head q/k/v order of `query_key_value` (shown to matter),
and the two refusals: a quantized checkpoint at start, and an adapter on the fused `query_key_value`
(whose B rows come in the per-head order), each naming what is refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from engine import LLM, LoRARequest, SamplingParams
from engine.errors import LoRAAdapterError
from tests.e2e.test_parity import _prompts, hf_greedy
from tests.tiny_models import build_model, hf_causal_lm


def _greedy() -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True, logprobs=0)


def test_sequential_residual_and_legacy_rope_keys_match_transformers(
    tiny_tokenizer_dir: Path, tmp_path: Path
) -> None:
    model_dir = build_model(
        "gpt_neox",
        tmp_path / "neox_seq",
        tiny_tokenizer_dir,
        seed=3,
        config_overrides={"use_parallel_residual": False},
    )
    cfg = json.loads((model_dir / "config.json").read_text())
    rope = cfg.pop("rope_parameters")  # the older configs' spelling: top-level rotary_emb_base and rotary_pct
    cfg["rotary_emb_base"], cfg["rotary_pct"] = (
        500.0,
        0.5,
    )  # a base and a rotated share that differ from the defaults
    assert rope["rope_theta"] == 10000.0
    (model_dir / "config.json").write_text(json.dumps(cfg))
    hf = hf_causal_lm(str(model_dir), dtype=torch.float32)
    assert (hf.config.rope_parameters["rope_theta"], hf.config.rope_parameters["partial_rotary_factor"]) == (
        500.0,
        0.5,
    )
    assert hf.config.use_parallel_residual is False
    prompts = _prompts()
    expected, expected_lp = hf_greedy(model_dir, prompts)
    llm = LLM(str(model_dir), device="cpu", dtype="float32", max_num_batched_tokens=16)
    outs = llm.generate(prompts, _greedy(), use_tqdm=False)
    for out, exp, exp_lp in zip(outs, expected, expected_lp, strict=True):
        assert out.outputs[0].token_ids == exp
        got = out.outputs[0]
        got_lp = [pos[tok].logprob for pos, tok in zip(got.logprobs, got.token_ids, strict=True)]
        assert got_lp == pytest.approx(exp_lp, abs=1e-4)


def test_query_key_value_is_read_per_head(tiny_model_dirs: dict[str, Path], tmp_path: Path) -> None:
    """The checkpoint's fused rows reordered to [q | k | v] as if they were already in that order (no
    per-head reordering) give other tokens: the reordering is what the parity matrix's match rests on."""
    src = tiny_model_dirs["gpt_neox"]
    dst = tmp_path / "neox_flat"
    dst.mkdir()
    for f in src.iterdir():
        if f.suffix != ".safetensors":
            (dst / f.name).write_bytes(f.read_bytes())
    state = load_file(str(next(src.glob("*.safetensors"))))
    heads, d = 4, 16
    for name in [n for n in state if "query_key_value" in n]:
        t = state[
            name
        ]  # the per-head order [heads, 3, d, ...] -> [3, heads, d, ...]: what weir's loader undoes
        state[name] = t.reshape(heads, 3, d, *t.shape[1:]).transpose(0, 1).reshape(t.shape).contiguous()
    save_file(state, str(dst / "model.safetensors"))
    prompts = _prompts()[:4]
    expected, _ = hf_greedy(src, _prompts())
    outs = LLM(str(dst), device="cpu", dtype="float32").generate(prompts, _greedy(), use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] != expected[:4]


def test_quantized_gpt_neox_is_refused_at_start(tiny_model_dirs: dict[str, Path], tmp_path: Path) -> None:
    from tests.engine.quantization.checkpoints import FORMATS

    _, writer = FORMATS["gptq-4-g32"]
    quantized, _ = writer(tiny_model_dirs["gpt_neox"], tmp_path)
    with pytest.raises(ValueError) as err:
        LLM(str(quantized), device="cpu", dtype="float32")
    assert (
        "is not supported for GPTNeoXForCausalLM: its fused query_key_value rows are reordered per head"
        in str(err.value)
    )


def test_adapter_on_query_key_value_is_refused_naming_it(
    tiny_model_dirs: dict[str, Path], tmp_path: Path
) -> None:
    from peft import LoraConfig, get_peft_model

    model_dir = tiny_model_dirs["gpt_neox"]
    peft = get_peft_model(
        hf_causal_lm(str(model_dir), dtype=torch.float32),
        LoraConfig(r=4, lora_alpha=8, target_modules=["query_key_value"], lora_dropout=0.0),
    )
    peft.save_pretrained(str(tmp_path / "qkv"))
    llm = LLM(str(model_dir), device="cpu", dtype="float32", enable_lora=True, max_lora_rank=8)
    with pytest.raises(LoRAAdapterError) as err:
        llm.generate(
            _prompts()[:1],
            _greedy(),
            lora_request=LoRARequest("qkv", 1, str(tmp_path / "qkv")),
            use_tqdm=False,
        )
    message = str(err.value)
    assert "query_key_value" in message
    assert "supported: dense, dense_4h_to_h, dense_h_to_4h" in message
