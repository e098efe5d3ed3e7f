"""Where the host's time goes in one offline run on the real engine (a GPU): Python's cProfile around
B1's beam search or B2's n-way sampling (loadtest/bench_beam.py's workloads), its top functions by
own time and by cumulative time, with the step loop's phases.

    python loadtest/profile_host.py --shape llama3-8b --workload beam --out host_beam.json

The GPU's kernels do not show here (loadtest/profile_kernels.py has them); what shows is the host's
own work and any place it waits for the device (a synchronizing call shows as a large own time in a
torch function).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from loadtest.bench_beam import _prompts  # noqa: E402
from loadtest.common import (  # noqa: E402
    Report,
    add_common_args,
    build_llm,
    engine_info,
    engine_kwargs,
    free_engine,
    install_signal_handlers,
    phase,
    profile_rows,
    resolve_model,
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workload", choices=("beam", "n"), default="beam")
    p.add_argument("--num-prompts", type=int, default=64)
    p.add_argument("--input-len", type=int, default=256)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--width", type=int, default=4, help="beam width, or n")
    p.add_argument("--top", type=int, default=40, help="functions listed per ordering")
    add_common_args(p, default_shape="llama3-8b")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    model = resolve_model(args)
    report = Report("H", args, model)
    report["workload"] = {
        k: getattr(args, k) for k in ("workload", "num_prompts", "input_len", "output_len", "width")
    }
    prompts = _prompts(args.num_prompts, args.input_len, args.seed, min(10000, model.vocab_size))
    kwargs = engine_kwargs(
        args, model, max_model_len=args.max_model_len or args.input_len + args.output_len + 8
    )
    llm, build_s = build_llm(model, kwargs)
    try:
        from engine import BeamSearchParams, SamplingParams

        report["engine"] = {**engine_info(llm), "engine_build_s": round(build_s, 3)}

        def run(output_len: int) -> None:
            if args.workload == "beam":
                llm.beam_search(prompts, BeamSearchParams(args.width, output_len, ignore_eos=True))
            else:
                params = SamplingParams(n=args.width, temperature=1.0, max_tokens=output_len, ignore_eos=True)
                llm.generate(prompts, params, use_tqdm=False)

        with phase(report, "warmup"):
            run(8)
        with phase(report, "profile"):
            times = llm.llm_engine.step_times
            before = times.as_dict()
            prof = cProfile.Profile()
            t0 = time.perf_counter()
            prof.enable()
            run(args.output_len)
            prof.disable()
            elapsed = time.perf_counter() - t0
            after = times.as_dict()
            stats = pstats.Stats(prof, stream=io.StringIO())
            report["results"] = {
                "elapsed_s_under_profiler": round(elapsed, 3),
                "step_loop": {k: round(after[k] - before[k], 4) for k in after},
                "by_own_time": profile_rows(stats, "tottime", args.top),
                "by_cumulative_time": profile_rows(stats, "cumulative", args.top),
            }
            for row in report["results"]["by_own_time"][:25]:
                print(
                    f"{row['own_s']:8.3f} {row['cumulative_s']:8.3f} {row['calls']:8d}  {row['function']}",
                    flush=True,
                )
    finally:
        free_engine(llm)
    return report.finish()


if __name__ == "__main__":
    install_signal_handlers()
    raise SystemExit(main())
