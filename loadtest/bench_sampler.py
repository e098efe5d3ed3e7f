"""The sampler's draw on the GPU: the softmax path it replaced against ops.triton.sample_argmax.

For a batch of B rows over a Llama-3 vocabulary (128,256), times (triton.testing.do_bench, median,
L2 flushed between runs) the random draw after the noise is made:
  - torch: softmax, clamp, divide, argmax (the sampler before sample_argmax);
  - triton: ops.triton.sample_argmax (one pass over logits and noise);
and the greedy argmax (torch.argmax against sample_argmax without noise). Each pair is first checked
to pick the same indices as ops.reference.sample_argmax on the same noise (softmax / E and
logits - log E rank alike except at float32 near-ties, which the JSON counts).

    python loadtest/bench_sampler.py --out $OUT/sampler.json

`--device cpu` (the CI smoke test) runs the kernel under TRITON_INTERPRET=1 with a wall-clock timer:
the checks mean the same, the times nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402


def _softmax_draw(logits: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    probs = logits.softmax(dim=-1, dtype=torch.float32)
    return (probs / noise.clamp_min(torch.finfo(torch.float32).tiny)).argmax(dim=-1)


def _wall_clock(fn, reps: int = 3) -> float:  # noqa: ANN001
    """Milliseconds per call, median of a few: the CPU smoke run's stand-in for do_bench."""
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000)
    return sorted(times)[len(times) // 2]


def _measure(rows: int, vocab_size: int, device: str, do_bench, spec_fn, triton_fn) -> dict:  # noqa: ANN001
    g = torch.Generator(device=device).manual_seed(rows)
    logits = torch.randn(rows, vocab_size, device=device, generator=g) * 3  # [B, V] float32
    noise = torch.empty_like(logits).exponential_(generator=g)
    spec = spec_fn(logits, noise)
    row = {
        "rows": rows,
        "triton_equals_spec": bool(torch.equal(triton_fn(logits, noise), spec)),
        "softmax_path_differs_rows": int((_softmax_draw(logits, noise) != spec).sum()),
        "greedy_equals_torch": bool(torch.equal(triton_fn(logits, None), logits.argmax(dim=-1))),
        "draw_us_torch_softmax": 1000 * do_bench(lambda: _softmax_draw(logits, noise)),
        "draw_us_triton": 1000 * do_bench(lambda: triton_fn(logits, noise)),
        "greedy_us_torch": 1000 * do_bench(lambda: logits.argmax(dim=-1)),
        "greedy_us_triton": 1000 * do_bench(lambda: triton_fn(logits, None)),
        "noise_us_exponential": 1000 * do_bench(lambda: noise.exponential_()),
    }
    return {k: round(v, 2) if isinstance(v, float) else v for k, v in row.items()}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batch-sizes", default="1,8,64,256,640")
    parser.add_argument("--vocab-size", type=int, default=128256)
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if args.device == "cpu":
        os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported
        do_bench = _wall_clock
    else:
        from triton.testing import do_bench

    from ops import reference
    from ops.triton.sample_argmax import sample_argmax

    results = []
    for rows in (int(b) for b in args.batch_sizes.split(",")):
        row = _measure(rows, args.vocab_size, args.device, do_bench, reference.sample_argmax, sample_argmax)
        print(json.dumps(row), flush=True)
        results.append(row)
    if args.out:
        card = torch.cuda.get_device_name() if args.device == "cuda" else "cpu (smoke: times mean nothing)"
        Path(args.out).write_text(json.dumps({"card": card, "results": results}, indent=1))


if __name__ == "__main__":
    main()
