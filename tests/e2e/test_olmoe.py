"""OLMoE (`OlmoeForCausalLM`) beyond the tiny families' parity matrix (tests/e2e/test_parity.py, which has it):
its q/k/v clamp after the cross-head q/k norms bites on the tiny model (without it the tokens change), an
adapter on its attention projections gives PEFT's tokens, and tensor parallelism is refused at start."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine import LLM, SamplingParams
from tests.e2e.test_parity import _prompts, hf_greedy
from tests.peft_adapters import assert_engine_matches_peft, random_peft_adapter
from tests.tiny_models import copy_with_config

PARAMS = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)


def test_clip_qkv_changes_the_tokens(tiny_model_dirs: dict[str, Path], tmp_path: Path) -> None:
    """The tiny OLMoE's clip_qkv (1.5) against |q| and |v| of up to ~4.6 and ~2.5: served without it, the
    tokens leave transformers' (with it), so the parity matrix's equality rests on the clamp."""
    model_dir = tiny_model_dirs["olmoe"]
    prompts = _prompts()[:4]
    expected, _ = hf_greedy(model_dir, _prompts())
    unclipped = copy_with_config(model_dir, tmp_path / "unclipped", clip_qkv=None)
    outs = LLM(str(unclipped), device="cpu", dtype="float32").generate(prompts, PARAMS, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] != expected[:4]


def test_attention_adapter_matches_peft(tiny_model_dirs: dict[str, Path], tmp_path: Path) -> None:
    """An adapter on q/k/v/o: the q/k norms over every head and the clamp come after the adapted
    projections, as in PEFT's model (the experts take no adapters: tests/engine/test_moe.py)."""
    model_dir = tiny_model_dirs["olmoe"]
    adapter = random_peft_adapter(model_dir, tmp_path / "attn", ["q_proj", "k_proj", "v_proj", "o_proj"])
    assert_engine_matches_peft(model_dir, adapter, _prompts()[:3])


def test_tensor_parallel_is_refused(tiny_model_dirs: dict[str, Path]) -> None:
    with pytest.raises(ValueError) as err:
        LLM(str(tiny_model_dirs["olmoe"]), device="cpu", dtype="float32", tensor_parallel_size=2)
    assert str(err.value) == (
        "tensor_parallel_size 2 is not supported for OlmoeForCausalLM: its q/k RMSNorms span every "
        "attention head; serve it with tensor_parallel_size 1"
    )
