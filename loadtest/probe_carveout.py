"""Does one kernel launch slow the decode graphs replayed after it? (issue 17: the skinny GEMM's batch-1 cost)

With WEIR_SKINNY_GEMM=1 every decode graph without a skinny launch (sizes 1 and 32-256, 256 captured
before any skinny graph) replayed 1.2-2.0% slower on an H100 (`09fb917`, K1 --replay-sizes). One guess:
the SMs' split of their on-chip memory between L1 and shared memory ("carveout"), which the driver sets
for a kernel that needs a lot of shared memory (the skinny GEMM's 100-200 KB launches) and may keep for
the kernels after it that state no preference of their own.

So, on one engine (the graphs captured as the environment sets them), the decode graphs at --sizes are
timed alone (back to back, on their capture's padding-only batch) after each of:

    captured      nothing more
    skinny_big    a skinny GEMM launched eagerly with ~200 KB of shared memory
    l1_pref       a small Triton kernel whose preferred carveout is set to 0 (all L1) by the driver API
    skinny_48kb   a skinny GEMM of under 48 KB a block
    l1_pref_again as l1_pref
    cublas        a 256-row cuBLAS GEMM (torch.mm)
    l1_pref_last  as l1_pref

If the times move with what ran last, the state is the device's and a launch can set it back. On an
H100 at `fd671cf` they did not (every size within 0.2% after every launch, both settings), so the cost
is fixed by the time the graphs first replay: `--before-build` launches a skinny GEMM before the
engine exists, to see whether that alone slows the graphs it then captures: it did not (`7845213`:
sizes 1-256 within 0.15% of the engine without it, the engine with WEIR_SKINNY_GEMM=1 1.6% / 2.1% / 1.2%
slower at 1 / 32 / 256 in the same call). `skinny_big_graph` keeps a CUDA graph holding that launch, and
that does it (`4c77e0a`, H100): the engine without the skinny GEMM, built after such a graph exists, replays
its graphs 1 / 8 / 32 / 256 in 5.102 / 5.585 / 5.727 / 8.234 ms against 5.012 / 5.448 / 5.609 / 8.125
without it, the engine with the skinny GEMM 5.098 / - / 5.727 / 8.223. Next: `skinny_48kb_graph` (12 KB of
shared memory) and `fp8_skinny_graph` (72 KB), to see whether the launch's shared memory decides it. They
slowed it as much, and so did `cublas_graph` (a kept graph of one cuBLAS GEMM), where `alloc` (the same
tensors kept, no graph) did not (`701f95a`): any CUDA graph made before the engine and kept costs the
engine's graphs ~1.5%, whatever it holds. The steps after the l1_pref ones capture such graphs after the
engine's (own pool, the engine's pool) and drop them: does the cost come and go with the graph? It came
with the first such graph (one Triton kernel, on torch's default capture stream) and stayed after it was
dropped (`c0f7e7b`); the engine with the skinny GEMM was slow from the start and stayed as slow.
`--after-build` runs one candidate action first, in a process of its own: the first work on a third
stream (one eager kernel on a new stream, or a graph captured on torch's default capture stream) puts the
engine without the skinny GEMM at the skinny engine's speed for good; a new stream with no work, a new
segment, empty_cache, a graph captured on the engine's own stream (own pool, the engine's pool, even one
holding the 200 KB skinny launch) do not (`128eda3`, `38bd8b1`). `--trace-streams` showed both engines
launching on the default and capture streams only (`1e62b78`), so what puts the skinny engine in that
state is still open; next: `--after-build skinny_engine_stream` / `touch_engine_stream` (an eager launch on
the capture stream, where the engine's warm-ups run them) and `--warm-up-stream default` (the warm-ups on
the default stream, where an eager skinny launch left the graphs fast). Results: loadtest/results/graph-stream-state-h100-2026-12-06-701f95a/.

    WEIR_SKINNY_GEMM=0 python loadtest/probe_carveout.py --shape llama3-8b --out carveout_off.json
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine.worker.cuda_graphs import capture_stream  # noqa: E402
from loadtest.common import (  # noqa: E402
    Report,
    add_common_args,
    build_llm,
    default_max_model_len,
    engine_kwargs,
    engine_runner,
    install_signal_handlers,
    phase,
    resolve_model,
)
from loadtest.decode_breakdown import graph_replay_ms  # noqa: E402

CU_FUNC_ATTRIBUTE_PREFERRED_SHARED_MEMORY_CARVEOUT = 9  # cuda.h's CUfunction_attribute


def set_carveout(function_handle: int, percent: int) -> int:
    """cuFuncSetAttribute(function, PREFERRED_SHARED_MEMORY_CARVEOUT, percent): the driver's result code."""
    libcuda = ctypes.CDLL("libcuda.so.1")
    return int(
        libcuda.cuFuncSetAttribute(
            ctypes.c_void_p(function_handle),
            ctypes.c_int(CU_FUNC_ATTRIBUTE_PREFERRED_SHARED_MEMORY_CARVEOUT),
            ctypes.c_int(percent),
        )
    )


def _l1_pref_kernel() -> Any:
    import triton
    import triton.language as tl

    @triton.jit
    def _touch(x_ptr, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        tl.store(x_ptr + offs, tl.load(x_ptr + offs, mask=offs < n) + 1.0, mask=offs < n)

    return _touch


def weight_placement(runner: Any) -> dict[str, Any]:
    """Where the engine's weights and KV cache landed: does a kept graph move them (the GPU's pages are 2 MB)?"""
    import torch

    params = list(runner.model.parameters())
    two_mb = 1 << 21
    stack = getattr(runner, "kv_cache_stack", None)
    segments = torch.cuda.memory_snapshot()
    return {
        "num_graphs": getattr(runner.graph_runner, "num_graphs", None),
        "memory_pools": len({tuple(seg.get("segment_pool_id", ())) for seg in segments}),
        "memory_segments": len(segments),
        "num_params": len(params),
        "first_param_ptr_mod_2mb": params[0].data_ptr() % two_mb,
        "params_2mb_aligned": sum(p.data_ptr() % two_mb == 0 for p in params),
        "largest_param_ptr_mod_2mb": max(params, key=lambda p: p.numel()).data_ptr() % two_mb,
        "kv_ptr_mod_2mb": stack.data_ptr() % two_mb if isinstance(stack, torch.Tensor) else None,
        "kv_bytes": stack.numel() * stack.element_size() if isinstance(stack, torch.Tensor) else None,
        "reserved_bytes": torch.cuda.memory_reserved(),
    }


def trace_streams() -> dict[str, Any]:
    """Record, from now on, each stream a Triton kernel is launched on (its first kernels' names) and
    where each torch.cuda.Stream is made: the first work on a third stream slows every decode graph."""
    import traceback

    import torch
    from triton import knobs

    launches: dict[int, dict[str, Any]] = {}
    made: list[dict[str, Any]] = []

    def on_launch(metadata: Any) -> None:
        data = metadata.get()
        entry = launches.setdefault(int(data["stream"]), {"launches": 0, "first": [], "capturing": False})
        entry["launches"] += 1
        entry["capturing"] |= torch.cuda.is_current_stream_capturing()
        if len(entry["first"]) < 4 and data["name"] not in entry["first"]:
            entry["first"].append(data["name"])

    knobs.runtime.launch_enter_hook = on_launch
    original_new = torch.cuda.Stream.__new__

    def recording_new(cls: Any, *args: Any, **kwargs: Any) -> Any:
        stream = original_new(cls, *args, **kwargs)  # also each wrapper current_stream() returns
        if all(entry["stream"] != stream.cuda_stream for entry in made):  # where each handle first appears
            frames = traceback.extract_stack(limit=6)[:-1]
            at = [f"{f.filename}:{f.lineno} {f.name}" for f in frames]
            made.append({"stream": stream.cuda_stream, "at": at})
        return stream

    torch.cuda.Stream.__new__ = recording_new
    return {"triton_launches_by_stream": launches, "streams_made": made}


def warm_up_on_default_stream() -> None:
    """The engines built from now on run their pre-capture warm-up forwards on the current (default)
    stream instead of the capture stream: does an eager skinny launch on the capture stream put the engine
    in the slow state (a skinny launch eagerly on the default stream did not)? Captures are unchanged."""
    import time

    import torch

    from engine.worker.cuda_graphs import CUDAGraphRunner

    def warm_up(self: Any, step: Any, stream: Any, label: str) -> None:
        t0 = time.perf_counter()
        torch.cuda.current_stream(self.device).wait_stream(stream)
        self.forward(step.input_ids, step.positions, step.metadata)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        seconds = time.perf_counter() - t0
        self.warmup_seconds += seconds
        self.warmup_by_step[label] = seconds

    CUDAGraphRunner._warm_up = warm_up


def run_probe(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from ops.triton.skinny_gemm import SHARED_BYTES, skinny_gemm

    model = resolve_model(args)
    traced = trace_streams() if args.trace_streams else None
    if args.warm_up_stream == "default":
        warm_up_on_default_stream()
    kept: list[Any] = []  # a graph made before the engine, alive until the end
    if args.before_build != "none":  # launched before the engine loads, captures and first replays its graphs
        x, weight = torch.randn(8, 4096, device=model.device), torch.randn(4096, 4096, device=model.device)
        x, weight = x.to(torch.bfloat16), weight.to(torch.bfloat16)
        w8 = (weight.float() / weight.float().abs().amax(dim=1, keepdim=True) * 448).to(torch.float8_e4m3fn)
        s8 = torch.ones(4096, device=model.device)
        launches = {
            "skinny_big": lambda: skinny_gemm(x, weight, block_n=64, block_k=256, split_k=1, num_stages=5),
            "skinny_48kb": lambda: skinny_gemm(x, weight, block_n=32, block_k=128, split_k=1, num_stages=2),
            # the FP8 layers' o_proj launch (72 KB): FP8 engines showed no such cost at batch 1
            "fp8_skinny": lambda: skinny_gemm(x, w8, s8, block_n=64, block_k=256, split_k=4, num_stages=3),
            "cublas": lambda: torch.nn.functional.linear(x, weight),
        }
        if args.before_build == "alloc":  # the same tensors kept, nothing launched: placement alone
            kept += [x, weight, w8, s8]
        else:
            launch = launches[args.before_build.removesuffix("_graph")]
            launch()
            torch.cuda.synchronize()
        if args.before_build.endswith("_graph"):  # captured (instantiated) and replayed once, then kept
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                launch()
            graph.replay()
            torch.cuda.synchronize()
            kept += [graph, x, weight, w8, s8]
        del x, weight, w8, s8
    llm, _ = build_llm(
        model, engine_kwargs(args, model, max_model_len=default_max_model_len(args, model, 64))
    )
    runner = engine_runner(llm)
    device = torch.device(model.device)
    if traced is not None:  # what the engine's build launched where (the probe's own launches come after)
        print(f"[probe] streams during the build: {traced}")
        streams_at_build = {
            "default_stream": torch.cuda.default_stream(device).cuda_stream,
            "capture_stream": capture_stream(device).cuda_stream,
            "triton_launches_by_stream": {
                str(k): dict(v) for k, v in traced["triton_launches_by_stream"].items()
            },
            "streams_made": list(traced["streams_made"]),
        }
        from triton import knobs

        knobs.runtime.launch_enter_hook = None
    placement = weight_placement(runner)
    print(f"[probe] placement {placement}")
    x8 = torch.randn(8, 4096, device=device, dtype=torch.bfloat16)
    w = torch.randn(4096, 4096, device=device, dtype=torch.bfloat16)
    a256 = torch.randn(256, 4096, device=device, dtype=torch.bfloat16)
    flat = torch.zeros(1 << 16, device=device)
    touch = _l1_pref_kernel()
    results: dict[str, Any] = {
        "order": [], "times_ms": {}, "carveout_rc": None, "shared_bytes": {}, "placement": placement,
    }  # fmt: skip

    def l1_pref() -> None:
        compiled = touch[(flat.numel() // 1024,)](flat, flat.numel(), BLOCK=1024)
        handle = getattr(compiled, "function", None)  # the CUfunction, once Triton loaded it
        if results["carveout_rc"] is None and handle is not None:
            results["carveout_rc"] = set_carveout(handle, 0)
            compiled = touch[(flat.numel() // 1024,)](flat, flat.numel(), BLOCK=1024)  # with it set

    made_after: list[Any] = []  # graphs captured after the engine's, kept until dropped

    engine_pool = getattr(runner.graph_runner, "pool", None)
    engine_stream = capture_stream(device)

    def graph_after(launch: Any, pool: Any = None, stream: Any = None) -> None:
        """Capture `launch` into a graph kept alive (no stream: torch's default capture stream, a third one)."""
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool, stream=stream):
            out = launch()
        graph.replay()
        made_after.extend([graph, out])

    def on_stream(launch: Any, side: Any) -> None:
        """`launch` eagerly on stream `side`, ordered after and before the current stream's work."""
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            launch()
        torch.cuda.current_stream(device).wait_stream(side)
        made_after.append(side)

    def drop_after() -> None:
        made_after.clear()
        torch.cuda.synchronize()

    def touch_once() -> Any:
        return touch[(flat.numel() // 1024,)](flat, flat.numel(), BLOCK=1024)

    def skinny_big() -> Any:
        return skinny_gemm(x8, w, block_n=64, block_k=256, split_k=1, num_stages=5)

    def fresh_segment() -> None:  # a new cudaMalloc'd segment, kept (outside any pool the engine has)
        made_after.append(torch.empty(64 << 20, dtype=torch.uint8, device=device))

    def clear_cache() -> None:  # what torch.cuda.graph's entry does before each capture
        gc.collect()
        torch.cuda.empty_cache()

    first_actions = {
        "touch_engine_stream": lambda: on_stream(touch_once, engine_stream),
        "skinny_engine_stream": lambda: on_stream(skinny_big, engine_stream),
        # a new stream's first work: one eager kernel on it, no graph
        "stream_used": lambda: on_stream(touch_once, torch.cuda.Stream(device)),
        "graph_private_pool": lambda: graph_after(touch_once, stream=engine_stream),
        "skinny_graph_engine_stream": lambda: graph_after(skinny_big, pool=engine_pool, stream=engine_stream),
        "stream": lambda: made_after.append(torch.cuda.Stream(device)),
        "segment": fresh_segment,
        "empty_cache": clear_cache,
        # as the engine captures: its stream, its pool
        "graph_engine_stream": lambda: graph_after(touch_once, pool=engine_pool, stream=engine_stream),
        "graph": lambda: graph_after(touch_once),
    }
    steps = {"captured": lambda: None}
    if args.after_build != "none":  # first, in a process of its own: which of these flips the graphs' speed?
        steps[f"first_{args.after_build}"] = first_actions[args.after_build]
    steps |= {
        "skinny_big": skinny_big,
        "l1_pref": l1_pref,
        "skinny_48kb": lambda: skinny_gemm(x8, w, block_n=32, block_k=128, split_k=1, num_stages=2),
        "l1_pref_again": l1_pref,
        "cublas": lambda: torch.mm(a256, w),
        "l1_pref_last": l1_pref,
        # graphs captured now, after the engine's: does one slow the engine's at once, and dropping it undo it?
        "touch_graph_after": lambda: graph_after(touch_once),
        "touch_graph_dropped": drop_after,
        "cublas_graph_after": lambda: graph_after(lambda: torch.mm(x8, w)),
        "cublas_graph_dropped": drop_after,
        "touch_graph_engine_pool": lambda: graph_after(touch_once, pool=engine_pool),
        "engine_pool_dropped": drop_after,
    }
    with torch.inference_mode():
        for label, launch in steps.items():
            launch()
            torch.cuda.synchronize()
            results["order"].append(label)
            results["times_ms"][label] = {
                str(size): round(graph_replay_ms(runner, size, on_dummy_step=True) or float("nan"), 4)
                for size in args.sizes
            }
            print(
                f"[probe] after {label:14s} "
                + " ".join(f"{s}:{v}" for s, v in results["times_ms"][label].items())
            )
    results["shared_bytes"] = {str(k): v for k, v in SHARED_BYTES.items()}
    if traced is not None:
        results["streams_at_build"] = streams_at_build
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--sizes", type=lambda v: [int(x) for x in v.split(",") if x], default=[1, 8, 32, 256],
        help="decode graph sizes to time after each launch",
    )  # fmt: skip
    p.add_argument(
        "--before-build",
        choices=(
            "none",
            "skinny_big",
            "skinny_48kb",
            "skinny_big_graph",
            "skinny_48kb_graph",
            "fp8_skinny_graph",
            "cublas_graph",
            "alloc",
        ),
        default="none",
        help="a skinny GEMM launched before the engine is built (does a launch before the graphs exist "
        "slow them, where one after does not?); *_graph: also captured into a CUDA graph kept alive (does "
        "an instantiated graph holding it slow the engine's graphs?), cublas_graph its cuBLAS control; alloc: "
        "the same tensors kept, nothing launched (does the weights' placement decide it?)",
    )
    p.add_argument(
        "--after-build",
        choices=(
            "none",
            "stream",
            "stream_used",
            "segment",
            "empty_cache",
            "graph_engine_stream",
            "graph_private_pool",
            "skinny_graph_engine_stream",
            "touch_engine_stream",
            "skinny_engine_stream",
            "graph",
        ),
        default="none",
        help="one action right after the first timing, before any other: a new CUDA stream, a new 64 MiB "
        "segment, gc + empty_cache, a graph captured as the engine captures (its stream and pool), a graph on "
        "torch's default capture stream (which any later graph slowed the engine's graphs, for good?)",
    )
    p.add_argument(
        "--warm-up-stream", choices=("capture", "default"), default="capture",
        help="where the engine's pre-capture warm-up forwards run (default: a patched runner, this probe only)",
    )  # fmt: skip
    p.add_argument(
        "--trace-streams", action="store_true",
        help="record the streams the engine's build launched Triton kernels on, and where streams were made",
    )  # fmt: skip
    add_common_args(p, default_shape="llama3-8b")
    args = p.parse_args(argv)
    install_signal_handlers()
    model = resolve_model(args)
    report = Report("carveout", args, model)
    if model.device != "cuda":
        report.error("probe", RuntimeError("needs a CUDA GPU (CUDA graphs, the driver API)"))
        return report.finish()
    with phase(report, "probe", required=False):
        report["results"]["probe"] = run_probe(args)
    return report.finish()


if __name__ == "__main__":
    sys.exit(main())
