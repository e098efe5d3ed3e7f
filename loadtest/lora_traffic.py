"""Bytes one decode step's LoRA kernels read, counted on CPU from the kernels' own launch plan
(ops.triton.lora: token tiles, input splits, output tiles, the slots each tile meets) at the
Llama-3-8B shape (32 layers; q/k/v, o, gate/up and down; rank-16 adapters, bf16 weights).

    PYTHONPATH=. python loadtest/lora_traffic.py [--tokens 256] [--adapters 64] [--rank 16]

A/B: each token tile reads, for every slot it meets, that slot's A (all of IN, over the splits) and
the diagonal blocks of its B (over the output tiles): bytes = sum over tiles of (slots met) x (A + B).
Partials: every expand program reads the fp32 split partials of its tile's rows (L2 traffic mostly).
Three layouts of the same step (`--tokens` decodes, `--adapters` adapters, equal shares):
  arbitrary  tokens in arrival order: requests arrive round-robin over the adapters (bench_lora)
  grouped    requests sorted by adapter id on the host (model_runner's group_by_adapter, from 7e89793
             until the kernels took the order; the tiles then follow the request order)
  by slot    the kernels' tiles follow the order by slot (engine.lora.manager.write_index)
Slots are a permutation of adapter ids (LRU reuse makes slot numbers unrelated to ids).

CPU counts (this file's commit; 32 layers, rank 16, bf16 A/B; GB = 1e9 bytes):
  256 tokens, 64 adapters (A2's decode steps)
    arbitrary  256 visits a layer  A 10.20 + B 11.27 = 21.47 GB a step
    grouped     64 visits          A  2.55 + B  2.82 =  5.37 GB
    by slot     64 visits          A  2.55 + B  2.82 =  5.37 GB (each adapter once: the minimum)
  256 tokens, 8 adapters (A1)
    arbitrary   32 visits          2.68 GB;  grouped and by slot: 8 visits, 0.67 GB
  fp32 partials the expand re-reads, any layout: 3.09 GB a step at 256 tokens (every output tile
  of 64 rows re-reads the split partials of its token tile: gate_up's 448 tiles x 8 splits), mostly
  from L2; at A1 that is 4.6x the A/B bytes, the next thing to cut (wider output tiles, fewer splits).
The base model's weights are 16 GB a step: if a step is bandwidth-bound, A2's best is
16 / (16 + 5.37) = 0.75x base. The order by slot reads 4x fewer A/B bytes than round-robin arrival
order; against the host grouping it replaces it reads the same (which already reached the minimum
here), so it changes A1/A2 only through the slot loop (present slots only) and the plan.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ops.triton.lora import _block_k, _block_m, shrink_plan  # noqa: E402  (plan only: no launch)

LAYERS = 32
HIDDEN, KV, INTER = 4096, 1024, 14336
BF16, FP32 = 2, 4


def projections(rank: int) -> list[tuple[str, int, list[int]]]:
    """(name, in_features, output sizes of the sub-matrices) of one layer."""
    del rank
    return [("qkv", HIDDEN, [HIDDEN, KV, KV]), ("o", HIDDEN, [HIDDEN]), ("gate_up", HIDDEN, [INTER, INTER]),
            ("down", INTER, [HIDDEN])]  # fmt: skip


def count(slots_by_position: np.ndarray, rank: int) -> dict[str, float]:
    """Bytes per step (all layers) for tokens whose tiles are laid out as `slots_by_position`."""
    num_tokens = len(slots_by_position)
    a = b = partials = 0
    visits = 0
    for _, in_features, outs in projections(rank):
        lora_dim = rank * len(outs)
        # shrink: token tiles x splits; A over the splits is the whole A of each slot met
        bm, _, split, _ = shrink_plan(num_tokens, in_features, lora_dim)
        tiles = [slots_by_position[i : i + bm] for i in range(0, num_tokens, bm)]
        met = [len({int(s) for s in tile if s >= 0}) for tile in tiles]
        visits = max(visits, sum(met))
        a += sum(met) * lora_dim * in_features * BF16
        # expand: token tiles x 64-row output tiles; B's diagonal blocks, and the partials of the tile
        bm_e = _block_m(num_tokens, _block_k(rank))
        tiles_e = [slots_by_position[i : i + bm_e] for i in range(0, num_tokens, bm_e)]
        out = sum(outs)
        starts = np.cumsum([0, *outs])
        for tile in tiles_e:
            k = len({int(s) for s in tile if s >= 0})
            rows = int((tile >= 0).sum())
            b += k * out * rank * BF16  # every output row of one sub-matrix: rank columns
            for n0 in range(0, out, 64):  # sub-matrices met by this output tile
                subs = len(
                    {int(np.searchsorted(starts, r, side="right")) for r in (n0, min(n0 + 64, out) - 1)}
                )
                partials += subs * split * rows * rank * FP32
    return {"visits": visits, "a": a * LAYERS, "b": b * LAYERS, "partials": partials * LAYERS}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=256)
    p.add_argument("--adapters", type=int, default=64)
    p.add_argument("--rank", type=int, default=16)
    args = p.parse_args()
    # requests arrive round-robin over the adapters (bench_lora); slots are given as they first
    # appear, then reshuffled to model LRU reuse: slot numbers unrelated to adapter ids
    adapter = np.arange(args.tokens) % args.adapters
    slot_of = np.random.default_rng(0).permutation(args.adapters)
    layouts = {
        "arbitrary": slot_of[adapter],
        "grouped": slot_of[np.sort(adapter, kind="stable")],
        "by slot": np.sort(slot_of[adapter], kind="stable"),
    }
    gb = 1e9
    for name, slots in layouts.items():
        c = count(slots, args.rank)
        print(
            f"{name:10s} {c['visits']:4d} slot-tile visits (largest layer)  A {c['a'] / gb:.2f} GB + "
            f"B {c['b'] / gb:.2f} GB = {(c['a'] + c['b']) / gb:.2f} GB; fp32 partials read "
            f"{c['partials'] / gb:.2f} GB"
        )


if __name__ == "__main__":
    main()
