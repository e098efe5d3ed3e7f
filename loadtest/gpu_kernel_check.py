"""GPU check and timing of every Triton kernel in ops/triton (one device call does it all).

1. Correctness at real shapes in bf16 (Llama-3-8B: 32 q / 8 kv heads, head_dim 128, hidden 4096;
   Qwen3-0.6B: 16 / 8 heads, head_dim 128, hidden 1024) against ops.reference run in float32 on upcast
   inputs: ||out - ref|| / ||ref|| < 1e-2, every output poisoned (NaN) first. Plus a CUDA-graph
   capture/replay of decode attention with new contents in the metadata tensors.
2. Ceilings: device-to-device copy bandwidth (bytes read + written) measured in the same run.
3. Timing (triton.testing.do_bench, median; it flushes L2 between runs): paged_attention decode at
   batch 1/8/32/64/256 x context 128..4096 (and 8k/16k at small batch), captured in CUDA graphs as the
   engine runs it, over input copies that together exceed L2, for every useful split-KV segment count
   (the heuristic's pick is marked); a mixed prefill+decode batch and a long prefill (config sweep, and
   torch SDPA as the peer); the row/elementwise kernels. Bandwidth is reported as a fraction of the copy.

4. families (loadtest/kernel_check_families.py): the kernels of the Gemma and Phi-3 families at real
   shapes: windowed + softcapped paged and fused decode attention at Gemma-2-9B's head_dim 256 with
   contexts past the window, Gemma 3's 1024 window, Mistral's 4096 window without softcap; partial
   rotary at Phi-4-mini's (head 128, rotary 96); Gemma's RMSNorm and GeGLU at Gemma-2/3 widths; a
   CUDA-graph replay of the windowed decode.
5. moe (loadtest/kernel_check_moe.py): the fused MoE kernel at Mixtral-8x7B's and Qwen3-30B-A3B's
   layer shapes, 1..4096 tokens: correctness, CUDA-graph capture/replay, times against the touched
   experts' bytes and a torch per-expert loop, and a tile sweep (WEIR_MOE_SWEEP_S seconds).

Parts by first word: `python loadtest/gpu_kernel_check.py moe families` runs those (environment and the
copy bandwidth always). `--smoke` runs families and moe at tiny shapes on CPU under the Triton
interpreter (tests/e2e/test_gpu_scripts_smoke.py).
Prints a short table last; writes everything to $OUT/kernels.json when OUT is set.
Run: PYTHONUNBUFFERED=1 python loadtest/gpu_kernel_check.py
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import itertools
import json
import math
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
# --smoke: the parts that have a smoke form (families, moe) at tiny shapes on CPU, under the Triton
# interpreter (set before triton's first import), in float32: a CI check that the script runs.
SMOKE = "--smoke" in sys.argv
if SMOKE:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402
import triton  # noqa: E402
from triton.testing import do_bench  # noqa: E402

import ops.triton as tops  # noqa: E402
from loadtest import kernel_check_common  # noqa: E402
from loadtest.kernel_check_common import Poisoned, sync, upcast  # noqa: E402
from ops import reference  # noqa: E402
from ops.triton.paged_attention import (  # noqa: E402
    AttentionConfig,
    choose_config,
    paged_attention_with_config,
)

DEV = torch.device("cpu" if SMOKE else "cuda")
make_paged = functools.partial(kernel_check_common.make_paged, device=DEV)
BF16 = torch.bfloat16
MODELS = {
    "llama3-8b": {"num_heads": 32, "num_kv_heads": 8, "head_dim": 128, "hidden": 4096, "intermediate": 14336},
    "qwen3-0.6b": {"num_heads": 16, "num_kv_heads": 8, "head_dim": 128, "hidden": 1024, "intermediate": 3072},
}
# Correctness only: Phi-3-mini's 96-dim heads, which the kernels pad to 128 lanes (ops/triton/head_dim.py)
CORRECTNESS_MODELS = {
    **MODELS,
    "phi3-mini": {"num_heads": 32, "num_kv_heads": 32, "head_dim": 96, "hidden": 3072, "intermediate": 8192},
}
RESULTS: dict = {"checks": [], "timings": {}, "errors": []}
OUT_DIR = os.environ.get("OUT")
START = time.time()
# Sweeps stop starting new variants after this many seconds, so one device call (6 min) ends cleanly.
BUDGET_S = float(os.environ.get("WEIR_CHECK_BUDGET_S", "300"))


def over_budget() -> bool:
    return time.time() - START > BUDGET_S


def save() -> None:
    if OUT_DIR:
        Path(OUT_DIR, "kernels.json").write_text(json.dumps(RESULTS, indent=1))


def section(name: str):
    """Run one part; record a failure and go on, so a broken part leaves the rest measured."""

    def wrap(fn):
        t0 = time.time()
        print(f"\n=== {name}", flush=True)
        try:
            fn()
        except Exception as exc:  # noqa: BLE001
            traceback.print_exc()
            RESULTS["errors"].append(f"{name}: {type(exc).__name__}: {exc}")
        sync(DEV)
        print(f"=== {name} done in {time.time() - t0:.1f}s", flush=True)
        save()
        return fn

    return wrap


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    if torch.isnan(out).any():
        return float("nan")
    return ((out - ref).norm() / ref.norm()).item()


def check(name: str, out: torch.Tensor, ref: torch.Tensor, tol: float = 1e-2) -> None:
    sync(DEV)
    err = rel_err(out, ref)
    ok = err < tol  # NaN fails
    RESULTS["checks"].append({"name": name, "rel_err": err, "tol": tol, "ok": ok})
    print(f"  {'PASS' if ok else 'FAIL'} {name}: rel_err={err:.2e} (tol {tol:g})", flush=True)


def bench(fn) -> float:
    """Median milliseconds."""
    return float(do_bench(fn, warmup=25, rep=100, return_mode="median"))


# ---------------------------------------------------------------- batches


def attention_bytes(batch: dict, q_lens: list[int], seq_lens: list[int]) -> int:
    """Fewest bytes: each sequence's K and V read once, q read once, out written once."""
    kc = batch["k_cache"]
    per_pos = kc.shape[2] * kc.shape[3] * kc.element_size() * 2
    q = batch["query"]
    return sum(seq_lens) * per_pos + 2 * q.numel() * q.element_size()


def attention_flops(q_lens: list[int], seq_lens: list[int], num_heads: int, head_dim: int) -> int:
    total = 0
    for q, s in zip(q_lens, seq_lens, strict=True):
        ctx = s - q
        keys = q * ctx + q * (q + 1) // 2  # causal
        total += 4 * keys * num_heads * head_dim
    return total


def llama3_cos_sin_cache(head_dim: int, max_position: int, base: float = 500000.0) -> torch.Tensor:
    factor, low, high, original = 8.0, 1.0, 4.0, 8192
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    wavelen = 2 * math.pi / inv_freq
    smooth = (original / wavelen - low) / (high - low)
    scaled = torch.where(wavelen > original / low, inv_freq / factor, inv_freq)
    mid = (wavelen <= original / low) & (wavelen >= original / high)
    scaled = torch.where(mid, (1 - smooth) * inv_freq / factor + smooth * inv_freq, scaled)
    freqs = torch.outer(torch.arange(max_position, dtype=torch.float64), scaled)
    return torch.cat((freqs.cos(), freqs.sin()), dim=-1).float().to(DEV)


# ---------------------------------------------------------------- parts


def environment() -> None:
    if SMOKE:
        RESULTS["env"] = {"card": "cpu (smoke: Triton interpreter)", "torch": torch.__version__}
        print(RESULTS["env"], flush=True)
        return
    p = torch.cuda.get_device_properties(DEV)
    commit = os.environ.get("WEIR_COMMIT", "")
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
        commit = out if len(out) == 40 else commit
    except OSError:
        pass
    RESULTS["env"] = {
        "card": p.name,
        "sm_count": p.multi_processor_count,
        "memory_gib": round(p.total_memory / 2**30, 1),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": commit,
    }
    print(RESULTS["env"], flush=True)


def copy_bandwidth() -> None:
    n = 1 << (20 if SMOKE else 30)  # 1 GiB each way (smoke: 1 MiB)
    src = torch.randn(n // 2, device=DEV, dtype=BF16)
    dst = torch.empty_like(src)
    ms = kernel_check_common.time_ms(lambda: dst.copy_(src), DEV) if SMOKE else bench(lambda: dst.copy_(src))
    gbs = 2 * n / ms / 1e6
    RESULTS["copy_bandwidth_gbs"] = gbs
    print(f"  device copy: {ms:.3f} ms for 2 x {n / 2**30:g} GiB -> {gbs:.0f} GB/s", flush=True)


def correctness() -> None:
    torch.manual_seed(0)
    for model, m in CORRECTNESS_MODELS.items():
        h, nh, nkv, d = m["hidden"], m["num_heads"], m["num_kv_heads"], m["head_dim"]
        n = 257
        x = torch.randn(n, h, device=DEV, dtype=BF16)
        res = torch.randn(n, h, device=DEV, dtype=BF16)
        w = (torch.rand(h, device=DEV) + 0.5).to(BF16)
        ref = reference.rms_norm(x.float(), w.float(), 1e-5)
        with Poisoned():
            out = tops.rms_norm(x, w, 1e-5)
        check(f"{model} rms_norm", out, ref)
        ref_o, ref_r = reference.rms_norm(x.float(), w.float(), 1e-5, res.float())
        with Poisoned():
            out_o, out_r = tops.rms_norm(x, w, 1e-5, res)
        check(f"{model} rms_norm+residual out", out_o, ref_o)
        check(f"{model} rms_norm+residual residual", out_r, ref_r)

        gu = torch.randn(n, 2 * m["intermediate"], device=DEV, dtype=BF16)
        with Poisoned():
            out = tops.silu_and_mul(gu)
        check(f"{model} silu_and_mul", out, reference.silu_and_mul(gu.float()))

        cache = llama3_cos_sin_cache(d, 8192)
        qkv = torch.randn(n, (nh + 2 * nkv) * d, device=DEV, dtype=BF16)
        q, k, _ = qkv.split([nh * d, nkv * d, nkv * d], dim=-1)
        pos = torch.randint(0, 8192, (n,), device=DEV)
        rq, rk = reference.rotary_embedding(pos, q.float(), k.float(), cache, d)
        with Poisoned():
            oq, ok = tops.rotary_embedding(pos, q, k, cache, d)
        check(f"{model} rotary q", oq, rq)
        check(f"{model} rotary k", ok, rk)

        kc = torch.randn(64, 16, nkv, d, device=DEV, dtype=BF16)
        vc = torch.randn_like(kc)
        key = torch.randn(n, nkv, d, device=DEV, dtype=BF16)
        val = torch.randn_like(key)
        slots = torch.randperm(64 * 16, device=DEV)[:n]
        slots[::7] = -1
        rkc, rvc = kc.clone(), vc.clone()
        reference.write_kv_cache(key, val, rkc, rvc, slots)
        tops.write_kv_cache(key, val, kc, vc, slots)
        torch.cuda.synchronize()
        exact = bool(torch.equal(kc, rkc) and torch.equal(vc, rvc))
        RESULTS["checks"].append({"name": f"{model} write_kv_cache exact", "ok": exact})
        print(f"  {'PASS' if exact else 'FAIL'} {model} write_kv_cache exact (with -1 slots)", flush=True)

        # Rotary fused with the KV write (the model's path): bit for bit the two launches it replaces.
        v = qkv[:, (nh + nkv) * d :]
        fkc, fvc, skc, svc = (torch.zeros_like(kc) for _ in range(4))
        with Poisoned():
            fq = tops.rotary_and_write_kv(pos, q, k, v, cache, d, fkc, fvc, slots)
        sq, sk = tops.rotary_embedding(pos, q, k, cache, d)
        tops.write_kv_cache(sk.view(n, nkv, d), v.reshape(n, nkv, d), skc, svc, slots)
        torch.cuda.synchronize()
        exact = bool(torch.equal(fq, sq) and torch.equal(fkc, skc) and torch.equal(fvc, svc))
        RESULTS["checks"].append(
            {"name": f"{model} rotary_and_write_kv == rotary, write_kv_cache", "ok": exact}
        )
        print(f"  {'PASS' if exact else 'FAIL'} {model} rotary_and_write_kv == the two launches", flush=True)

        # Mixed batch: 2 prefills with cached prefixes (0 and 700 tokens), one chunk without, decodes.
        q_lens = [300, 129, 77, *([1] * 12)]
        seq_lens = [300, 829, 1077, 1, 2, 15, 16, 17, 100, 511, 512, 513, 2000, 3000, 4096]
        for bs in (16, 32, 64):
            batch = make_paged(q_lens, seq_lens, nh, nkv, d, bs, seed=bs)
            ref = reference.paged_attention(**upcast(batch))
            with Poisoned():
                out = tops.paged_attention(**batch)
            check(f"{model} paged_attention mixed bs{bs} default", out, ref)
            with Poisoned():
                out = paged_attention_with_config(
                    **batch, config=AttentionConfig(block_m=16, tile=32, num_segments=8)
                )
            check(f"{model} paged_attention mixed bs{bs} split8", out, ref)
        # Sliding window (Gemma 2's 4096 and a window inside one block) with Gemma 2's softcap of 50
        batch = make_paged(q_lens, seq_lens, nh, nkv, d, 16, seed=3)
        for window, split in ((4096, 1), (1000, 8), (7, 1)):
            ref = reference.paged_attention(**upcast(batch), sliding_window=window, softcap=50.0)
            with Poisoned():
                out = paged_attention_with_config(
                    **batch, config=AttentionConfig(block_m=16, tile=32, num_segments=split),
                    sliding_window=window, softcap=50.0,
                )  # fmt: skip
            check(f"{model} paged_attention mixed window{window} softcap50 split{split}", out, ref)
        dec = make_paged([1] * 5, [1, 33, 1000, 2048, 4000], nh, nkv, d, 16, seed=7)
        ref = reference.paged_attention(**upcast(dec))
        with Poisoned():
            out = tops.paged_attention(**dec)
        check(
            f"{model} paged_attention decode default (split={choose_config(5, nh, nkv, d, 1, 4000, DEV).num_segments})",
            out,
            ref,
        )
        decode_attention_exact(model, nh, nkv, d, cache)


def decode_attention_exact(model: str, nh: int, nkv: int, d: int, cos_sin: torch.Tensor) -> None:
    """decode_attention (rotary, KV write and attention in one launch) bit for bit the two launches it
    replaces, on decode batches that split KV (the new token in a split's last segment, written and read
    back by one program) and that do not; ten rounds each, since a missing ordering would show as a race."""
    for label, seq_lens, max_seq_len in (
        ("split", [1, 33, 64, 65, 1000, 2048, 4000, 129], 8192),
        ("one-pass", [1, 17, 200, 511], 511),
    ):
        n = len(seq_lens)
        dec = make_paged([1] * n, seq_lens, nh, nkv, d, 16, seed=n)
        bt, bs = dec["block_tables"], 16
        pos = torch.tensor(seq_lens, device=DEV) - 1
        slots = bt[torch.arange(n, device=DEV), pos // bs].long() * bs + pos % bs
        exact = True
        for r in range(10):
            qkv = torch.randn(
                n, (nh + 2 * nkv) * d, device=DEV, dtype=BF16, generator=torch.Generator(DEV).manual_seed(r)
            )
            q, k, v = qkv.split([nh * d, nkv * d, nkv * d], dim=-1)
            caches = [c.clone() for c in (dec["k_cache"], dec["v_cache"]) for _ in range(2)]
            fkc, skc, fvc, svc = caches
            args = (dec["block_tables"], dec["seq_lens"], dec["query_start_loc"])
            with Poisoned():
                fused = tops.decode_attention(
                    pos, q, k, v, cos_sin, d, fkc, fvc, slots, *args, max_seq_len, dec["scale"]
                )
            sq = tops.rotary_and_write_kv(pos, q, k, v, cos_sin, d, skc, svc, slots)
            sep = tops.paged_attention(sq.view(n, nh, d), skc, svc, *args, 1, max_seq_len, dec["scale"])
            torch.cuda.synchronize()
            exact &= bool(torch.equal(fused, sep) and torch.equal(fkc, skc) and torch.equal(fvc, svc))
        name = f"{model} decode_attention == rotary_and_write_kv, paged_attention ({label}, 10 rounds)"
        RESULTS["checks"].append({"name": name, "ok": exact})
        print(f"  {'PASS' if exact else 'FAIL'} {name}", flush=True)


def cuda_graph_replay() -> None:
    """Capture decode attention once, then change seq_lens / block tables in place and replay."""
    m = MODELS["llama3-8b"]
    nh, nkv, d = m["num_heads"], m["num_kv_heads"], m["head_dim"]
    for label, seq_lens in (("split", [500, 1000, 3000, 20]), ("one-pass", [500] * 40)):
        batch = make_paged([1] * len(seq_lens), seq_lens, nh, nkv, d, 16, seed=3)
        batch["max_seq_len"] = 4096  # the runner captures with its max, not the batch's
        cfg = choose_config(len(seq_lens), nh, nkv, d, 1, 4096, DEV)
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            tops.paged_attention(**batch)  # warm-up compiles outside the capture
        torch.cuda.current_stream().wait_stream(s)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = tops.paged_attention(**batch)
        new_lens = torch.tensor([s_ + 7 for s_ in seq_lens[::-1]], dtype=torch.int32, device=DEV)
        new_batch = make_paged(
            [1] * len(seq_lens),
            new_lens.tolist(),
            nh,
            nkv,
            d,
            16,
            seed=4,
            k_cache=batch["k_cache"],
            v_cache=batch["v_cache"],
        )
        bt = new_batch["block_tables"]
        batch["block_tables"][:, : bt.shape[1]].copy_(bt)
        batch["seq_lens"].copy_(new_lens)
        batch["query"].copy_(new_batch["query"])
        graph.replay()
        ref = reference.paged_attention(**upcast({**batch}))
        check(f"cuda-graph replay decode ({label}, segments={cfg.num_segments})", out, ref)


def kernel_timings() -> None:
    m = MODELS["llama3-8b"]
    n = 4096
    rows = []
    x = torch.randn(n, m["hidden"], device=DEV, dtype=BF16)
    r = torch.randn_like(x)
    w = torch.rand(m["hidden"], device=DEV, dtype=BF16)
    ms = bench(lambda: tops.rms_norm(x, w, 1e-5, r))
    rows.append(("rms_norm+residual 4096x4096", ms, 4 * x.numel() * 2))
    gu = torch.randn(n, 2 * m["intermediate"], device=DEV, dtype=BF16)
    ms = bench(lambda: tops.silu_and_mul(gu))
    rows.append(("silu_and_mul 4096x2x14336", ms, gu.numel() * 2 * 3 // 2))
    cache = llama3_cos_sin_cache(128, 8192)
    qkv = torch.randn(n, 48 * 128, device=DEV, dtype=BF16)
    q, k, _ = qkv.split([32 * 128, 8 * 128, 8 * 128], dim=-1)
    pos = torch.randint(0, 8192, (n,), device=DEV)
    ms = bench(lambda: tops.rotary_embedding(pos, q, k, cache, 128))
    rows.append(("rotary 4096 tok 32+8 heads", ms, 2 * 2 * (q.numel() + k.numel()) + n * 128 * 4))
    kc = torch.empty(n // 16 * 2, 16, 8, 128, device=DEV, dtype=BF16)
    vc = torch.empty_like(kc)
    key = torch.randn(n, 8, 128, device=DEV, dtype=BF16)
    val = torch.randn_like(key)
    slots = torch.randperm(kc.shape[0] * 16, device=DEV)[:n]
    ms = bench(lambda: tops.write_kv_cache(key, val, kc, vc, slots))
    rows.append(("write_kv_cache 4096 tok 8x128", ms, 4 * key.numel() * 2))
    v = qkv[:, 40 * 128 :]
    ms = bench(lambda: tops.rotary_and_write_kv(pos, q, k, v, cache, 128, kc, vc, slots))
    rows.append(("rotary_and_write_kv 4096 tok", ms, 2 * 2 * (q.numel() + k.numel()) + 4 * key.numel() * 2))
    copy = RESULTS.get("copy_bandwidth_gbs", float("nan"))
    RESULTS["timings"]["elementwise"] = []
    for name, ms, nbytes in rows:
        gbs = nbytes / ms / 1e6
        RESULTS["timings"]["elementwise"].append(
            {"name": name, "ms": ms, "gbs": gbs, "frac_copy": gbs / copy}
        )
        print(f"  {name:32s} {ms * 1e3:8.1f} us {gbs:7.0f} GB/s {gbs / copy:5.0%} of copy", flush=True)


class DecodePool:
    """One big cache shared by all decode timings (random blocks from it, like a busy server); an fp8
    `cache_dtype` gives fp8 caches and per-KV-head scales, as the engine passes them."""

    def __init__(self, model: str, block_size: int, max_tokens: int, cache_dtype: torch.dtype = BF16):
        m = MODELS[model]
        self.m, self.block_size = m, block_size
        shape = (max_tokens // block_size + 64, block_size, m["num_kv_heads"], m["head_dim"])
        self.k = torch.randn(shape, device=DEV, dtype=BF16).to(cache_dtype)
        self.v = torch.randn(shape, device=DEV, dtype=BF16).to(cache_dtype)
        self.scales = None
        if cache_dtype != BF16:
            self.scales = torch.full((m["num_kv_heads"],), 0.5, device=DEV)

    def batch(self, num_seqs: int, ctx: int, copy: int = 0) -> dict:
        m = self.m
        scales = {} if self.scales is None else {"k_scale": self.scales, "v_scale": self.scales}
        return scales | make_paged(
            [1] * num_seqs,
            [ctx] * num_seqs,
            m["num_heads"],
            m["num_kv_heads"],
            m["head_dim"],
            self.block_size,
            k_cache=self.k,
            v_cache=self.v,
            seed=num_seqs * 7919 + ctx * 31 + copy,
        )


def attention_call(batch: dict, config: AttentionConfig | None):
    if config is None:
        return lambda: tops.paged_attention(**batch)
    return lambda: paged_attention_with_config(**batch, config=config)


def bench_graph(make_fn, nbytes: int) -> float:
    """Median ms per call of calls captured in one CUDA graph (as the engine runs decode), rotating
    over enough input copies (distinct cache blocks) that together they are 4x the L2 size."""
    l2 = torch.cuda.get_device_properties(DEV).L2_cache_size
    copies = max(1, min(256, math.ceil(4 * l2 / max(nbytes, 1))))
    fns = [make_fn(i) for i in range(copies)]
    calls = copies * max(1, math.ceil(8 / copies))
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for f in fns:
            f()  # compile and warm up outside the capture
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(calls):
            fns[i % copies]()
    for _ in range(3):
        graph.replay()
    times = []
    for _ in range(15):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    del graph
    times.sort()
    return times[len(times) // 2] / calls


def time_attention(batch: dict, q_lens, seq_lens, config: AttentionConfig | None) -> dict:
    ms = bench(attention_call(batch, config))
    nbytes = attention_bytes(batch, q_lens, seq_lens)
    gbs = nbytes / ms / 1e6
    return {"ms": ms, "gbs": gbs, "frac_copy": gbs / RESULTS.get("copy_bandwidth_gbs", float("nan"))}


def time_decode(pool: DecodePool, num_seqs: int, ctx: int, config: AttentionConfig | None) -> dict:
    first = pool.batch(num_seqs, ctx)
    nbytes = attention_bytes(first, [1] * num_seqs, [ctx] * num_seqs)

    def make_fn(i: int):
        return attention_call(first if i == 0 else pool.batch(num_seqs, ctx, copy=i), config)

    ms = bench_graph(make_fn, nbytes)
    gbs = nbytes / ms / 1e6
    return {"ms": ms, "gbs": gbs, "frac_copy": gbs / RESULTS.get("copy_bandwidth_gbs", float("nan"))}


def cfg_dict(c: AttentionConfig) -> dict:
    return {
        "block_m": c.block_m,
        "tile": c.tile,
        "segments": c.num_segments,
        "warps": c.num_warps,
        "stages": c.num_stages,
    }


def decode_graph_sweep() -> None:
    """Decode attention timed in CUDA graphs at every (model, batch, context) point, for every useful
    split-KV segment count: the heuristic's pick and the best are both in the data."""
    out = RESULTS["timings"]["decode"] = []
    sms = torch.cuda.get_device_properties(DEV).multi_processor_count
    points = {
        "llama3-8b": [(b, c) for b in (1, 8, 32, 64, 256) for c in (128, 512, 1024, 2048, 4096)]
        + [(b, c) for b in (1, 8) for c in (8192, 16384)],
        "qwen3-0.6b": [(b, c) for b in (1, 8, 64, 256) for c in (1024, 4096)],
    }
    for model, pts in points.items():
        m = MODELS[model]
        pool = DecodePool(model, 16, 256 * 4096)
        for num_seqs, ctx in pts:
            if over_budget():
                print("  (time budget spent: sweep cut short)")
                break
            heur = choose_config(num_seqs, m["num_heads"], m["num_kv_heads"], m["head_dim"], 1, ctx, DEV)
            programs = num_seqs * m["num_kv_heads"]
            line = []
            for segs in (1, 2, 4, 8, 16, 32, 64):
                if segs > max(1, ctx // heur.tile) or (segs > 2 and programs * segs > 16 * sms):
                    continue
                c = AttentionConfig(heur.block_m, heur.tile, segs, heur.num_warps, heur.num_stages)
                r = time_decode(pool, num_seqs, ctx, c)
                out.append(
                    {
                        "model": model,
                        "num_seqs": num_seqs,
                        "ctx": ctx,
                        "heuristic": c == heur,
                        **cfg_dict(c),
                        **r,
                    }
                )
                mark = "*" if c == heur else ""
                line.append(f"{mark}{segs}:{r['ms'] * 1e3:.1f}us/{r['frac_copy']:.0%}")
            print(f"  {model:10s} b{num_seqs:<4d} ctx{ctx:<6d} " + " ".join(line), flush=True)
        del pool
        torch.cuda.empty_cache()


def decode_tile_sweep() -> None:
    """Tile / stages at small batch with split-KV on (graph timing); big batches were swept on run 1."""
    out = RESULTS["timings"]["decode_tile_sweep"] = []
    m = MODELS["llama3-8b"]
    pool = DecodePool("llama3-8b", 16, 64 * 4096)
    for num_seqs, ctx, segs in ((1, 4096, 16), (8, 4096, 8), (64, 1024, 1)):
        line = []
        for tile in (32, 64, 128):
            for stages in (2, 3, 4):
                if over_budget() or (tile == 128 and stages == 4):
                    continue
                c = AttentionConfig(16, tile, segs, 4, stages)
                r = time_decode(pool, num_seqs, ctx, c)
                out.append({"num_seqs": num_seqs, "ctx": ctx, **cfg_dict(c), **r})
                line.append(f"t{tile}s{stages}:{r['ms'] * 1e3:.1f}us")
        print(f"  b{num_seqs} ctx{ctx} seg{segs}: " + " ".join(line), flush=True)
    del pool
    torch.cuda.empty_cache()
    del m


def decode_shape_sweep() -> None:
    """Decode attention's launch (tile, stages, warps; the heuristic's segments and twice them) at the decode
    steps of T1 (Qwen3-0.6B, ~64-256 sequences of 512-1,024 positions) and T2 (Llama-3-8B, 256 of ~1,100),
    timed in CUDA graphs: where these large-batch steps lose to the copy bandwidth, and whether another launch
    would win it back (the heuristic's own pick is marked); then the widened fp8 cache's tiles and stages at
    the same points."""
    out = RESULTS["timings"]["decode_shape_sweep"] = []
    points = {"qwen3-0.6b": ((64, 1024), (144, 840), (256, 512), (256, 1024)), "llama3-8b": ((256, 1152),)}
    for model, pts in points.items():
        m = MODELS[model]
        pool = DecodePool(model, 16, 256 * 1152)
        fp8_pool = DecodePool(model, 16, 256 * 1152, torch.float8_e4m3fn)
        for num_seqs, ctx in pts:
            heur = choose_config(num_seqs, m["num_heads"], m["num_kv_heads"], m["head_dim"], 1, ctx, DEV)
            line, best = [], None
            for tile, stages, warps, segs in itertools.product(
                (32, 64, 128), (2, 3, 4), (4, 8), (heur.num_segments, 2 * heur.num_segments)
            ):
                if over_budget() or (tile == 128 and stages == 4):
                    continue
                c = AttentionConfig(heur.block_m, tile, segs, warps, stages)
                r = time_decode(pool, num_seqs, ctx, c)
                mine = (tile, stages, warps, segs) == (
                    heur.tile,
                    heur.num_stages,
                    heur.num_warps,
                    heur.num_segments,
                )
                out.append(
                    {"model": model, "num_seqs": num_seqs, "ctx": ctx, "heuristic": mine, **cfg_dict(c), **r}
                )
                if mine:
                    line.append(f"heuristic t{tile}s{stages}w{warps}g{segs}: {r['frac_copy']:.3f}")
                if best is None or r["ms"] < best[1]["ms"]:
                    best = (c, r)
            if best is not None:
                c, r = best
                line.append(
                    f"best t{c.tile}s{c.num_stages}w{c.num_warps}g{c.num_segments}: {r['frac_copy']:.3f}"
                )
            print(f"  {model:10s} b{num_seqs:<4d} ctx{ctx:<6d} " + "  ".join(line), flush=True)
            # The widened fp8 cache's launch (tiles of twice the positions, 3 stages by default): do 2 stages
            # or wider tiles help it as they did the 16-bit cache? (fractions of the copy of its own bytes)
            segs = max(1, heur.num_segments // 2)
            cells = []
            for tile, stages in itertools.product((128, 256), (2, 3)):
                if over_budget():
                    break
                c = AttentionConfig(heur.block_m, tile, segs, 4, stages, fp8_widen=True)
                r = time_decode(fp8_pool, num_seqs, ctx, c)
                row = {"model": model, "num_seqs": num_seqs, "ctx": ctx, "heuristic": False}
                out.append({**row, "cache": "fp8_widened", **cfg_dict(c), **r})
                cells.append(f"t{tile}s{stages}: {r['frac_copy']:.3f}")
            print(f"  {'':10s} fp8 widened g{segs}: " + "  ".join(cells), flush=True)
        del pool, fp8_pool
        torch.cuda.empty_cache()


def fp8_kv_decode() -> None:
    """An fp8 KV cache at Llama-3-8B's shapes: paged attention's widened path (WEIR_FP8_KV_WIDEN,
    ops/triton/fp8_kv_read.py) and its bytes path against the float32 reference (bf16 queries, per-head
    scales, e4m3 and e5m2; decode split and unsplit, mixed), the widened path bit for bit the bytes path's
    with fp16 queries, then decode times in CUDA graphs against a bf16 cache at the same batch and context
    (the widened path should take about half the bf16 time where the bf16 read is bandwidth-bound)."""
    m = MODELS["llama3-8b"]
    nh, nkv, d = m["num_heads"], m["num_kv_heads"], m["head_dim"]
    scales = {"k_scale": torch.tensor([0.5, 2.0, 0.03, 1.0, 8.0, 0.25, 1.5, 0.1], device=DEV)}
    scales["v_scale"] = scales["k_scale"].flip(0)
    shapes = {"decode b8 ctx3000": ([1] * 8, [3000] * 8), "decode b64 ctx700": ([1] * 64, [700] * 64),
              "mixed": ([200, 1, 1, 37], [700, 4096, 513, 100])}  # fmt: skip
    for fmt in (torch.float8_e4m3fn, torch.float8_e5m2):
        for name, (q_lens, seq_lens) in shapes.items():
            batch = make_paged(q_lens, seq_lens, nh, nkv, d, 16, seed=5)
            batch["k_cache"], batch["v_cache"] = (batch[n].mul(2.0).to(fmt) for n in ("k_cache", "v_cache"))
            batch |= scales
            ref = reference.paged_attention(**upcast(batch))
            heur = choose_config(len(q_lens), nh, nkv, d, max(q_lens), max(seq_lens), DEV)
            for widen in (False, True):
                out = paged_attention_with_config(**batch, config=dataclasses.replace(heur, fp8_widen=widen))
                check(f"{fmt} {name} {'widened' if widen else 'bytes'}", out, ref)
            half = {**batch, "query": batch["query"].half()}
            outs = [
                paged_attention_with_config(**half, config=dataclasses.replace(heur, fp8_widen=w))
                for w in (0, 1)
            ]
            torch.cuda.synchronize()
            same = torch.equal(outs[0], outs[1])
            RESULTS["checks"].append({"name": f"{fmt} {name} fp16 widened == bytes", "ok": same})
            print(f"  {'PASS' if same else 'FAIL'} {fmt} {name} fp16 queries: widened == bytes bit for bit")
    out = RESULTS["timings"]["fp8_kv_decode"] = []
    points = [(1, 4096), (8, 2048), (32, 1024), (64, 1024), (64, 2048), (256, 512), (256, 1024), (256, 2048)]
    pools = {"bf16": DecodePool("llama3-8b", 16, 256 * 2048)}
    pools["fp8"] = DecodePool("llama3-8b", 16, 256 * 2048, torch.float8_e4m3fn)
    print(
        "  decode us (% of copy): bf16 cache | fp8 bytes | fp8 widened | widened, 128-tiles  (widened / bf16)"
    )
    for num_seqs, ctx in points:
        if over_budget():
            print("  (time budget spent: cut short)")
            break
        heur = choose_config(num_seqs, nh, nkv, d, 1, ctx, DEV)
        row = {"num_seqs": num_seqs, "ctx": ctx, **cfg_dict(heur)}
        row["bf16"] = time_decode(pools["bf16"], num_seqs, ctx, heur)
        for label, widen in (("fp8_bytes", False), ("fp8_widened", True)):
            row[label] = time_decode(pools["fp8"], num_seqs, ctx, dataclasses.replace(heur, fp8_widen=widen))
        # 128-position tiles: the bytes of a bf16 64-position tile (the split's segments halve to keep its tiles)
        t128 = dataclasses.replace(
            heur, tile=128, num_segments=max(1, heur.num_segments // 2), fp8_widen=True
        )
        row["fp8_widened_t128"] = time_decode(pools["fp8"], num_seqs, ctx, t128)
        row["widened_vs_bf16"] = row["fp8_widened"]["ms"] / row["bf16"]["ms"]
        out.append(row)
        cells = " | ".join(
            f"{row[k]['ms'] * 1e3:7.1f} ({row[k]['frac_copy']:4.0%})"
            for k in ("bf16", "fp8_bytes", "fp8_widened", "fp8_widened_t128")
        )
        print(f"  b{num_seqs:<4d} ctx{ctx:<5d} {cells}  ({row['widened_vs_bf16']:.2f}x)", flush=True)
    del pools
    torch.cuda.empty_cache()


def mixed_and_prefill() -> None:
    m = MODELS["llama3-8b"]
    nh, nkv, d = m["num_heads"], m["num_kv_heads"], m["head_dim"]
    out = RESULTS["timings"]["mixed"] = []
    prefill_variants = [
        AttentionConfig(bm, t, 1, w, s)
        for bm, t, w, s in (
            (64, 64, 4, 3),
            (64, 64, 4, 4),
            (64, 128, 4, 2),
            (64, 128, 8, 2),
            (128, 64, 8, 3),
            (128, 128, 8, 2),
            (128, 64, 4, 3),
            (32, 64, 4, 3),
            # fewer stages / smaller tiles: more programs resident per SM (BLOCK_M 64 on 4 warps takes
            # 212 registers and 83 KB of shared memory at 3 stages, two programs an SM, sm_90 SASS)
            (64, 64, 4, 2),
            (64, 32, 4, 3),
            (128, 64, 8, 2),
        )
    ]
    # 4 prefill chunks of 512 (two with 1024 cached tokens) + 64 decodes at context 2048.
    q_lens = [512, 512, 512, 512, *([1] * 64)]
    seq_lens = [512, 512, 1536, 1536, *([2048] * 64)]
    # One long prefill without cache, against torch SDPA (flash) on contiguous K/V: a compute-bound peer.
    L = 4096
    for what, ql, sl in (
        ("mixed 4x512 prefill + 64 decodes@2048", q_lens, seq_lens),
        ("prefill 8x1024 (T2's 8,192-token steps)", [1024] * 8, [1024] * 8),
        (f"prefill {L}", [L], [L]),
    ):
        batch = make_paged(ql, sl, nh, nkv, d, 16, seed=11)
        flops = attention_flops(ql, sl, nh, d)
        default = choose_config(len(ql), nh, nkv, d, max(ql), max(sl), DEV)
        for c in [None, *prefill_variants]:
            if over_budget():
                print("  (time budget spent: sweep cut short)")
                break
            try:
                r = time_attention(batch, ql, sl, c)
            except Exception as exc:  # noqa: BLE001  (e.g. out of shared memory)
                print(f"  {what} {c} failed: {str(exc)[:80]}")
                continue
            tf = flops / r["ms"] / 1e9
            label = "default " + str(cfg_dict(default)) if c is None else str(cfg_dict(c))
            out.append({"what": what, "config": label, "tflops": tf, **r})
            print(f"  {what[:14]:14s} {label:72s} {r['ms'] * 1e3:8.1f} us {tf:6.1f} TFLOP/s", flush=True)

    torch_varlen_peer([1024] * 8, nh, nkv, d, out)

    batch = make_paged([L], [L], nh, nkv, d, 16, seed=11)
    flops = attention_flops([L], [L], nh, d)
    q = batch["query"].transpose(0, 1).unsqueeze(0)  # [1, heads, L, d]
    nb = L // 16
    kk = batch["k_cache"][batch["block_tables"][0, :nb].long()].reshape(L, nkv, d)
    vv = batch["v_cache"][batch["block_tables"][0, :nb].long()].reshape(L, nkv, d)
    kk = kk.repeat_interleave(nh // nkv, dim=1).transpose(0, 1).unsqueeze(0).contiguous()
    vv = vv.repeat_interleave(nh // nkv, dim=1).transpose(0, 1).unsqueeze(0).contiguous()
    sdpa_ms = bench(lambda: torch.nn.functional.scaled_dot_product_attention(q, kk, vv, is_causal=True))
    ours = tops.paged_attention(**batch)
    ref = torch.nn.functional.scaled_dot_product_attention(q.float(), kk.float(), vv.float(), is_causal=True)
    check("prefill 4096 vs SDPA fp32", ours, ref[0].transpose(0, 1))
    out.append(
        {"what": f"torch SDPA prefill {L} (contiguous K/V)", "ms": sdpa_ms, "tflops": flops / sdpa_ms / 1e9}
    )
    print(
        f"  torch SDPA prefill {L}: {sdpa_ms * 1e3:.0f} us ({flops / sdpa_ms / 1e9:.0f} TFLOP/s)", flush=True
    )


def torch_varlen_peer(q_lens: list[int], nh: int, nkv: int, d: int, out: list) -> None:
    """torch's flash varlen attention (torch.nn.attention.varlen, torch >= 2.10) on the same fresh prefills,
    K/V gathered contiguous: what a flash path for prompts without cached context would take. Its API
    changed between releases (is_causal and equal head counts first; window_size and enable_gqa later),
    so both are tried; it is timed only where it exists."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        print("  torch varlen_attn: not in this torch", torch.__version__)
        return
    import inspect

    batch = make_paged(q_lens, q_lens, nh, nkv, d, 16, seed=11)
    bs = 16
    k_rows, v_rows = [], []
    for i, n in enumerate(q_lens):
        blocks = batch["block_tables"][i, : (n + bs - 1) // bs].long()
        k_rows.append(batch["k_cache"][blocks].reshape(-1, nkv, d)[:n])
        v_rows.append(batch["v_cache"][blocks].reshape(-1, nkv, d)[:n])
    k = torch.cat(k_rows)  # [total, nkv, d]
    v = torch.cat(v_rows)
    cu = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32, device=DEV)
    q = batch["query"]  # [total, nh, d]
    params = inspect.signature(varlen_attn).parameters
    # torch 2.10: is_causal, equal head counts; 2.11: window_size (no is_causal); later also enable_gqa
    kwargs = {"window_size": (-1, 0)} if "window_size" in params else {"is_causal": True}
    if "enable_gqa" in params:
        kwargs["enable_gqa"] = True
    else:
        k = k.repeat_interleave(nh // nkv, dim=1).contiguous()
        v = v.repeat_interleave(nh // nkv, dim=1).contiguous()
    api = ", ".join(kwargs) + ("" if "enable_gqa" in kwargs else ", K/V repeated to the query heads")

    def fn():
        return varlen_attn(q, k, v, cu, cu, max(q_lens), max(q_lens), **kwargs)

    try:
        got = fn()
        check(
            f"torch varlen_attn {len(q_lens)}x{max(q_lens)} vs paged_attention",
            got,
            tops.paged_attention(**batch),
        )
        ms = bench(fn)
    except Exception as exc:  # noqa: BLE001  (an API or backend this torch lacks)
        print(f"  torch varlen_attn failed ({api}): {str(exc)[:120]}")
        return
    tf = attention_flops(q_lens, q_lens, nh, d) / ms / 1e9
    what = f"torch varlen_attn prefill {len(q_lens)}x{max(q_lens)} ({api})"
    out.append({"what": what, "ms": ms, "tflops": tf})
    print(f"  {what}: {ms * 1e3:.0f} us ({tf:.0f} TFLOP/s)", flush=True)


def summary() -> None:
    print("\n===== summary =====")
    env = RESULTS.get("env", {})
    print(
        f"card {env.get('card')}  torch {env.get('torch')}  triton {env.get('triton')}  "
        f"copy {RESULTS.get('copy_bandwidth_gbs', 0):.0f} GB/s"
    )
    bad = [c["name"] for c in RESULTS["checks"] if not c["ok"]]
    print(
        f"checks: {len(RESULTS['checks']) - len(bad)}/{len(RESULTS['checks'])} pass"
        + (f"; FAIL: {bad}" if bad else "")
    )
    rows = RESULTS["timings"].get("decode", [])
    if rows:
        print("decode paged_attention in CUDA graphs: heuristic us / % of copy bw [best segments: us]")
        for model in MODELS:
            ctxs = sorted({r["ctx"] for r in rows if r["model"] == model})
            print(f"  {model:10s}" + "".join(f"{'ctx' + str(c):>22s}" for c in ctxs))
            for b in sorted({r["num_seqs"] for r in rows if r["model"] == model}):
                cells = []
                for c in ctxs:
                    pts = [r for r in rows if r["model"] == model and r["num_seqs"] == b and r["ctx"] == c]
                    h = [r for r in pts if r["heuristic"]]
                    if not pts or not h:
                        cells.append(" " * 22)
                        continue
                    best = min(pts, key=lambda r: r["ms"])
                    cells.append(
                        f"{h[0]['ms'] * 1e3:7.1f}/{h[0]['frac_copy']:4.0%} [{best['segments']:2d}:{best['ms'] * 1e3:5.1f}]"
                    )
                print(f"  b{b:<9d}" + "".join(cells))
    for r in RESULTS["timings"].get("mixed", []):
        if r.get("config", "").startswith("default") or "SDPA" in r["what"] or "varlen" in r["what"]:
            print(f"{r['what']}: {r.get('config', '')} {r['ms'] * 1e3:.0f} us, {r['tflops']:.0f} TFLOP/s")
    if RESULTS["timings"].get("moe"):
        from loadtest.kernel_check_moe import print_summary

        print_summary(RESULTS)
    if RESULTS["errors"]:
        print("errors:", *RESULTS["errors"], sep="\n  ")


def moe() -> None:
    from loadtest.kernel_check_moe import moe_part

    moe_part(RESULTS, DEV, SMOKE, budget_s=float(os.environ.get("WEIR_MOE_SWEEP_S", "120")))


def flash() -> None:
    from loadtest.kernel_check_flash import flash_part

    flash_part(RESULTS, check, bench)


def families() -> None:
    from loadtest.kernel_check_families import families_part

    families_part(RESULTS, DEV, SMOKE)


SMOKE_PARTS = ("families", "moe")  # the parts with a smoke form (tiny shapes, float32, on CPU)


def main() -> None:
    only = {a for a in sys.argv[1:] if a != "--smoke"}
    if SMOKE and not only <= set(SMOKE_PARTS):
        raise SystemExit(f"--smoke runs only {', '.join(SMOKE_PARTS)}; got {sorted(only)}")
    only = only or (set(SMOKE_PARTS) if SMOKE else set())
    parts = [
        ("environment", environment),
        ("copy bandwidth", copy_bandwidth),
        ("correctness", correctness),
        ("cuda graph", cuda_graph_replay),
        ("elementwise timings", kernel_timings),
        ("decode graphs", decode_graph_sweep),
        ("mixed + prefill", mixed_and_prefill),
        ("flash (whole prompts by torch's flash attention, ops/flash_prefill.py)", flash),
        ("tile sweep", decode_tile_sweep),
        ("shapes (decode attention's launch at T1's and T2's decode steps)", decode_shape_sweep),
        ("fp8kv decode", fp8_kv_decode),
        ("families (Gemma, Phi-4-mini, sliding windows at real shapes)", families),
        ("moe (fused MoE at the Mixtral-8x7B and Qwen3-30B-A3B shapes)", moe),
    ]
    for name, fn in parts:
        if not only or name.split()[0] in only or name in ("environment", "copy bandwidth"):
            section(name)(fn)
    summary()
    save()
    sys.exit(1 if RESULTS["errors"] or not all(c["ok"] for c in RESULTS["checks"]) else 0)


if __name__ == "__main__":
    main()
