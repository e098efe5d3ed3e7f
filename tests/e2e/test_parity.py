"""Greedy token-for-token parity with transformers' generate(), for every family, while each engine
feature is exercised: default settings, chunked prefill, preemption, prefix caching.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from engine import LLM, SamplingParams
from tests.tiny_models import FAMILIES, OTHER_FAMILIES, build_model, hf_causal_lm, preemption_cache

MAX_TOKENS = 20
PROMPT_LENGTHS = (5, 17, 33, 40)


def _prompts(seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 500) for _ in range(n)] for n in PROMPT_LENGTHS]


_HF_CACHE: dict[tuple[str, int], tuple[list[list[int]], list[list[float]]]] = {}


def hf_greedy(model_dir: Path, prompts: list[list[int]], max_tokens: int = MAX_TOKENS, seed: int = 0):
    """transformers generate(), greedy, EOS ignored; returns (token ids, logprobs of those tokens)."""
    key = (str(model_dir), seed)
    if key in _HF_CACHE:
        return _HF_CACHE[key]
    model = hf_causal_lm(str(model_dir), dtype=torch.float32)
    model.eval()
    all_tokens, all_logprobs = [], []
    for prompt in prompts:
        ids = torch.tensor([prompt])
        out = model.generate(
            ids,
            max_new_tokens=max_tokens,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
            output_logits=True,
            return_dict_in_generate=True,
        )
        tokens = out.sequences[0, len(prompt) :].tolist()
        logprobs = [
            torch.log_softmax(step_logits[0].float(), dim=-1)[tok].item()
            for step_logits, tok in zip(out.logits, tokens, strict=True)
        ]
        all_tokens.append(tokens)
        all_logprobs.append(logprobs)
    _HF_CACHE[key] = (all_tokens, all_logprobs)
    return _HF_CACHE[key]


def _greedy(logprobs: int | None = None) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True, logprobs=logprobs)


def _assert_all_blocks_free(llm: LLM) -> None:
    engine = llm.llm_engine
    assert not engine.has_unfinished_requests()
    assert engine.scheduler.kv_cache_usage == 0.0
    assert engine.stats().num_running == 0


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_parity_default(tiny_model_dirs: dict[str, Path], family: str) -> None:
    model_dir = tiny_model_dirs[family]
    prompts = _prompts()
    expected, expected_lp = hf_greedy(model_dir, prompts)
    llm = LLM(str(model_dir), device="cpu", dtype="float32")
    outs = llm.generate(prompts, _greedy(logprobs=0), use_tqdm=False)
    for out, exp, exp_lp in zip(outs, expected, expected_lp, strict=True):
        got = out.outputs[0]
        assert got.token_ids == exp
        assert got.finish_reason == "length"
        assert got.logprobs is not None
        got_lp = [pos[tok].logprob for pos, tok in zip(got.logprobs, got.token_ids, strict=True)]
        assert got_lp == pytest.approx(exp_lp, abs=1e-4)
    _assert_all_blocks_free(llm)


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_parity_chunked_prefill(tiny_model_dirs: dict[str, Path], family: str) -> None:
    model_dir = tiny_model_dirs[family]
    prompts = _prompts()
    expected, _ = hf_greedy(model_dir, prompts)
    # A 7-token budget splits every prompt but the shortest over several steps, mixed with decodes.
    llm = LLM(str(model_dir), device="cpu", dtype="float32", max_num_batched_tokens=7)
    outs = llm.generate(prompts, _greedy(), use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == expected
    _assert_all_blocks_free(llm)


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_parity_under_preemption(tiny_model_dirs: dict[str, Path], family: str) -> None:
    model_dir = tiny_model_dirs[family]
    prompts = _prompts()
    expected, _ = hf_greedy(model_dir, prompts)
    llm = LLM(str(model_dir), device="cpu", dtype="float32", **preemption_cache(family))
    outs = llm.generate(prompts, _greedy(), use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == expected
    assert llm.llm_engine.stats().num_preemptions > 0
    _assert_all_blocks_free(llm)


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_parity_with_prefix_cache_hits(tiny_model_dirs: dict[str, Path], family: str) -> None:
    model_dir = tiny_model_dirs[family]
    rng = random.Random(1)
    shared = [rng.randrange(3, 500) for _ in range(35)]
    prompts = [shared + [rng.randrange(3, 500) for _ in range(k)] for k in (1, 6, 13)]
    expected, _ = hf_greedy(model_dir, prompts, seed=1)
    llm = LLM(str(model_dir), device="cpu", dtype="float32", block_size=8)
    first = llm.generate(prompts, _greedy(), use_tqdm=False)
    hits_before = llm.llm_engine.stats().prefix_cache_hits
    second = llm.generate(prompts, _greedy(), use_tqdm=False)
    assert [o.outputs[0].token_ids for o in first] == expected
    assert [o.outputs[0].token_ids for o in second] == expected
    assert llm.llm_engine.stats().prefix_cache_hits > hits_before
    assert all(o.num_cached_tokens >= 32 for o in second)
    _assert_all_blocks_free(llm)


@pytest.mark.parametrize("family", OTHER_FAMILIES)
def test_greedy_parity_chunked_prefill_other_families(
    tiny_tokenizer_dir: Path, tmp_path: Path, family: str
) -> None:
    """One run each, not the whole matrix: Gemma 1 (Gemma 2's layers without the window, the softcaps
    and the post-norms), Qwen2 with the window on its upper layers only (max_window_layers), Qwen2-MoE
    with transformers' own layout of its windowed layers, and Phi-3 with a window on every layer."""
    model_dir = build_model(family, tmp_path / family, tiny_tokenizer_dir)
    prompts = _prompts()
    expected, expected_lp = hf_greedy(model_dir, prompts)
    llm = LLM(str(model_dir), device="cpu", dtype="float32", max_num_batched_tokens=7, block_size=8)
    outs = llm.generate(prompts, _greedy(logprobs=0), use_tqdm=False)
    for out, exp, exp_lp in zip(outs, expected, expected_lp, strict=True):
        got = out.outputs[0]
        assert got.token_ids == exp
        got_lp = [pos[tok].logprob for pos, tok in zip(got.logprobs or [], got.token_ids, strict=True)]
        assert got_lp == pytest.approx(exp_lp, abs=1e-4)
    _assert_all_blocks_free(llm)


def test_prompt_logprobs_match_transformers(tiny_model_dirs: dict[str, Path]) -> None:
    model_dir = tiny_model_dirs["qwen2"]
    prompt = _prompts()[2]
    model = hf_causal_lm(str(model_dir), dtype=torch.float32)
    with torch.no_grad():
        logits = model(torch.tensor([prompt])).logits[0]
    expected = torch.log_softmax(logits.float(), dim=-1)
    # Chunked prefill: prompt positions arrive over several steps and are stitched together.
    llm = LLM(str(model_dir), device="cpu", dtype="float32", max_num_batched_tokens=8)
    (out,) = llm.generate([prompt], SamplingParams(max_tokens=1, prompt_logprobs=2), use_tqdm=False)
    assert out.prompt_logprobs is not None
    assert len(out.prompt_logprobs) == len(prompt)
    assert out.prompt_logprobs[0] is None
    for pos in range(1, len(prompt)):
        entry = out.prompt_logprobs[pos]
        assert entry is not None
        actual = prompt[pos]
        assert entry[actual].logprob == pytest.approx(expected[pos - 1, actual].item(), abs=1e-4)
        top2 = torch.topk(expected[pos - 1], 2).indices.tolist()
        assert list(entry)[:2] == top2
        assert [entry[t].rank for t in top2] == [1, 2]
