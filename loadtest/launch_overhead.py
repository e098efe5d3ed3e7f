"""Host (CPU) cost of each ops/triton wrapper per eager call, at Llama-3-8B shapes.

Eager forwards (every step with a prefill chunk; CUDA graphs only cover decode-only batches) are bound
by how fast the host launches kernels, so this measures host microseconds per call, not kernel time.

Modes:
  gpu   (default when CUDA is available)
        1. checks every wrapper once against ops.reference (bf16 inputs; reference in float32 on upcast
           copies; ||out - ref|| / ||ref|| < 1e-2), so the timed calls are known to be right;
        2. times N eager calls of each wrapper and of the same op through the torch reference, plus
           the op sequence of one decoder layer (with and without the four linears), with a host clock
           started after a synchronize: `host_us` is the time until the Python loop returns (launch
           cost), `wall_us` includes the final synchronize;
        3. repeats (2) for the wrappers with every Triton launch replaced by a no-op (`wrapper_us`):
           the pure-Python wrapper cost on this host; host_us - wrapper_us is Triton's launch path;
        4. times the launch of an empty Triton kernel with 2 and 24 arguments (the floor).
  noop  (any machine, no GPU needed) only step (3), on CPU tensors: before/after numbers for wrapper
        changes can be taken on a laptop. Triton is imported with TRITON_INTERPRET=1 so that it imports
        without a GPU; the kernels are never run.

Every part records its error and the script goes on. Prints a table last; writes JSON to --out
(default $OUT/launch_overhead.json when OUT is set). Finishes in well under a minute on an H100/H200.

    PYTHONUNBUFFERED=1 python loadtest/launch_overhead.py --out $OUT/launch_overhead.json
    python loadtest/launch_overhead.py --mode noop
"""

from __future__ import annotations

import argparse
import gc
import importlib
import json
import os
import platform
import statistics
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

# Llama-3-8B, one decoder layer (tp=1).
HIDDEN, NUM_HEADS, NUM_KV_HEADS, HEAD_DIM, INTERMEDIATE = 4096, 32, 8, 128, 14336
BLOCK_SIZE, EPS, MAX_POSITION = 16, 1e-5, 8192
Q_SIZE, KV_SIZE = NUM_HEADS * HEAD_DIM, NUM_KV_HEADS * HEAD_DIM
# name -> (q_lens, seq_lens) per sequence: decodes, a mixed step (one prefill chunk among decodes, the
# eager case that matters most), a pure prefill.
SHAPES: dict[str, tuple[list[int], list[int]]] = {
    "decode-b1": ([1], [1024]),
    "decode-b64": ([1] * 64, [1024] * 64),
    "mixed-256+63": ([256] + [1] * 63, [256] + [1024] * 63),
    "prefill-2048": ([2048], [2048]),
}
WRAPPER_MODULES = ("activation", "kv_cache", "paged_attention", "rms_norm", "rotary")
OPS = (
    "rms_norm",
    "rms_norm+residual",
    "rotary_embedding",
    "write_kv_cache",
    "paged_attention",
    "silu_and_mul",
)

RESULTS: dict[str, Any] = {"checks": [], "timings": [], "errors": []}
START = time.time()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", choices=("auto", "gpu", "noop"), default="auto")
    p.add_argument("--iters", type=int, default=200, help="calls per timed repeat (wrappers)")
    p.add_argument("--repeats", type=int, default=5, help="timed repeats; the median is reported")
    p.add_argument("--shapes", default=",".join(SHAPES), help=f"comma-separated subset of {','.join(SHAPES)}")
    p.add_argument("--budget-s", type=float, default=45.0, help="stop starting new timings after this")
    p.add_argument("--out", default=None, help="JSON path (default $OUT/launch_overhead.json if OUT is set)")
    return p.parse_args(argv)


def over_budget(budget_s: float) -> bool:
    return time.time() - START > budget_s


def record_error(where: str, exc: BaseException) -> None:
    traceback.print_exc()
    RESULTS["errors"].append(f"{where}: {type(exc).__name__}: {exc}")


# ---------------------------------------------------------------------------------------- inputs


class Step:
    """Every tensor one decoder layer's ops see in one step of `shape`, laid out as the model passes
    them (q/k/v as views into one fused qkv buffer, K/V of [num_tokens, num_kv_heads, head_dim])."""

    def __init__(self, torch: Any, shape: str, device: str, dtype: Any, real_data: bool) -> None:
        q_lens, seq_lens = SHAPES[shape]
        self.shape = shape
        self.num_tokens = n = sum(q_lens)
        g = torch.Generator(device=device).manual_seed(0)

        def rand(*size: int, dt: Any = dtype) -> Any:
            if not real_data:  # noop mode: contents are never read
                return torch.empty(size, dtype=dt, device=device)
            return torch.randn(size, dtype=dt, device=device, generator=g)

        self.hidden = rand(n, HIDDEN)  # [num_tokens, hidden]
        self.residual = rand(n, HIDDEN)  # [num_tokens, hidden]
        self.norm_weight = rand(HIDDEN) * 0.1 + 1.0 if real_data else rand(HIDDEN)  # [hidden]
        self.qkv = rand(n, Q_SIZE + 2 * KV_SIZE)  # [num_tokens, q_size + 2 * kv_size]
        self.q, self.k, self.v = self.qkv.split([Q_SIZE, KV_SIZE, KV_SIZE], dim=-1)
        self.gate_up = rand(n, 2 * INTERMEDIATE)  # [num_tokens, 2 * intermediate]
        positions = [s - q + i for q, s in zip(q_lens, seq_lens, strict=True) for i in range(q)]
        self.positions = torch.tensor(positions, dtype=torch.int64, device=device)  # [num_tokens]
        inv_freq = 1.0 / (500000.0 ** (torch.arange(0, HEAD_DIM, 2, dtype=torch.float32) / HEAD_DIM))
        freqs = torch.arange(MAX_POSITION, dtype=torch.float32)[:, None] * inv_freq[None, :]
        self.cos_sin_cache = torch.cat((freqs.cos(), freqs.sin()), dim=-1).to(device)  # [max_pos, head_dim]

        blocks_per_seq = [-(-s // BLOCK_SIZE) for s in seq_lens]
        num_blocks = sum(blocks_per_seq) + 4
        cache_shape = (num_blocks, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM)
        self.k_cache = rand(*cache_shape)  # [num_blocks, block_size, num_kv_heads, head_dim]
        self.v_cache = rand(*cache_shape)
        perm = torch.randperm(num_blocks, generator=torch.Generator().manual_seed(1))
        max_blocks = max(blocks_per_seq) + 1
        block_tables = torch.zeros(len(seq_lens), max_blocks, dtype=torch.int32)  # [num_seqs, max_blocks]
        slots: list[int] = []
        used = 0
        for i, (nb, q, s) in enumerate(zip(blocks_per_seq, q_lens, seq_lens, strict=True)):
            block_tables[i, :nb] = perm[used : used + nb].int()
            used += nb
            for pos in range(s - q, s):
                slots.append(int(block_tables[i, pos // BLOCK_SIZE]) * BLOCK_SIZE + pos % BLOCK_SIZE)
        self.block_tables = block_tables.to(device)
        self.slot_mapping = torch.tensor(slots, dtype=torch.int64, device=device)  # [num_tokens]
        self.seq_lens = torch.tensor(seq_lens, dtype=torch.int32, device=device)  # [num_seqs]
        qsl = [0]
        for q in q_lens:
            qsl.append(qsl[-1] + q)
        self.query_start_loc = torch.tensor(qsl, dtype=torch.int32, device=device)  # [num_seqs + 1]
        self.max_query_len, self.max_seq_len = max(q_lens), max(seq_lens)
        self.scale = HEAD_DIM**-0.5
        # The layer's linears (gpu mode only; on a CPU they would really run).
        self.linears = None
        if real_data:
            self.linears = {
                "qkv": rand(Q_SIZE + 2 * KV_SIZE, HIDDEN) * 0.02,
                "o": rand(HIDDEN, Q_SIZE) * 0.02,
                "gate_up": rand(2 * INTERMEDIATE, HIDDEN) * 0.02,
                "down": rand(HIDDEN, INTERMEDIATE) * 0.02,
            }

    def kv(self) -> tuple[Any, Any]:
        n = self.num_tokens
        return self.k.view(n, NUM_KV_HEADS, HEAD_DIM), self.v.view(n, NUM_KV_HEADS, HEAD_DIM)

    def attn_args(self) -> tuple[Any, ...]:
        q = self.q.reshape(self.num_tokens, NUM_HEADS, HEAD_DIM)  # rotary returns a contiguous q
        return (
            q, self.k_cache, self.v_cache, self.block_tables, self.seq_lens, self.query_start_loc,
            self.max_query_len, self.max_seq_len, self.scale,
        )  # fmt: skip

    def op_calls(self, impl: Any) -> dict[str, Callable[[], Any]]:
        """One zero-argument callable per op (what is timed), over `impl` (ops.triton or ops.reference)."""
        k, v = self.kv()
        attn = self.attn_args()
        return {
            "rms_norm": lambda: impl.rms_norm(self.hidden, self.norm_weight, EPS),
            "rms_norm+residual": lambda: impl.rms_norm(self.hidden, self.norm_weight, EPS, self.residual),
            "rotary_embedding": lambda: impl.rotary_embedding(
                self.positions, self.q, self.k, self.cos_sin_cache, HEAD_DIM
            ),
            "write_kv_cache": lambda: impl.write_kv_cache(
                k, v, self.k_cache, self.v_cache, self.slot_mapping
            ),
            "paged_attention": lambda: impl.paged_attention(*attn),
            "silu_and_mul": lambda: impl.silu_and_mul(self.gate_up),
        }

    def layer(self, impl: Any, torch: Any, with_linears: bool) -> Callable[[], Any]:
        """One decoder layer's op sequence as LlamaDecoderLayer runs it (mid-stack: residual given)."""
        n, lin = self.num_tokens, self.linears
        linear = torch.nn.functional.linear

        def run() -> Any:
            hidden, residual = impl.rms_norm(self.hidden, self.norm_weight, EPS, self.residual)
            qkv = linear(hidden, lin["qkv"]) if with_linears else self.qkv
            q, k, v = qkv.split([Q_SIZE, KV_SIZE, KV_SIZE], dim=-1)
            q, k = impl.rotary_embedding(self.positions, q, k, self.cos_sin_cache, HEAD_DIM)
            k = k.view(n, NUM_KV_HEADS, HEAD_DIM)
            impl.write_kv_cache(
                k, v.view(n, NUM_KV_HEADS, HEAD_DIM), self.k_cache, self.v_cache, self.slot_mapping
            )
            out = impl.paged_attention(
                q.view(n, NUM_HEADS, HEAD_DIM), self.k_cache, self.v_cache, self.block_tables,
                self.seq_lens, self.query_start_loc, self.max_query_len, self.max_seq_len, self.scale,
            ).view(n, Q_SIZE)  # fmt: skip
            hidden = linear(out, lin["o"]) if with_linears else self.hidden
            hidden, residual = impl.rms_norm(hidden, self.norm_weight, EPS, residual)
            gate_up = linear(hidden, lin["gate_up"]) if with_linears else self.gate_up
            act = impl.silu_and_mul(gate_up)
            return linear(act, lin["down"]) if with_linears else act

        return run


# ---------------------------------------------------------------------------------------- timing


def time_host(fn: Callable[[], Any], iters: int, repeats: int, sync: Callable[[], None]) -> dict[str, float]:
    """Host us per call (until the loop returns) and wall us per call (after the synchronize), median
    over repeats."""
    for _ in range(3):
        fn()
    sync()
    host, wall = [], []
    gc.collect()
    gc.disable()  # a collection in the loop would be charged to one op at random
    try:
        for _ in range(repeats):
            sync()
            t0 = time.perf_counter()
            for _ in range(iters):
                fn()
            t1 = time.perf_counter()
            sync()
            t2 = time.perf_counter()
            host.append((t1 - t0) / iters * 1e6)
            wall.append((t2 - t0) / iters * 1e6)
    finally:
        gc.enable()
    return {
        "host_us": statistics.median(host),
        "host_us_min": min(host),  # the least disturbed repeat: the number to compare on a noisy host
        "wall_us": statistics.median(wall),
        "iters": iters,
    }


def _is_kernel(obj: Any) -> bool:
    from triton.runtime.jit import KernelInterface  # noqa: PLC0415

    if isinstance(obj, KernelInterface):
        return True
    try:  # the interpreter's stand-in is not a KernelInterface in every triton version
        from triton.runtime.interpreter import InterpretedFunction  # noqa: PLC0415
    except ImportError:
        return False
    return isinstance(obj, InterpretedFunction)


class _NoopKernel:
    """Stands in for a @triton.jit kernel: `kernel[grid](*args, **kwargs)` does nothing."""

    def __getitem__(self, grid: Any) -> Callable[..., None]:
        return _noop_launch


def _noop_launch(*args: Any, **kwargs: Any) -> None:
    return None


@contextmanager
def noop_kernels() -> Iterator[int]:
    """Replace every Triton kernel object in the ops/triton wrapper modules with `_NoopKernel`.

    The wrappers read their kernels as module globals at call time, so patching the module attribute
    is enough; yields how many were replaced (0 would mean the measurement is not what it claims)."""
    saved: list[tuple[Any, str, Any]] = []
    for name in WRAPPER_MODULES:
        mod = importlib.import_module(f"ops.triton.{name}")
        for attr, obj in list(vars(mod).items()):
            if _is_kernel(obj):
                saved.append((mod, attr, obj))
                setattr(mod, attr, _NoopKernel())
    try:
        yield len(saved)
    finally:
        for mod, attr, obj in saved:
            setattr(mod, attr, obj)


# ---------------------------------------------------------------------------------------- checks


def rel_err(torch: Any, out: Any, ref: Any) -> float:
    out, ref = out.double(), ref.double()
    if torch.isnan(out).any():
        return float("nan")
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def check_all(torch: Any, tops: Any, reference: Any, step: Step, tol: float = 1e-2) -> None:
    """Each wrapper once against the reference run in float32 on upcast copies of the same inputs."""

    def check(name: str, fn: Callable[[], list[tuple[Any, Any]]]) -> None:
        try:
            errs = [rel_err(torch, o, r) for o, r in fn()]
            err = max(errs)
            ok = err < tol  # NaN fails
        except Exception as exc:  # noqa: BLE001
            record_error(f"check {step.shape} {name}", exc)
            err, ok = float("nan"), False
        RESULTS["checks"].append({"shape": step.shape, "op": name, "rel_err": err, "tol": tol, "ok": ok})
        print(f"  {'PASS' if ok else 'FAIL'} {step.shape:14s} {name:18s} rel_err={err:.2e}", flush=True)

    f = lambda t: t.float()  # noqa: E731
    w = step.norm_weight

    def norm() -> list[tuple[Any, Any]]:
        return [(tops.rms_norm(step.hidden, w, EPS), reference.rms_norm(f(step.hidden), f(w), EPS))]

    def norm_res() -> list[tuple[Any, Any]]:
        out, res = tops.rms_norm(step.hidden, w, EPS, step.residual)
        rout, rres = reference.rms_norm(f(step.hidden), f(w), EPS, f(step.residual))
        return [(out, rout), (res, rres)]

    def rotary() -> list[tuple[Any, Any]]:
        q, k = tops.rotary_embedding(step.positions, step.q, step.k, step.cos_sin_cache, HEAD_DIM)
        rq, rk = reference.rotary_embedding(
            step.positions, f(step.q), f(step.k), step.cos_sin_cache, HEAD_DIM
        )
        return [(q, rq), (k, rk)]

    def kv() -> list[tuple[Any, Any]]:
        key, value = step.kv()
        kc, vc = step.k_cache.clone(), step.v_cache.clone()
        rkc, rvc = f(step.k_cache), f(step.v_cache)
        tops.write_kv_cache(key, value, kc, vc, step.slot_mapping)
        reference.write_kv_cache(f(key), f(value), rkc, rvc, step.slot_mapping)
        return [(kc, rkc), (vc, rvc)]

    def attn() -> list[tuple[Any, Any]]:
        args = step.attn_args()
        ref_args = (f(args[0]), f(args[1]), f(args[2]), *args[3:])
        return [(tops.paged_attention(*args), reference.paged_attention(*ref_args))]

    def silu() -> list[tuple[Any, Any]]:
        return [(tops.silu_and_mul(step.gate_up), reference.silu_and_mul(f(step.gate_up)))]

    for name, fn in (
        ("rms_norm", norm),
        ("rms_norm+residual", norm_res),
        ("rotary_embedding", rotary),
        ("write_kv_cache", kv),
        ("paged_attention", attn),
        ("silu_and_mul", silu),
    ):
        check(name, fn)
    torch.cuda.synchronize()


def bare_launch_floor(torch: Any, iters: int, repeats: int) -> None:
    """Host us of launching an empty Triton kernel: Triton's own launch path, no wrapper at all."""
    import triton  # noqa: PLC0415
    import triton.language as tl  # noqa: PLC0415

    # Triton resolves annotations such as tl.constexpr in the function's module globals.
    globals()["tl"] = tl

    @triton.jit
    def _empty2(x_ptr, n):
        pass

    @triton.jit
    def _empty24(
        p0, p1, p2, p3, p4, p5, p6, p7, p8, p9,
        i0, i1, i2, i3, i4, i5, i6, i7, i8, i9, i10, i11, f0, C0: tl.constexpr,
    ):  # fmt: skip
        pass

    x = torch.empty(16, device="cuda")
    ptrs, ints = [x] * 10, [4096 + 16 * i for i in range(12)]
    sync = torch.cuda.synchronize
    for name, fn in (
        ("empty kernel, 2 args", lambda: _empty2[(1,)](x, 7)),
        ("empty kernel, 24 args", lambda: _empty24[(1,)](*ptrs, *ints, 0.5, C0=4)),
    ):
        try:
            t = time_host(fn, iters, repeats, sync)
            RESULTS["timings"].append({"shape": "-", "op": name, "kind": "triton_floor", **t})
        except Exception as exc:  # noqa: BLE001
            record_error(name, exc)


# ---------------------------------------------------------------------------------------- main


def run_timings(
    torch: Any, impls: dict[str, Any], step: Step, args: argparse.Namespace, sync: Callable[[], None]
) -> None:
    for kind, impl in impls.items():
        iters = args.iters if kind != "reference" else max(3, args.iters // 10)  # the reference is slow
        calls = step.op_calls(impl)
        for op in OPS:
            if over_budget(args.budget_s):
                RESULTS["errors"].append(f"budget: skipped {kind} {step.shape} {op}")
                continue
            try:
                t = time_host(calls[op], iters, args.repeats, sync)
                RESULTS["timings"].append({"shape": step.shape, "op": op, "kind": kind, **t})
            except Exception as exc:  # noqa: BLE001
                record_error(f"{kind} {step.shape} {op}", exc)
        variants = [("layer ops", False)] + ([("layer ops+linears", True)] if step.linears else [])
        for label, with_linears in variants:
            if over_budget(args.budget_s):
                continue
            try:
                t = time_host(step.layer(impl, torch, with_linears), max(3, iters // 4), args.repeats, sync)
                RESULTS["timings"].append({"shape": step.shape, "op": label, "kind": kind, **t})
            except Exception as exc:  # noqa: BLE001
                record_error(f"{kind} {step.shape} {label}", exc)


def print_table() -> None:
    rows: dict[tuple[str, str], dict[str, float]] = {}
    for t in RESULTS["timings"]:
        rows.setdefault((t["shape"], t["op"]), {})[t["kind"]] = t["host_us"]
        if t["kind"] == "triton":
            rows[(t["shape"], t["op"])]["triton_wall"] = t["wall_us"]
    cols = ["triton", "triton_wall", "wrapper", "reference", "triton_floor"]
    cols = [c for c in cols if any(c in r for r in rows.values())]
    print("\nhost microseconds per call (median); wrapper = Triton launch replaced by a no-op")
    print(f"{'shape':14s} {'op':20s}" + "".join(f"{c:>13s}" for c in cols))
    for (shape, op), r in rows.items():
        cells = "".join(f"{r[c]:13.1f}" if c in r else f"{'-':>13s}" for c in cols)
        print(f"{shape:14s} {op:20s}{cells}")
    if RESULTS["errors"]:
        print(f"\n{len(RESULTS['errors'])} error(s):")
        for e in RESULTS["errors"]:
            print("  " + e)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out_path = args.out or (
        str(Path(os.environ["OUT"]) / "launch_overhead.json") if os.environ.get("OUT") else None
    )
    import torch  # noqa: PLC0415

    mode = args.mode if args.mode != "auto" else ("gpu" if torch.cuda.is_available() else "noop")
    if mode == "gpu" and not torch.cuda.is_available():
        print("--mode gpu needs CUDA", file=sys.stderr)
        return 2
    if mode == "noop" and not torch.cuda.is_available():
        # Lets triton import without a GPU driver; nothing is interpreted (every launch is a no-op).
        os.environ.setdefault("TRITON_INTERPRET", "1")
    import triton  # noqa: PLC0415

    import ops.triton as tops  # noqa: PLC0415
    from ops import reference  # noqa: PLC0415

    device = "cuda" if mode == "gpu" else "cpu"
    dtype = torch.bfloat16
    sync = torch.cuda.synchronize if mode == "gpu" else (lambda: None)
    shapes = [s for s in args.shapes.split(",") if s]
    RESULTS["meta"] = {
        "mode": mode,
        "device": torch.cuda.get_device_name() if mode == "gpu" else platform.machine(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "iters": args.iters,
        "repeats": args.repeats,
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "commit": os.environ.get("WEIR_COMMIT"),
    }
    print(f"launch_overhead: mode={mode} device={RESULTS['meta']['device']} triton={triton.__version__}")

    for shape in shapes:
        if shape not in SHAPES:
            RESULTS["errors"].append(f"unknown shape {shape!r}")
            continue
        try:
            step = Step(torch, shape, device, dtype, real_data=mode == "gpu")
        except Exception as exc:  # noqa: BLE001
            record_error(f"inputs {shape}", exc)
            continue
        print(f"\n=== {shape}: {step.num_tokens} tokens, {len(SHAPES[shape][0])} seqs", flush=True)
        if mode == "gpu":
            check_all(torch, tops, reference, step)
            run_timings(torch, {"triton": tops, "reference": reference}, step, args, sync)
        with noop_kernels() as replaced:
            RESULTS["meta"]["noop_kernels_replaced"] = replaced
            run_timings(torch, {"wrapper": tops}, step, args, sync)
        del step
        if mode == "gpu":
            torch.cuda.empty_cache()
    if mode == "gpu" and not over_budget(args.budget_s):
        bare_launch_floor(torch, args.iters, args.repeats)
    RESULTS["meta"]["elapsed_s"] = round(time.time() - START, 1)
    if out_path:
        Path(out_path).parent.mkdir(parents=True, exist_ok=True)
        Path(out_path).write_text(json.dumps(RESULTS, indent=1) + "\n")
        print(f"wrote {out_path}")
    print_table()
    return 0 if not RESULTS["errors"] and all(c["ok"] for c in RESULTS["checks"]) else 1


if __name__ == "__main__":
    raise SystemExit(main())
