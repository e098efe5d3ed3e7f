"""Whole prompts attended apart from the rest of the step (WEIR_FLASH_PREFILL, ops/flash_prefill.py).

On CUDA the backend hands a step's tail of whole prompts (no cached context) to torch's flash
attention and the rows before it to the paged kernel. Flash does not run on CPU; here the backend is
given the path's spec, ops.reference.varlen_causal_attention, so what is tested is everything around
the kernel: which rows take which path (engine/worker/fresh_prompts.py), the split of the step's
metadata between the two, rotary and the KV store done apart, and greedy tokens equal to
transformers' under chunked prefill, prefix-cache hits and decodes in the same steps.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch

import ops
from engine.core.sampling_params import SamplingParams
from engine.llm import LLM
from engine.worker.fresh_prompts import fresh_prompt_tail
from ops import reference
from ops.flash_prefill import flash_prefill_unsupported
from tests.tiny_models import WINDOWS, hf_causal_lm


def _tail(q_lens: list[int], seq_lens: list[int]):
    qsl = np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32)
    return fresh_prompt_tail(np.asarray(seq_lens, dtype=np.int32), qsl)


def test_the_tail_is_the_last_run_of_prompts_with_no_cached_context() -> None:
    # two decodes, a later chunk (context 40 before its 16), then three whole prompts
    t = _tail([1, 1, 16, 7, 30, 5], [50, 9, 56, 7, 30, 5])
    assert t is not None
    assert (t.seq_start, t.token_start, t.num_tokens, t.max_len) == (3, 18, 42, 30)
    assert (t.head_max_query_len, t.head_max_seq_len) == (16, 56)
    # the tail's cumulative lengths from 0, from the step's on the device
    qsl = torch.tensor([0, 1, 2, 18, 25, 55, 60], dtype=torch.int32)
    assert t.cu_seqlens(qsl).tolist() == [0, 7, 37, 42]


def test_a_step_of_whole_prompts_is_all_tail() -> None:
    t = _tail([4, 9], [4, 9])
    assert t is not None
    assert (t.seq_start, t.token_start, t.num_tokens, t.max_len, t.head_max_query_len) == (0, 0, 13, 9, 0)


def test_a_prefix_hit_or_a_decode_last_ends_the_tail() -> None:
    # the last prompt hit the prefix cache (16 tokens cached): no tail
    assert _tail([5, 8], [5, 24]) is None
    # a hit in the middle: the tail is what follows it
    t = _tail([5, 8, 6], [5, 24, 6])
    assert t is not None and (t.seq_start, t.num_tokens) == (2, 6)
    assert _tail([3, 1], [3, 20]) is None  # a decode last
    assert _tail([], []) is None


@pytest.mark.parametrize("window", [None, 5])
def test_the_reference_equals_paged_attention_of_prompts_without_context(window: int | None) -> None:
    """The flash path's spec attends as the paged reference does over the same keys stored in a cache."""
    torch.manual_seed(0)
    heads, kv_heads, d, block = 4, 2, 16, 8
    lens = [13, 1, 20]
    n = sum(lens)
    q = torch.randn(n, heads, d)
    k = torch.randn(n, kv_heads, d)
    v = torch.randn(n, kv_heads, d)
    cu = torch.tensor([0, *np.cumsum(lens)], dtype=torch.int32)
    k_cache = torch.zeros(16, block, kv_heads, d)
    v_cache = torch.zeros_like(k_cache)
    tables = torch.tensor([[1, 2, 3], [4, 0, 0], [5, 6, 7]], dtype=torch.int32)
    slots = torch.cat([tables[s].repeat_interleave(block)[:m] * block + torch.arange(m) % block
                       for s, m in enumerate(lens)]).long()  # fmt: skip
    reference.write_kv_cache(k, v, k_cache, v_cache, slots)
    paged = reference.paged_attention(
        q, k_cache, v_cache, tables, torch.tensor(lens, dtype=torch.int32), cu, max(lens), max(lens), 0.25,
        sliding_window=window,
    )  # fmt: skip
    out = torch.full_like(q, float("nan"))
    got = reference.varlen_causal_attention(q, k, v, cu, max(lens), 0.25, window, out=out)
    assert got is out
    torch.testing.assert_close(got, paged, rtol=1e-5, atol=1e-5)


def test_flash_is_offered_only_where_it_runs() -> None:
    cpu = torch.device("cpu")
    assert flash_prefill_unsupported(cpu, torch.bfloat16, torch.bfloat16, 128, None) == (
        "device cpu (flash attention runs on CUDA)"
    )


def _prompt(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, 500) for _ in range(n)]


class _CountingReference:
    """The spec in the backend's flash slot, recording each call's (rows, whether rows came before)."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, bool]] = []

    def __call__(self, query, key, value, cu_seqlens, max_len, scale, sliding_window=None, out=None):
        self.calls.append((query.shape[0], out is not None))
        return reference.varlen_causal_attention(
            query, key, value, cu_seqlens, max_len, scale, sliding_window, out
        )


@pytest.mark.parametrize("family", ["llama", "mistral_window", "qwen3", "phi3_partial"])
def test_greedy_tokens_equal_transformers_with_prompts_attended_apart(
    tiny_model_dirs: dict[str, Path], family: str
) -> None:
    """Chunked prefill (24-token steps), a prompt sharing another's first blocks (a prefix-cache hit,
    so not in the tail) and decodes in the same steps: every step with a tail splits, and the tokens
    are transformers' greedy ones."""
    model_dir = tiny_model_dirs[family]
    llm = LLM(
        str(model_dir), device="cpu", dtype="float32", max_model_len=128, block_size=8,
        max_num_batched_tokens=24, max_num_seqs=8,
    )  # fmt: skip
    backend = llm.llm_engine.executor.runner.attn_backend
    flash = _CountingReference()
    backend.flash_prefill = flash
    backend.flash_prefill_min_tokens = 1
    shared = _prompt(17, seed=1)
    prompts = [
        _prompt(5, seed=2),
        _prompt(30, seed=3),
        shared,
        [*shared[:16], *_prompt(6, seed=4)],
        _prompt(9, 5),
    ]
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    outs = llm.generate(prompts, params, use_tqdm=False)
    hf = hf_causal_lm(str(model_dir), dtype=torch.float32).eval()
    for prompt, out in zip(prompts, outs, strict=True):
        want = hf.generate(
            torch.tensor([prompt]), max_new_tokens=6, do_sample=False, eos_token_id=None, pad_token_id=0
        )[0, len(prompt) :].tolist()
        assert out.outputs[0].token_ids == want, prompt
    assert any(not apart for _, apart in flash.calls), "no step of whole prompts only"
    assert any(apart for _, apart in flash.calls), "no step split between the paged kernel and flash"
    if family == "mistral_window":
        assert WINDOWS[family] < 30  # the 30-token prompt's later queries see only the window
    assert llm.llm_engine.scheduler.kv_cache_usage == 0.0


def test_the_torch_backend_keeps_its_kernels_when_flash_is_unset(tiny_model_dirs: dict[str, Path]) -> None:
    llm = LLM(str(tiny_model_dirs["llama"]), device="cpu", dtype="float32", max_model_len=64)
    backend = llm.llm_engine.executor.runner.attn_backend
    assert backend.flash_prefill is None and backend.kernels is ops.TORCH_KERNELS


def test_the_switch_offers_flash_where_it_runs_and_reads_the_token_floor(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """_offer_flash_prefill as on a GPU that can run it (the device check stubbed: this machine has none)."""
    from engine.model.layers import attention_backend as ab
    from ops.flash_prefill import flash_varlen_attention

    monkeypatch.setattr(ab, "flash_prefill_unsupported", lambda *args: None)
    backend = ab.TorchAttentionBackend(torch.bfloat16)
    ab._offer_flash_prefill(backend, torch.device("cpu"), torch.bfloat16, 128)
    assert backend.flash_prefill is None  # WEIR_FLASH_PREFILL is off by default
    monkeypatch.setenv("WEIR_FLASH_PREFILL", "1")
    ab._offer_flash_prefill(backend, torch.device("cpu"), torch.bfloat16, 128)
    assert backend.flash_prefill is flash_varlen_attention
    assert backend.flash_prefill_min_tokens == ab.FLASH_PREFILL_MIN_TOKENS == 256
    monkeypatch.setenv("WEIR_FLASH_PREFILL_MIN_TOKENS", "7")
    ab._offer_flash_prefill(backend, torch.device("cpu"), torch.bfloat16, 128)
    assert backend.flash_prefill_min_tokens == 7
    for bad in ("0", "-3", "many"):
        monkeypatch.setenv("WEIR_FLASH_PREFILL_MIN_TOKENS", bad)
        with pytest.raises(
            ValueError, match=rf"^WEIR_FLASH_PREFILL_MIN_TOKENS must be a positive integer; got '{bad}'$"
        ):
            ab._offer_flash_prefill(backend, torch.device("cpu"), torch.bfloat16, 128)


def test_flash_declines_what_it_cannot_attend() -> None:
    """Each refusal names what it cannot take (the CUDA ones are checked before the card is asked)."""
    from ops import flash_prefill as fp

    cuda = torch.device("cuda")
    assert fp.flash_prefill_unsupported(cuda, torch.float32, torch.float32, 128, None) == (
        "dtype torch.float32 (flash takes float16 and bfloat16)"
    )
    assert fp.flash_prefill_unsupported(cuda, torch.bfloat16, torch.float8_e4m3fn, 128, None) == (
        "kv_cache_dtype torch.float8_e4m3fn (the paged kernel reads keys rounded to it)"
    )
    assert fp.flash_prefill_unsupported(cuda, torch.bfloat16, torch.bfloat16, 100, None) == (
        "head_dim 100 (flash takes multiples of 8 up to 256)"
    )
    assert fp.flash_prefill_unsupported(cuda, torch.bfloat16, torch.bfloat16, 128, 50.0) == (
        "a logit softcap (torch's flash op takes none)"
    )


def test_a_softcapped_model_keeps_its_prompts_on_the_paged_kernel(tiny_model_dirs: dict[str, Path]) -> None:
    """Gemma 2 caps its attention scores, which torch's flash op cannot: its layers decline the path."""
    llm = LLM(str(tiny_model_dirs["gemma2"]), device="cpu", dtype="float32", max_model_len=64)
    backend = llm.llm_engine.executor.runner.attn_backend
    flash = _CountingReference()
    backend.flash_prefill, backend.flash_prefill_min_tokens = flash, 1
    llm.generate(
        [_prompt(12, seed=7)], SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True), use_tqdm=False
    )
    assert flash.calls == []
