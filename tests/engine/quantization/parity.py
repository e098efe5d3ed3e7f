"""Greedy parity of a quantized checkpoint in weir against transformers on its dequantized float32
reference, under the settings of tests/e2e/test_parity.py (default, chunked prefill, preemption)."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine import LLM
from tests.e2e.test_parity import _greedy, _prompts, hf_greedy

SETTINGS = {
    "default": {},
    # A 7-token budget splits every prompt but the shortest over several steps, mixed with decodes.
    "chunked_prefill": {"max_num_batched_tokens": 7},
    # 60 tokens (40 + 20) need 8 blocks of 8; the batch needs ~20: 9 blocks force preemption.
    "preemption": {"block_size": 8, "num_kv_blocks": 9, "admission_reserve_tokens": 0},
}


def assert_parity(quantized: Path, reference: Path, setting: str, method: str, **options: object) -> None:
    prompts = _prompts()
    expected, expected_lp = hf_greedy(reference, prompts)
    llm = LLM(str(quantized), device="cpu", dtype="float32", **SETTINGS[setting], **options)
    assert llm.llm_engine.config.quant.method == method
    outs = llm.generate(prompts, _greedy(logprobs=0), use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == expected
    for out, exp_lp in zip(outs, expected_lp, strict=True):
        got = out.outputs[0]
        assert got.logprobs is not None
        got_lp = [pos[tok].logprob for pos, tok in zip(got.logprobs, got.token_ids, strict=True)]
        assert got_lp == pytest.approx(exp_lp, abs=1e-4)
    if setting == "preemption":
        assert llm.llm_engine.stats().num_preemptions > 0
    llm.shutdown()
