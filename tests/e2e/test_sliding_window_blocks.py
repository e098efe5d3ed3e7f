"""A model windowed on every layer holds only the KV blocks its window reaches
(engine/core/sliding_window.py), and its output stays transformers' token for token: sequences many
windows long under default settings, chunked prefill, preemption, prefix caching, forks (n > 1) and
beam search; a sequence longer than the whole KV cache; the blocks held while it decodes, exactly; all
of them back after finish and abort. The tiny models' windows: Mistral 10, Phi-3 11 (blocks of 8)."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from engine import LLM, BeamSearchParams, SamplingParams
from tests.tiny_models import WINDOWS, build_model, hf_causal_lm

_rng = random.Random(7)
PROMPTS = [[_rng.randrange(3, 500) for _ in range(n)] for n in (5, 23, 41)]
MAX_TOKENS = 60  # every sequence ends 6-10 windows past its start
BS = 8


def _hf(model_dir: Path):
    return hf_causal_lm(str(model_dir), dtype=torch.float32).eval()


def _hf_greedy(hf, prompts: list[list[int]], max_tokens: int = MAX_TOKENS) -> list[list[int]]:
    out = []
    for prompt in prompts:
        seq = hf.generate(
            torch.tensor([prompt]),
            max_new_tokens=max_tokens,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )
        out.append(seq[0, len(prompt) :].tolist())
    return out


def _greedy(max_tokens: int = MAX_TOKENS) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)


def _assert_all_blocks_free(llm: LLM) -> None:
    engine = llm.llm_engine
    assert not engine.has_unfinished_requests()
    assert engine.stats().kv_cache_usage == 0.0
    kv = engine.scheduler.kv_cache_manager
    assert kv.num_free_blocks == kv.num_blocks


@pytest.fixture(scope="module")
def phi3_window_dir(tiny_tokenizer_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_model("phi3_window", tmp_path_factory.mktemp("phi3w") / "m", tiny_tokenizer_dir)


@pytest.fixture(scope="module")
def expected(tiny_model_dirs: dict[str, Path], phi3_window_dir: Path) -> dict[str, list[list[int]]]:
    dirs = {"mistral_window": tiny_model_dirs["mistral_window"], "phi3_window": phi3_window_dir}
    return {family: _hf_greedy(_hf(d), PROMPTS) for family, d in dirs.items()}


def _dir(family: str, tiny_model_dirs: dict[str, Path], phi3_window_dir: Path) -> Path:
    return phi3_window_dir if family == "phi3_window" else tiny_model_dirs[family]


# name -> LLM options: default settings (one chunk per prompt); chunked prefill (chunks of 7 whose
# first query sits mid-window); a cache of 6 blocks (48 tokens) for 3 sequences of up to 101 tokens:
# each holds at most cdiv(W - 1 + 16, 8) + 1 = 5 blocks, 2 or 3 while it decodes, so they preempt each
# other, yet the context is not capped to the cache.
SETTINGS = {
    "default": dict(block_size=BS),
    "chunked": dict(block_size=BS, max_num_batched_tokens=7),
    "preemption": dict(block_size=BS, num_kv_blocks=6, max_num_batched_tokens=16, admission_reserve_tokens=0),
}


@pytest.mark.parametrize("setting", SETTINGS)
@pytest.mark.parametrize("family", ["mistral_window", "phi3_window"])
def test_greedy_parity_past_the_window(
    tiny_model_dirs: dict[str, Path], phi3_window_dir: Path, expected: dict, family: str, setting: str
) -> None:
    llm = LLM(
        str(_dir(family, tiny_model_dirs, phi3_window_dir)),
        device="cpu",
        dtype="float32",
        **SETTINGS[setting],
    )
    assert llm.llm_engine.scheduler.kv_cache_manager.sliding_window == WINDOWS[family]
    outs = llm.generate(PROMPTS, _greedy(), use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == expected[family]
    if setting == "preemption":
        assert llm.llm_engine.stats().num_preemptions > 0
        assert llm.llm_engine.max_model_len == 256  # not capped to the cache's 48 tokens
    _assert_all_blocks_free(llm)
    llm.shutdown()


def test_prefix_hits_need_only_the_window(tiny_model_dirs: dict[str, Path], expected: dict) -> None:
    """A second run of the same prompts hits the cache (the blocks its windows need), and a prompt
    whose early blocks were evicted still hits: only its window's blocks must be cached."""
    llm = LLM(str(tiny_model_dirs["mistral_window"]), device="cpu", dtype="float32", block_size=BS)
    first = llm.generate(PROMPTS, _greedy(), use_tqdm=False)
    second = llm.generate(PROMPTS, _greedy(), use_tqdm=False)
    assert [o.outputs[0].token_ids for o in first] == expected["mistral_window"]
    assert [o.outputs[0].token_ids for o in second] == expected["mistral_window"]
    assert [o.num_cached_tokens for o in second] == [0, 16, 40]  # full blocks short of the last token

    # Evict the longest prompt's first three blocks, as if reused; its last two (the window of
    # position 40 reaches back to 31) stay cached. A leading-run lookup would find nothing now.
    kv = llm.llm_engine.scheduler.kv_cache_manager
    pool = kv.block_pool
    for block_hash in _block_hashes(kv, PROMPTS[2])[:3]:
        pool.uncache_blocks((pool.get_cached_block(block_hash),))
    (third,) = llm.generate([PROMPTS[2]], _greedy(), use_tqdm=False)
    assert third.outputs[0].token_ids == expected["mistral_window"][2]
    assert third.num_cached_tokens == 40
    _assert_all_blocks_free(llm)
    llm.shutdown()


def _block_hashes(kv, prompt: list[int]) -> list[bytes]:
    from engine.core.request import Request

    probe = Request("probe", list(prompt), SamplingParams())
    kv.update_block_hashes(probe)
    return probe.block_hashes


def test_a_sequence_longer_than_the_whole_cache(tiny_model_dirs: dict[str, Path]) -> None:
    """6 blocks (48 tokens) serve a 41 + 150 token sequence: it holds at most cdiv(9 + 16, 8) + 1 = 5."""
    model_dir = tiny_model_dirs["mistral_window"]
    (want,) = _hf_greedy(_hf(model_dir), PROMPTS[2:], max_tokens=150)
    llm = LLM(
        str(model_dir),
        device="cpu",
        dtype="float32",
        block_size=BS,
        num_kv_blocks=6,
        max_num_batched_tokens=16,
    )
    (out,) = llm.generate([PROMPTS[2]], _greedy(150), use_tqdm=False)
    assert out.outputs[0].token_ids == want
    _assert_all_blocks_free(llm)
    llm.shutdown()


def test_blocks_held_while_decoding_are_the_windows(tiny_model_dirs: dict[str, Path]) -> None:
    """Step by step (no async scheduling), the blocks in use are exactly those holding keys
    c - W + 1 .. c of the position c just computed, as kv_cache_usage reports; abort returns them all."""
    window = WINDOWS["mistral_window"]
    llm = LLM(
        str(tiny_model_dirs["mistral_window"]),
        device="cpu",
        dtype="float32",
        block_size=BS,
        num_kv_blocks=32,
        async_scheduling=False,
        enable_prefix_caching=False,
    )
    engine = llm.llm_engine
    engine.add_request("long", PROMPTS[2], _greedy(100))
    engine.step()
    assert round(engine.stats().kv_cache_usage * 32) == 6  # the 41-token prompt, computed in one chunk
    held = []
    for _ in range(80):
        engine.step()
        (req,) = engine.scheduler.running.values()
        c = req.num_computed_tokens - 1  # the last position computed
        want = c // BS - max(c - window + 1, 0) // BS + 1
        usage = engine.stats().kv_cache_usage
        held.append(round(usage * 32))
        assert held[-1] == want, (c, held)
    assert max(held) == 3 and min(held) == 2  # 10 keys span 2 or 3 blocks of 8
    engine.abort_request("long")
    _assert_all_blocks_free(llm)
    llm.shutdown()


# The first sample of an n=3 request computes the 37- or 41-token prompt in chunks of 16 (blocks 0, 1
# released at the chunk from 32), then decodes position 37 / 41 (blocks 0-2 / 0-3 released) before the
# others start at position 36 / 40, whose windows reach back to 27 / 31 (block 3): of 37 tokens they
# fork the first's blocks (null entries and all); of 41 it no longer holds block 3, so they take their
# prompts from the prefix cache instead (the hits a user sees in the metrics).
@pytest.mark.parametrize(("prompt_len", "forks"), [(37, True), (41, False)])
def test_n_samples_past_the_window(tiny_model_dirs: dict[str, Path], prompt_len: int, forks: bool) -> None:
    """Each token's logprob as transformers scores that sample's sequence: a block shared or copied
    wrong, or released too early, shows."""
    model_dir = tiny_model_dirs["mistral_window"]
    hf = _hf(model_dir)
    prompt = [random.Random(prompt_len).randrange(3, 500) for _ in range(prompt_len)]
    llm = LLM(str(model_dir), device="cpu", dtype="float32", block_size=BS, max_num_batched_tokens=16)
    params = SamplingParams(n=3, temperature=1.0, seed=5, max_tokens=40, ignore_eos=True, logprobs=0)
    (out,) = llm.generate([prompt], params, use_tqdm=False)
    assert (llm.llm_engine.stats().prefix_cache_hits == 0) == forks
    assert len({tuple(c.token_ids) for c in out.outputs}) == 3
    for sample in out.outputs:
        with torch.no_grad():
            logits = hf(torch.tensor([prompt + sample.token_ids])).logits[0]
        expected = torch.log_softmax(logits.float(), dim=-1)
        for i, (pos, tok) in enumerate(zip(sample.logprobs, sample.token_ids, strict=True)):
            assert pos[tok].logprob == pytest.approx(expected[len(prompt) - 1 + i, tok].item(), abs=1e-4)
    _assert_all_blocks_free(llm)
    llm.shutdown()


@pytest.mark.parametrize("device_ranking", [True, False], ids=["device-ranked", "host-ranked"])
def test_beam_search_past_the_window(tiny_model_dirs: dict[str, Path], device_ranking: bool) -> None:
    """Width 3 over a 41-token prompt prefilled in chunks of 16 (blocks 0, 1 released before the beams
    start), token for token with transformers."""
    model_dir = tiny_model_dirs["mistral_window"]
    prompt = PROMPTS[2]
    beams = _hf(model_dir).generate(
        torch.tensor([prompt]), num_beams=3, num_return_sequences=3, do_sample=False, max_new_tokens=30,
        eos_token_id=None, pad_token_id=0, early_stopping=False, length_penalty=1.0,
    )  # fmt: skip
    llm = LLM(
        str(model_dir), device="cpu", dtype="float32", block_size=BS, max_num_batched_tokens=16,
        beam_device_ranking=device_ranking,
    )  # fmt: skip
    (result,) = llm.beam_search([prompt], BeamSearchParams(beam_width=3, max_tokens=30, ignore_eos=True))
    assert [s.tokens[len(prompt) :] for s in result.sequences] == [b[len(prompt) :].tolist() for b in beams]
    _assert_all_blocks_free(llm)
    llm.shutdown()
