"""Which Triton kernels compile during start-up, when, for how long, and for which specialization.

U1 (start-up to the first request) spends seconds of its CUDA-graph warm-up on Triton JIT compiles when
the Triton cache is cold. This builds the offline engine the way the server does (same defaults) with
an empty TRITON_CACHE_DIR, records every compile through Triton's JIT hooks (kernel, the specialized
signature, seconds), and marks the start of each CUDA-graph warm-up forward, so each compile is
attributed to the phase that triggered it. Two kernels' compiles of the same function differ in a
constexpr or in how an int argument was specialized (Triton compiles an int argument equal to 1 as a
constant and one divisible by 16 with an alignment hint; `do_not_specialize` turns both off): the
table prints the argument specializations that differ from the kernel's first compile.

    python loadtest/trace_compiles.py --shape llama3-8b --out $OUT/compiles.json

On CPU (`--device cpu`, the CI smoke test) the engine runs the torch kernels: nothing compiles, and the
run checks that the script's hooks, marks and report work.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))


def _difference(first: str, other: str) -> str:
    """The comma-separated items of `other` that `first` lacks (what made this compile new)."""
    seen = set(first.replace("{", ",").replace("}", ",").split(","))
    new = [p.strip() for p in other.replace("{", ",").replace("}", ",").split(",") if p not in seen]
    return "; ".join(p for p in new if p) or "options only"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shape", default="llama3-8b")
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--out", default=None)
    parser.add_argument("--keep-cache", action="store_true", help="use the existing Triton cache")
    args = parser.parse_args()
    if not args.keep_cache:
        os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="weir_triton_cold_")

    import triton

    from engine.worker import cuda_graphs
    from loadtest.common import write_json
    from loadtest.model_shapes import shape_dir

    origin = time.perf_counter()
    marks: list[tuple[float, str]] = [(0.0, "before graphs")]
    compiles: list[dict[str, Any]] = []
    started: dict[Any, float] = {}

    def specialization(kwargs: dict[str, Any]) -> str:
        """The compile's constexprs and argument attributes (alignment / equal-to-1 hints), as text:
        Triton's own `repr` of the argument types is empty on some versions."""
        compile_info = kwargs.get("compile") or {}
        constants = compile_info.get("constants") or {}
        configs = compile_info.get("configs") or [None]
        return f"constants={dict(sorted((str(k), v) for k, v in constants.items()))} attrs={configs[0]}"

    def before(*_args: Any, **kwargs: Any) -> bool:
        started[kwargs.get("key", id(kwargs))] = time.perf_counter()
        return False  # compile as usual

    def after(*_args: Any, **kwargs: Any) -> None:
        now = time.perf_counter()
        key = kwargs.get("key", id(kwargs))
        name = getattr(kwargs.get("fn"), "name", "?")
        compiles.append(
            {
                "at_s": round(now - origin, 3),
                "seconds": round(now - started.pop(key, now), 3),
                "kernel": name,
                "signature": specialization(kwargs),
                "phase": marks[-1][1],
            }
        )

    knobs = getattr(triton, "knobs", None)
    if knobs is not None and hasattr(knobs.runtime, "jit_cache_hook"):
        knobs.runtime.jit_cache_hook = before
        knobs.runtime.jit_post_compile_hook = after
    else:  # older Triton: one hook, called before the compile only
        triton.runtime.jit.JITFunction.cache_hook = lambda *a, **k: (before(*a, **k), after(*a, **k))[0]

    graphs_class = cuda_graphs.CUDAGraphRunner
    plain, mixed = graphs_class.dummy_step, graphs_class.dummy_mixed_step

    def dummy_step(self: Any, batch_size: int) -> Any:
        marks.append((time.perf_counter() - origin, f"decode {batch_size}"))
        return plain(self, batch_size)

    def dummy_mixed_step(self: Any, num_tokens: int) -> Any:
        marks.append((time.perf_counter() - origin, f"mixed {num_tokens}"))
        return mixed(self, num_tokens)

    graphs_class.dummy_step, graphs_class.dummy_mixed_step = dummy_step, dummy_mixed_step
    from engine import LLM, SamplingParams

    t0 = time.perf_counter()
    dtype = "bfloat16" if args.device == "cuda" else "float32"
    llm = LLM(str(shape_dir(args.shape)), dtype=dtype, device=args.device, load_format="dummy")
    build_s = time.perf_counter() - t0
    marks.append((time.perf_counter() - origin, "after graphs"))
    first = time.perf_counter()
    llm.generate([[1, 2, 3, 4]], SamplingParams(max_tokens=4, temperature=0.0))
    marks.append((time.perf_counter() - origin, f"first request {time.perf_counter() - first:.3f}s"))

    # Per kernel: what differs from its first compile (constexprs or argument attributes).
    first_sig: dict[str, str] = {}
    for c in compiles:
        if c["kernel"] not in first_sig:
            first_sig[c["kernel"]] = c["signature"]
            c["differs"] = "first"
        else:
            c["differs"] = _difference(first_sig[c["kernel"]], c["signature"])
    by_phase: dict[str, float] = defaultdict(float)
    for c in compiles:
        by_phase[c["phase"]] += c["seconds"]
    print(f"engine built in {build_s:.2f}s; {len(compiles)} compiles, {sum(by_phase.values()):.2f}s in all")
    for phase, seconds in sorted(by_phase.items(), key=lambda kv: -kv[1]):
        print(f"  {phase:>16}: {seconds:6.2f}s")
    for c in compiles:
        print(
            f"{c['at_s']:8.2f} {c['seconds']:6.3f}s {c['phase']:>14}  {c['kernel']}  [{c['differs'][:300]}]"
        )
    # With WEIR_COMPILE_WORKERS: what the compile pool took off this process (engine/worker/compile_ahead.py).
    ahead = getattr(getattr(llm.llm_engine.executor, "runner", None), "compile_ahead_figures", {})
    if ahead:
        print(f"compile ahead: {ahead}")
    if args.out:
        write_json(
            args.out,
            {
                "build_s": build_s,
                "marks": marks,
                "compiles": compiles,
                "by_phase": by_phase,
                "compile_ahead": ahead,
            },
        )


if __name__ == "__main__":
    main()
