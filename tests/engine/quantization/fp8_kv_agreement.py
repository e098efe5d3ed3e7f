"""How far an fp8 KV cache moves the embedded default model from a float32 cache, and the bound
test_fp8_kv_cache.py and test_fp8_kv_per_head.py both assert: teacher-forced log p of 127 held-out
tokens moves by at most 0.06 on average and 1.0 at most (and by something: the cache really is fp8);
greedy, >= 4 of 5 prompts keep their 16 tokens, every prompt its first 5, and the tokens before a
divergence stay within 0.3 in log p."""

from __future__ import annotations

from pathlib import Path

from engine import LLM, SamplingParams
from engine.inputs.tokenizer import load_tokenizer

DEFAULT_MODEL = Path(__file__).resolve().parents[3] / "engine" / "default_model"
PROMPTS = [
    "The json module",
    "Return a new dictionary",
    "If the argument is a string,",
    "This function raises ValueError when",
    "Create a new path object",
]
Generated = list[tuple[list[int], list[float]]]  # per prompt: greedy token ids, their log p


def held_out_window() -> list[int]:
    """128 tokens of text the default model never saw (tools.quant_accuracy.held_out_text)."""
    from tools.quant_accuracy import held_out_text

    return load_tokenizer(str(DEFAULT_MODEL)).encode(held_out_text())[:128]


def score_and_generate(
    model_dir: Path, kv_cache_dtype: str, window: list[int], generate: bool = True
) -> tuple[list[float], Generated]:
    """(log p of each window token after the first, teacher-forced; PROMPTS' greedy 16 tokens with
    their log p, or [] without `generate`), on CPU in float32 with the given cache dtype."""
    llm = LLM(
        str(model_dir), device="cpu", dtype="float32", kv_cache_dtype=kv_cache_dtype, cpu_kv_cache_gb=0.05
    )
    (out,) = llm.generate([window], SamplingParams(max_tokens=1, prompt_logprobs=0), use_tqdm=False)
    scored = [out.prompt_logprobs[p][window[p]].logprob for p in range(1, len(window))]
    generated: Generated = []
    if generate:
        greedy = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True, logprobs=0)
        generated = [
            (o.outputs[0].token_ids, [lp[t].logprob for lp, t in zip(o.outputs[0].logprobs, o.outputs[0].token_ids, strict=True)])
            for o in llm.generate(PROMPTS, greedy, use_tqdm=False)
        ]  # fmt: skip
    llm.shutdown()
    return scored, generated


def mean_drift(reference: list[float], scored: list[float]) -> float:
    return sum(abs(a - b) for a, b in zip(reference, scored, strict=True)) / len(reference)


def assert_close_to_float32_cache(
    reference: tuple[list[float], Generated], fp8: tuple[list[float], Generated]
) -> None:
    """The module docstring's bound, fp8 run against the float32-cache run."""
    drift = [abs(a - b) for a, b in zip(reference[0], fp8[0], strict=True)]
    assert sum(drift) / len(drift) <= 0.06 and max(drift) <= 1.0
    assert sum(drift) > 0  # the cache really is fp8
    identical = 0
    for (ref_ids, ref_lp), (ids8, lp8) in zip(reference[1], fp8[1], strict=True):
        first = next((i for i, (a, b) in enumerate(zip(ref_ids, ids8, strict=True)) if a != b), len(ref_ids))
        identical += first == len(ref_ids)
        assert first >= 5
        assert max(abs(a - b) for a, b in zip(ref_lp[:first], lp8[:first], strict=True)) <= 0.3
    assert identical >= 4
