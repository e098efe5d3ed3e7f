"""Engine features crossed with the newer families, each against transformers: n samples sharing a
partial prompt block (copy-on-write fork) on a windowed and a MoE model, beam search past the window
and through the experts, prompt logprobs under Gemma 2's final softcap and MoE routing, and the FP8
KV cache on a softcapped and a windowed model (the FP8 KV tests' bound)."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from engine import LLM, BeamSearchParams, SamplingParams
from tests.tiny_models import hf_causal_lm

_rng = random.Random(3)
PROMPT = [_rng.randrange(3, 500) for _ in range(13)]  # a partial second block of 8: forked, then copied
LONG = [_rng.randrange(3, 500) for _ in range(37)]  # past every tiny window (8-12)


def _hf(model_dir: Path):
    return hf_causal_lm(str(model_dir), dtype=torch.float32).eval()


def _hf_logprobs(hf, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return torch.log_softmax(hf(torch.tensor([ids])).logits[0].float(), dim=-1)  # [len(ids), vocab]


@pytest.mark.parametrize("family", ["mistral_window", "qwen3_moe"])
def test_n_samples_and_beams_match_transformers(tiny_model_dirs: dict[str, Path], family: str) -> None:
    """n=3 sampled completions (each token's logprob as transformers scores that sequence, so a
    forked block copied wrong shows) and beam search of width 3 past the window, token for token."""
    hf = _hf(tiny_model_dirs[family])
    llm = LLM(str(tiny_model_dirs[family]), device="cpu", dtype="float32", block_size=8)
    params = SamplingParams(n=3, temperature=1.0, seed=5, max_tokens=16, ignore_eos=True, logprobs=0)
    (out,) = llm.generate([PROMPT], params, use_tqdm=False)
    assert len({tuple(c.token_ids) for c in out.outputs}) == 3
    for sample in out.outputs:
        expected = _hf_logprobs(hf, PROMPT + sample.token_ids)
        for i, (pos, tok) in enumerate(zip(sample.logprobs, sample.token_ids, strict=True)):
            assert pos[tok].logprob == pytest.approx(expected[len(PROMPT) - 1 + i, tok].item(), abs=1e-4)

    beams = hf.generate(
        torch.tensor([PROMPT]), num_beams=3, num_return_sequences=3, do_sample=False, max_new_tokens=10,
        eos_token_id=None, pad_token_id=0, early_stopping=False, length_penalty=1.0,
    )  # fmt: skip
    (result,) = llm.beam_search([PROMPT], BeamSearchParams(beam_width=3, max_tokens=10, ignore_eos=True))
    assert [s.tokens[len(PROMPT) :] for s in result.sequences] == [b[len(PROMPT) :].tolist() for b in beams]
    llm.shutdown()


@pytest.mark.parametrize("family", ["gemma2", "qwen2_moe"])
def test_prompt_logprobs_match_transformers(tiny_model_dirs: dict[str, Path], family: str) -> None:
    expected = _hf_logprobs(_hf(tiny_model_dirs[family]), LONG)
    llm = LLM(
        str(tiny_model_dirs[family]), device="cpu", dtype="float32", max_num_batched_tokens=8, block_size=8
    )
    (out,) = llm.generate([LONG], SamplingParams(max_tokens=1, prompt_logprobs=2), use_tqdm=False)
    for pos in range(1, len(LONG)):
        entry = out.prompt_logprobs[pos]
        assert entry[LONG[pos]].logprob == pytest.approx(expected[pos - 1, LONG[pos]].item(), abs=1e-4)
        assert list(entry)[:2] == torch.topk(expected[pos - 1], 2).indices.tolist()
    llm.shutdown()


@pytest.mark.parametrize("family", ["gemma2", "mistral_window"])
def test_fp8_kv_cache_stays_within_the_fp8_bound(tiny_model_dirs: dict[str, Path], family: str) -> None:
    """Teacher-forced log p past the window: the fp8 cache moves it by <= 0.06 on average and <= 1.0
    at most from the float32 cache (tests/engine/quantization/fp8_kv_agreement.py), and by something."""
    scored = {}
    for kv_cache_dtype in ("auto", "fp8"):
        llm = LLM(
            str(tiny_model_dirs[family]),
            device="cpu",
            dtype="float32",
            kv_cache_dtype=kv_cache_dtype,
            block_size=8,
        )
        (out,) = llm.generate([LONG], SamplingParams(max_tokens=1, prompt_logprobs=0), use_tqdm=False)
        scored[kv_cache_dtype] = [out.prompt_logprobs[p][LONG[p]].logprob for p in range(1, len(LONG))]
        llm.shutdown()
    drift = [abs(a - b) for a, b in zip(scored["auto"], scored["fp8"], strict=True)]
    assert 0 < sum(drift) / len(drift) <= 0.06 and max(drift) <= 1.0
