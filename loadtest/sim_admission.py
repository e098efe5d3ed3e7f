"""The scheduler alone on a workload, with a step-time model instead of a GPU: preemptions, tokens computed
twice, steps and modelled seconds for each admission reserve (EngineConfig.admission_reserve_tokens).

The real Scheduler runs every step; a fake runner returns one token per sequence that reached its end
(a hidden output length stops a request early where `--hidden-output` is given: max_tokens then is
the context's rest, as the server resolves a chat request without one). A step's modelled time is
max(weights read, tokens x compute per token) + context tokens read by its decodes x KV bytes per token
over the bandwidth: on an H100 with Llama-3-8B (bf16: 5.4 ms, 22.9 us, 43.7 ns) T2 with no reserve (0)
modelled 33.7 s with 45 preemptions where the GPU took 34.6 s with 44
(loadtest/results/p1-families-h100-2026-12-07-ef5c794/, dt11a.json).

    python loadtest/sim_admission.py --reserves 0,64,256                       # T2 on an H100's cache
    python loadtest/sim_admission.py --num-requests 600 --input-len 50,1500 --hidden-output 20,2000 \\
        --max-num-batched-tokens 2048                                          # chat-like, unknown lengths
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine.config import CacheConfig, SchedulerConfig  # noqa: E402
from engine.core.request import Request  # noqa: E402
from engine.core.sampling_params import SamplingParams  # noqa: E402
from engine.core.scheduler import Scheduler  # noqa: E402
from engine.core.scheduler_output import ModelRunnerOutput  # noqa: E402

STOP = 2  # the token the fake runner samples at a request's hidden length
OTHER = 11


def _span(text: str) -> tuple[int, int]:
    lo, _, hi = text.partition(",")
    return int(lo), int(hi or lo)


def simulate(args: argparse.Namespace, reserve: int) -> dict:
    config = SchedulerConfig(
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        max_model_len=args.max_model_len,
        async_scheduling=False,
        max_waiting_requests=1 << 30,
        max_waiting_tokens=1 << 40,
        mixed_step_token_cap=512,
        mixed_step_fit_backlog_tokens=8192,
        admission_reserve_tokens=reserve,
    )
    cache = CacheConfig(
        block_size=args.block_size,
        kv_cache_dtype="bfloat16",
        enable_prefix_caching=True,
        gpu_memory_utilization=0.9,
        cpu_kv_cache_gb=1.0,
        num_kv_blocks_override=None,
        num_kv_blocks=args.num_kv_blocks,
    )
    sched = Scheduler(config, cache)
    rng = random.Random(args.seed)
    hidden: dict[str, int] = {}
    for i in range(args.num_requests):
        prompt = [rng.randrange(OTHER + 1, 10_000) for _ in range(rng.randint(*_span(args.input_len)))]
        if args.hidden_output:
            hidden[str(i)] = rng.randint(*_span(args.hidden_output))
            params = SamplingParams(max_tokens=args.max_model_len - len(prompt), stop_token_ids=[STOP])
        else:
            params = SamplingParams(max_tokens=rng.randint(*_span(args.output_len)), ignore_eos=True)
        sched.add_request(Request(str(i), prompt, params))
    steps = computed = 0
    modelled = 0.0
    started = time.perf_counter()
    while sched.has_unfinished_requests():
        out = sched.schedule()
        steps += 1
        sampled: dict[str, list[int]] = {}
        context = 0
        for req_id, n in out.num_scheduled_tokens.items():
            req = sched.get_request(req_id)
            computed += n
            if req.num_computed_tokens < req.num_tokens:
                sampled[req_id] = []  # a prompt chunk short of its end
                continue
            context += req.num_tokens
            done = req_id in hidden and len(req.output_token_ids) + 1 >= hidden[req_id]
            sampled[req_id] = [STOP if done else OTHER]
        work = max(args.weights_ms * 1e-3, out.total_num_scheduled_tokens * args.token_us * 1e-6)
        modelled += work + context * args.kv_ns * 1e-9
        sched.update_from_output(out, ModelRunnerOutput(sampled_token_ids=sampled))
    return {
        "admission_reserve_tokens": reserve,
        "preemptions": sched.num_preemptions,
        "tokens_computed": computed,
        "steps": steps,
        "modelled_s": round(modelled, 3),
        "host_s": round(time.perf_counter() - started, 2),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reserves", default="0,64,128,256,1024", help="admission_reserve_tokens values")
    p.add_argument("--num-requests", type=int, default=1000)
    p.add_argument("--input-len", default="1024", help="N or LO,HI tokens")
    p.add_argument("--output-len", default="128", help="N or LO,HI: max_tokens, run to the end")
    p.add_argument("--hidden-output", default=None, help="LO,HI: outputs stop there, max_tokens unset")
    p.add_argument("--num-kv-blocks", type=int, default=23_855, help="T2's on an H100 (Llama-3-8B bf16)")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--max-num-seqs", type=int, default=1024)
    p.add_argument("--max-num-batched-tokens", type=int, default=8192)
    p.add_argument("--max-model-len", type=int, default=4096)
    p.add_argument("--weights-ms", type=float, default=5.4, help="a step's weight read")
    p.add_argument("--token-us", type=float, default=22.9, help="compute per token")
    p.add_argument("--kv-ns", type=float, default=43.7, help="KV read per context token")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    for reserve in (int(r) for r in args.reserves.split(",")):
        print(json.dumps(simulate(args, reserve)))


if __name__ == "__main__":
    main()
