"""Host (Python) cost of one engine step, by phase, per running request: what bounds a decode step
once the GPU is fast (large batches of a small model; the decode tail of a serving run).

    python loadtest/bench_host.py --batch-size 256 --out host.json

Builds a tiny random model (tests/tiny_models.py) so the forward pass costs little, fills the engine
with `--batch-size` decoding requests, and times `--steps` steady-state steps with every phase wrapped:
schedule, the runner's input building and state update, sampling metadata, the engine's update (with
its per-request outputs) and the rest. Outputs are "cumulative" (a streaming server's case) unless
`--final-only`. Reported per step (ms) and per request (us); on a CPU the forward is reported too but
is not the point. Same machine, same flags: the figures compare host-path changes; CI runs a small
case as a smoke test.
"""

from __future__ import annotations

import argparse
import collections
import json
import platform
import random
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

import engine.worker.model_runner as model_runner_module  # noqa: E402
from engine import SamplingParams  # noqa: E402
from engine.config import EngineConfig  # noqa: E402
from engine.llm_engine import LLMEngine  # noqa: E402
from tests.tiny_models import build_model, build_tokenizer  # noqa: E402

# Phases timed, as (object attribute path, label). Nested ones are inside "launch" or "update". "worker"
# is engine.worker.model_runner: the module functions it calls once per step, patched where it looks them up.
_PHASES = (
    ("engine.schedule", "schedule"),
    ("engine.update", "update (engine)"),
    ("engine.output_processor._make_output", "  of which outputs"),
    ("engine.scheduler.update_from_output", "  of which scheduler update"),
    ("worker.update_states", "runner state diff"),
    ("runner._build_inputs", "runner input building"),
    ("runner._forward", "forward"),
    ("runner.compute_logits", "logits"),
    ("runner.sampler.sample", "sampling"),
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument(
        "--block-size",
        type=int,
        default=16,
        help="KV block size: a smaller one gives each sequence as many blocks as a long context would "
        "(8 at least; the tiny models stop at 256 positions, and T1's ~870-token contexts are ~55 blocks of 16)",
    )
    p.add_argument("--family", default="qwen3", help="a family of tests/tiny_models.py")
    p.add_argument("--device", default="cpu")
    p.add_argument("--final-only", action="store_true", help='output_kind "final_only" (LLM.generate)')
    p.add_argument("--sync", action="store_true", help="async_scheduling off")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--out", default=None, help="write the report as JSON here")
    return p


def _wrap(root: dict[str, Any], path: str, label: str, seconds: collections.Counter) -> None:
    owner_path, name = path.rsplit(".", 1)
    owner = root[owner_path.split(".")[0]]
    for part in owner_path.split(".")[1:]:
        owner = getattr(owner, part)
    fn: Callable[..., Any] = getattr(owner, name)

    def timed(*args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            seconds[label] += time.perf_counter() - t0

    setattr(owner, name, timed)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    root_dir = Path(tempfile.mkdtemp(prefix="weir-host-"))
    model_dir = build_model(args.family, root_dir / args.family, build_tokenizer(root_dir / "tokenizer"))
    bs = args.batch_size
    max_model_len = args.prompt_len + args.steps + 16
    engine = LLMEngine(
        EngineConfig(
            model=str(model_dir),
            device=args.device,
            dtype="float32",
            max_num_seqs=bs,
            max_num_batched_tokens=max(bs * args.prompt_len, 64),
            num_kv_blocks=bs * (-(-max_model_len // args.block_size) + 1),
            block_size=args.block_size,
            max_model_len=max_model_len,
            async_scheduling=not args.sync,
        )
    )
    rng = random.Random(0)
    params = SamplingParams(
        temperature=0.0,
        max_tokens=args.steps + 8,
        ignore_eos=True,
        output_kind="final_only" if args.final_only else "cumulative",
    )
    for i in range(bs):
        engine.add_request(str(i), [rng.randrange(3, 500) for _ in range(args.prompt_len)], params)
    for _ in range(3):  # the prefill and the first decodes, untimed
        engine.step()

    seconds: collections.Counter = collections.Counter()
    root = {"engine": engine, "runner": engine.executor.runner, "worker": model_runner_module}
    for path, label in _PHASES:
        _wrap(root, path, label, seconds)
    build_md = model_runner_module.build_sampling_metadata

    def timed_md(*a: Any, **k: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return build_md(*a, **k)
        finally:
            seconds["sampling metadata"] += time.perf_counter() - t0

    model_runner_module.build_sampling_metadata = timed_md
    t0 = time.perf_counter()
    for _ in range(args.steps):
        engine.step()
    total = time.perf_counter() - t0
    model_runner_module.build_sampling_metadata = build_md

    device_side = seconds["forward"] + seconds["logits"] + seconds["sampling"]
    top_level = (
        "schedule",
        "update (engine)",
        "runner state diff",
        "runner input building",
        "sampling metadata",
    )
    phases = {
        label: {
            "ms_per_step": round(1e3 * seconds[label] / args.steps, 3),
            "us_per_request": round(1e6 * seconds[label] / args.steps / bs, 2),
        }
        for _, label in (*_PHASES, (None, "sampling metadata"))
    }
    other = total - device_side - sum(seconds[k] for k in top_level)
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent
        ).stdout.strip()
    except OSError:
        commit = ""
    report = {
        "benchmark": "host",
        "commit": commit or None,
        "machine": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "args": vars(args),
        "step_ms": round(1e3 * total / args.steps, 3),
        "host_ms_per_step": round(1e3 * (total - device_side) / args.steps, 3),
        "host_us_per_request": round(1e6 * (total - device_side) / args.steps / bs, 2),
        "other_host_ms_per_step": round(1e3 * other / args.steps, 3),
        "phases": phases,
    }
    print(
        f"batch {bs}, {args.steps} steps: step {report['step_ms']} ms, host {report['host_ms_per_step']} ms "
        f"({report['host_us_per_request']} us per request), other host {report['other_host_ms_per_step']} ms"
    )
    for label, v in phases.items():
        print(f"  {label:30s} {v['ms_per_step']:8.3f} ms/step {v['us_per_request']:8.2f} us/request")
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
