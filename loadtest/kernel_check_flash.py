"""gpu_kernel_check.py's `flash` part: whole prompts through torch's flash attention (ops/flash_prefill.py).

Llama-3-8B's attention (32 query heads, 8 KV heads, head_dim 128), bf16, block size 16:
1. Correctness: `flash_varlen_attention` on T2's 8 fresh 1,024-token prompts (keys given contiguously,
   GQA native) and on 3 prompts under a 256-key sliding window, against weir's paged Triton kernel on
   the same keys stored in a paged cache (rel err < 1e-2: both round to bf16 once, their sums differ in
   order), and whether this torch writes flash's output in place (`writes_in_place`).
2. Timings (median ms, triton's do_bench): the 8 x 1,024 prefill step by the paged kernel and by
   flash; a mixed step of 64 decodes at context 2,048 ahead of 7 fresh 1,024-token prompts, by the
   paged kernel alone and split as the layer splits it (the decodes by the paged kernel, the prompts by
   flash into the same output).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

import ops.triton as tops
from loadtest.kernel_check_common import make_paged
from ops.flash_prefill import flash_varlen_attention, writes_in_place

HEADS, KV_HEADS, HEAD_DIM, BLOCK = 32, 8, 128, 16
SCALE = HEAD_DIM**-0.5


def _contiguous_kv(batch: dict, lens: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """[sum(lens), kv_heads, d] K and V of each sequence's first lens[i] positions, from its blocks."""
    ks, vs = [], []
    for i, n in enumerate(lens):
        blocks = batch["block_tables"][i, : -(-n // BLOCK)].long()
        ks.append(batch["k_cache"][blocks].reshape(-1, KV_HEADS, HEAD_DIM)[:n])
        vs.append(batch["v_cache"][blocks].reshape(-1, KV_HEADS, HEAD_DIM)[:n])
    return torch.cat(ks), torch.cat(vs)


def _paged(batch: dict, window: int | None = None) -> torch.Tensor:
    return tops.paged_attention(
        batch["query"], batch["k_cache"], batch["v_cache"], batch["block_tables"], batch["seq_lens"],
        batch["query_start_loc"], batch["max_query_len"], batch["max_seq_len"], SCALE, sliding_window=window,
    )  # fmt: skip


def flash_part(results: dict, check: Callable, bench: Callable) -> None:
    out = results["timings"]["flash"] = []
    results["flash_writes_in_place"] = writes_in_place()
    print(f"  flash writes in place: {writes_in_place()} (torch {torch.__version__})", flush=True)
    for lens, window in (([1024] * 8, None), ([700, 300, 1024], 256)):
        batch = make_paged(lens, lens, HEADS, KV_HEADS, HEAD_DIM, BLOCK, seed=5)
        k, v = _contiguous_kv(batch, lens)
        cu = batch["query_start_loc"]
        got = flash_varlen_attention(batch["query"], k, v, cu, max(lens), SCALE, window)
        check(
            f"flash_varlen_attention {len(lens)} prompts window {window} vs paged_attention",
            got,
            _paged(batch, window),
        )

    lens = [1024] * 8
    batch = make_paged(lens, lens, HEADS, KV_HEADS, HEAD_DIM, BLOCK, seed=5)
    k, v = _contiguous_kv(batch, lens)
    paged_ms = bench(lambda: _paged(batch))
    flash_ms = bench(
        lambda: flash_varlen_attention(batch["query"], k, v, batch["query_start_loc"], 1024, SCALE)
    )
    out.append({"what": "8 x 1024 fresh prompts", "paged_ms": paged_ms, "flash_ms": flash_ms})
    print(f"  8 x 1024 prompts: paged {paged_ms * 1e3:.0f} us, flash {flash_ms * 1e3:.0f} us "
          f"({paged_ms / flash_ms:.2f}x)", flush=True)  # fmt: skip

    # 64 decodes at context 2048, then 7 fresh prompts of 1024: the layer's split
    q_lens = [1] * 64 + [1024] * 7
    seq_lens = [2048] * 64 + [1024] * 7
    batch = make_paged(q_lens, seq_lens, HEADS, KV_HEADS, HEAD_DIM, BLOCK, seed=6)
    t0, s0 = 64, 64
    k, v = _contiguous_kv({**batch, "block_tables": batch["block_tables"][s0:]}, q_lens[s0:])
    cu = batch["query_start_loc"][s0:] - t0
    q = batch["query"]

    def split() -> torch.Tensor:
        res = torch.empty_like(q)
        res[:t0] = tops.paged_attention(
            q[:t0], batch["k_cache"], batch["v_cache"], batch["block_tables"][:s0], batch["seq_lens"][:s0],
            batch["query_start_loc"][: s0 + 1], 1, 2048, SCALE,
        )  # fmt: skip
        flash_varlen_attention(q[t0:], k, v, cu, 1024, SCALE, out=res[t0:])
        return res

    check(
        "split step (64 decodes by the paged kernel, 7 prompts by flash) vs paged_attention",
        split(),
        _paged(batch),
    )
    paged_ms, split_ms = bench(lambda: _paged(batch)), bench(split)
    out.append(
        {"what": "64 decodes@2048 + 7 x 1024 fresh prompts", "paged_ms": paged_ms, "split_ms": split_ms}
    )
    print(f"  64 decodes + 7 x 1024 prompts: paged {paged_ms * 1e3:.0f} us, split {split_ms * 1e3:.0f} us "
          f"({paged_ms / split_ms:.2f}x)", flush=True)  # fmt: skip
