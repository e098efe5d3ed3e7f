"""How low S1's TTFT p99 at 16 req/s can go on a card, whatever the scheduler: a queueing bound.

S1 at a finite rate (BENCHMARKS.md) sends T2's requests (1,024 prompt / 128 output tokens) as a
Poisson stream, 240 of them at 16 req/s, and issue 17 asks for TTFT p99 <= 60 ms. A prompt's first
token needs its prefill, which on one GPU is compute-bound work (`--prefill-ms`, the time of one 1,024-
token prompt's forward at the card's measured prefill rate); prompts that arrive while another is
being prefilled wait for it. This simulates an idealized engine on that card, step by step, with no
host time, no HTTP, no async look-ahead: each step prefills up to `--prompts-per-step` waiting prompts
(first come, first served: with equal prompts no order shortens the tail) and decodes every running
request by one token; a prompt's first token is out when its step ends. Step times:

    prefill step:  k * prefill_ms + n * decode_ms_per_seq     (k prompts, n running decodes)
    decode step:   decode_ms + n * decode_ms_per_seq           (weights read once: L1's step at batch 1)

With `--decode-ms 0 --decode-ms-per-seq 0` it is the M/D/1 queue of the prefills alone (what any
engine must at least wait). 240 requests make a p99 the mean of the 238th and 239th TTFTs, so each
run's p99 varies: `--runs` runs with different arrival draws give its distribution, and the share of
runs that would meet `--target-ms`.

Defaults from H200 measurements: prefill 22.4 ms per 1,024 tokens (an 8,192-token step's kernels took
179.3 ms, loadtest/results/profile-h200-2026-12-01-7686b9b/; cuBLAS at 732 TFLOP/s, 74% of the card's
dense bf16 peak), decode 4.16 ms + 0.1 ms a sequence (L1: 4.26 ms at batch 1, ~5.8 ms at S1's ~16).

    python loadtest/s1_ttft_bound.py --out bound.json
    python loadtest/s1_ttft_bound.py --prefill-ms 16.6   # the card's dense peak, 989 TFLOP/s
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from loadtest.common import percentile  # noqa: E402


def simulate(
    prefill_ms: float,
    decode_ms: float,
    decode_ms_per_seq: float,
    rate: float,
    requests: int,
    output_len: int,
    prompts_per_step: int,
    seed: int,
) -> dict[str, list[float]]:
    """One run: each request's TTFT and every inter-token gap, in milliseconds."""
    rng = random.Random(seed)
    arrivals, t = [], 0.0
    for _ in range(requests):
        t += rng.expovariate(rate) * 1000.0
        arrivals.append(t)
    now, nxt = 0.0, 0
    waiting: list[int] = []
    left: dict[int, int] = {}  # running request -> decode tokens still to make
    last_token: dict[int, float] = {}
    ttft: list[float] = []
    itl: list[float] = []
    while nxt < requests or waiting or left:
        while nxt < requests and arrivals[nxt] <= now:
            waiting.append(nxt)
            nxt += 1
        if not waiting and not left:
            now = arrivals[nxt]  # idle until the next arrival
            continue
        k = min(prompts_per_step, len(waiting))
        step = (k * prefill_ms if k else decode_ms) + len(left) * decode_ms_per_seq
        now += step
        for r in list(left):
            itl.append(now - last_token[r])
            last_token[r] = now
            left[r] -= 1
            if not left[r]:
                del left[r]
        for r in waiting[:k]:
            ttft.append(now - arrivals[r])
            if output_len > 1:
                left[r], last_token[r] = output_len - 1, now
        del waiting[:k]
    return {"ttft": ttft, "itl": itl}


def bound(args: argparse.Namespace) -> dict:
    runs = [
        simulate(
            args.prefill_ms,
            args.decode_ms,
            args.decode_ms_per_seq,
            args.rate,
            args.requests,
            args.output_len,
            args.prompts_per_step,
            args.seed + i,
        )  # fmt: skip
        for i in range(args.runs)
    ]
    p99 = [percentile(r["ttft"], 99) for r in runs]
    p50 = [percentile(r["ttft"], 50) for r in runs]
    itl50 = [percentile(r["itl"], 50) for r in runs if r["itl"]]
    itl99 = [percentile(r["itl"], 99) for r in runs if r["itl"]]
    ttft_all = [x for r in runs for x in r["ttft"]]

    def spread(xs: list[float]) -> dict[str, float]:
        return {q: round(percentile(xs, p), 2) for q, p in (("p10", 10), ("median", 50), ("p90", 90))}

    return {
        "params": {k: v for k, v in vars(args).items() if k != "out"},
        "ttft_p99_ms_over_runs": spread(p99),
        "ttft_p50_ms_over_runs": spread(p50),
        "itl_p50_ms_over_runs": spread(itl50) if itl50 else None,
        "itl_p99_ms_over_runs": spread(itl99) if itl99 else None,
        "ttft_mean_ms": round(statistics.fmean(ttft_all), 3),
        "share_of_runs_meeting_target": round(sum(p <= args.target_ms for p in p99) / len(p99), 4),
    }


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prefill-ms", type=float, default=22.4, help="one 1,024-token prompt's prefill")
    p.add_argument("--decode-ms", type=float, default=4.16, help="a decode step's fixed time")
    p.add_argument("--decode-ms-per-seq", type=float, default=0.1, help="each running sequence's share")
    p.add_argument("--rate", type=float, default=16.0, help="Poisson arrivals per second")
    p.add_argument("--requests", type=int, default=240)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--prompts-per-step", type=int, default=1, help="prompts one prefill step may take")
    p.add_argument("--runs", type=int, default=300)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--target-ms", type=float, default=60.0, help="issue 17's TTFT p99 at 16 req/s")
    p.add_argument("--out", type=Path, help="write the result as JSON here")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    for name in ("prefill_ms", "decode_ms", "decode_ms_per_seq"):
        if getattr(args, name) < 0:
            build_parser().error(f"--{name.replace('_', '-')} must be >= 0")
    for name in ("rate", "requests", "output_len", "prompts_per_step", "runs"):
        if getattr(args, name) <= 0:
            build_parser().error(f"--{name.replace('_', '-')} must be > 0")
    result = bound(args)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
