"""Per-step broadcast latency of the tensor-parallel executor's channel and encoding: the
shared-memory ring (engine/executor/shm_broadcast.py, one copy read by every rank) with the step
encoded as msgpack (engine/executor/step_codec.py, what the executor sends now) or pickled (what it
sent before), and the pipe path the ring replaced (the pickled bytes written down one pipe per rank).

N reader processes (spawned, as the ranks are) each wait for a message the way a worker does (the
ring: a semaphore wait; the pipe: poll + recv_bytes), decode it with the worker's own
`step_codec.decode_call` into the worker's dataclasses and answer a 2-byte ack on their pipe; the
writer encodes a real SchedulerOutput once per step, sends it, and waits for every ack (as `collect`
waits for the ranks' replies). Figures per step:
- `encode_cpu_us`: the writer thread's CPU time to encode the step (pickle or msgpack);
- `send_us` (wall) and `send_cpu_us` (the writer thread's CPU time, which a busy machine inflates
  less): the writer's time to send the already encoded bytes;
- `round_trip_us`: from the start of the encoding until every reader's ack is in (the acks travel the
  same way in every variant);
- `decode_cpu_us` (per codec, measured in the writer's process): what a rank spends decoding.
Variants alternate round by round on the same reader processes, so drift of a shared machine hits
all alike. Messages: `decode-64` and `decode-1024` (running requests as diffs), `prefill-4x512` (four
new requests in full).

    python loadtest/bench_tp_broadcast.py --out loadtest/results/tp-broadcast-cpu-<date>-<commit>/broadcast.json
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import multiprocessing
import os
import platform
import random
import sys
import time
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.core.sampling_params import SamplingParams  # noqa: E402
from engine.core.scheduler_output import CachedRequestData, NewRequestData, SchedulerOutput  # noqa: E402
from engine.executor import step_codec  # noqa: E402
from engine.executor.shm_broadcast import BroadcastReader, BroadcastWriter, ChannelHandle  # noqa: E402

_SWITCH = b"switch"  # tells a reader to wait on the other channel from now on
_STOP = b"stop"


def decode_step(num_requests: int, step: int) -> SchedulerOutput:
    """A decode step of running requests: each one token, every 16th gaining a block."""
    cached = [
        CachedRequestData(
            req_id=f"cmpl-{i:032x}-0",
            new_block_ids=[1000 + i] if (step + i) % 16 == 0 else [],
            num_computed_tokens=700 + step,
        )
        for i in range(num_requests)
    ]
    return SchedulerOutput(
        new_requests=[],
        cached_requests=cached,
        num_scheduled_tokens={c.req_id: 1 for c in cached},
        total_num_scheduled_tokens=num_requests,
        finished_req_ids=set(),
        step_id=step,
    )


def prefill_step(num_requests: int, prompt_len: int, step: int) -> SchedulerOutput:
    rng = random.Random(step)
    new = [
        NewRequestData(
            req_id=f"cmpl-{step:016x}{i:016x}-0",
            token_ids=[rng.randrange(32000) for _ in range(prompt_len)],
            num_prompt_tokens=prompt_len,
            sampling_params=SamplingParams(temperature=0.7, top_p=0.9, max_tokens=256),
            block_ids=list(range(i * 40, i * 40 + prompt_len // 16 + 1)),
            num_computed_tokens=0,
        )
        for i in range(num_requests)
    ]
    return SchedulerOutput(
        new_requests=new,
        cached_requests=[],
        num_scheduled_tokens={r.req_id: prompt_len for r in new},
        total_num_scheduled_tokens=num_requests * prompt_len,
        finished_req_ids=set(),
        step_id=step,
        num_prompt_tokens=num_requests * prompt_len,
    )


MESSAGES = {
    "decode-64": lambda step: decode_step(64, step),
    "decode-1024": lambda step: decode_step(1024, step),
    "prefill-4x512": lambda s: prefill_step(4, 512, s),
}
# variant -> (channel, codec)
VARIANTS = {
    "pipe-pickle": ("pipe", "pickle"),
    "shm-pickle": ("shm", "pickle"),
    "shm-msgpack": ("shm", "msgpack"),
}


def encode(codec: str, step_id: int, message: SchedulerOutput) -> bytes | bytearray:
    if codec == "msgpack":
        return step_codec.encode_launch(step_id, message, step_id - 1)
    # The executor's frame before msgpack: the pickled call, behind the frame-kind byte.
    return step_codec.encode_control("launch", (step_id, message, step_id - 1))


def reader_main(handle: ChannelHandle, rank: int, conn: Connection) -> None:
    """A rank's loop, starting on the pipe: decode each message as a worker does and ack it."""
    ring = BroadcastReader(handle, rank)
    on_ring = False
    while True:
        if on_ring:
            data = ring.read(60.0)
        else:
            while not conn.poll(2.0):
                pass
            data = conn.recv_bytes()
        if data == _STOP:
            break
        if data == _SWITCH:
            on_ring = not on_ring
            continue
        step_codec.decode_call(data)  # type: ignore[arg-type]
        conn.send_bytes(b"ok")
    ring.close()


def _percentiles(values: list[float]) -> dict[str, float]:
    xs = sorted(values)
    return {f"p{q}": round(xs[min(len(xs) - 1, int(len(xs) * q / 100))] * 1e6, 1) for q in (10, 50, 90, 99)}


def _cpu_us(fn: Any, n: int) -> float:
    """Mean thread CPU time of fn(i) over n calls, in microseconds."""
    start = time.thread_time()
    for i in range(n):
        fn(i)
    return round((time.thread_time() - start) / n * 1e6, 1)


def run(num_readers: int, rounds: int, steps: int, warmup: int, slot_bytes: int) -> dict[str, Any]:
    ctx = multiprocessing.get_context("spawn")
    writer = BroadcastWriter(num_readers, slot_bytes=slot_bytes, context=ctx)
    conns, procs = [], []
    for rank in range(num_readers):
        ours, theirs = ctx.Pipe(duplex=True)
        proc = ctx.Process(target=reader_main, args=(writer.handle, rank, theirs), daemon=True)
        proc.start()
        theirs.close()
        conns.append(ours)
        procs.append(proc)
    on_ring = False

    def switch_to(ring: bool) -> None:
        nonlocal on_ring
        if ring != on_ring:  # the switch travels on the channel the readers wait on now
            if on_ring:
                writer.write(_SWITCH, 10.0)
            else:
                for c in conns:
                    c.send_bytes(_SWITCH)
            on_ring = ring

    def step(message: SchedulerOutput, step_id: int, codec: str) -> tuple[float, ...]:
        start, cpu_start = time.perf_counter(), time.thread_time()
        data = encode(codec, step_id, message)
        cpu0, wall0 = time.thread_time(), time.perf_counter()
        if on_ring:
            if not writer.write(data, 10.0):
                raise SystemExit(f"a {len(data)}-byte message does not fit a slot: raise --slot-bytes")
        else:
            for c in conns:
                c.send_bytes(data)
        send_cpu, send_wall = time.thread_time() - cpu0, time.perf_counter() - wall0
        pending = set(conns)
        while pending:
            for c in wait(list(pending), timeout=10.0):
                c.recv_bytes()  # type: ignore[union-attr]
                pending.discard(c)  # type: ignore[arg-type]
        return send_wall, send_cpu, time.perf_counter() - start, cpu0 - cpu_start

    results: dict[str, Any] = {}
    try:
        for name, build in MESSAGES.items():
            messages = [build(i) for i in range(16)]  # pre-built: the benchmark times the channel
            times: dict[str, dict[str, list[float]]] = {
                v: {"send": [], "send_cpu": [], "rt": [], "encode_cpu": []} for v in VARIANTS
            }
            order = list(VARIANTS)
            for r in range(rounds):
                for variant in order[r % len(order) :] + order[: r % len(order)]:  # rotate who goes first
                    channel, codec = VARIANTS[variant]
                    switch_to(channel == "shm")
                    for i in range(warmup + steps):
                        send_s, send_cpu_s, rt_s, encode_cpu_s = step(messages[i % len(messages)], i, codec)
                        if i >= warmup:
                            t = times[variant]
                            t["send"].append(send_s)
                            t["send_cpu"].append(send_cpu_s)
                            t["rt"].append(rt_s)
                            t["encode_cpu"].append(encode_cpu_s)
            entry: dict[str, Any] = {}
            for codec in ("pickle", "msgpack"):
                frames = [encode(codec, i, m) for i, m in enumerate(messages)]
                n = 200 if name == "decode-1024" else 1000
                entry[codec] = {
                    "message_bytes": len(frames[0]),
                    "decode_cpu_us": _cpu_us(lambda i, f=frames: step_codec.decode_call(f[i % len(f)]), n),
                }
            for variant, t in times.items():
                entry[variant] = {
                    "encode_cpu_us": _percentiles(t["encode_cpu"]),
                    "send_us": _percentiles(t["send"]),
                    "send_cpu_us": _percentiles(t["send_cpu"]),
                    "round_trip_us": _percentiles(t["rt"]),
                }

            def ratio(a: str, b: str, metric: str, e: dict[str, Any] = entry) -> float:
                return round(e[a][metric]["p50"] / e[b][metric]["p50"], 3)

            entry["p50_msgpack_vs_pickle_on_shm"] = {
                m: ratio("shm-msgpack", "shm-pickle", m) for m in ("encode_cpu_us", "round_trip_us")
            }
            entry["p50_shm_vs_pipe_pickle"] = {
                m: ratio("shm-pickle", "pipe-pickle", m) for m in ("send_cpu_us", "round_trip_us")
            }
            results[name] = entry
    finally:
        if on_ring:
            writer.write(_STOP, 10.0)
        else:
            for c in conns:
                c.send_bytes(_STOP)
        for proc in procs:
            proc.join(10)
            if proc.is_alive():
                proc.kill()
        writer.close()
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--readers", type=int, nargs="+", default=[2, 4])
    parser.add_argument(
        "--rounds", type=int, default=6, help="rounds of the alternating variants per message"
    )
    parser.add_argument("--steps", type=int, default=500, help="timed steps per round")
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument(
        "--slot-bytes", type=int, default=1 << 20, help="ring slot size (every message must fit)"
    )
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)

    from loadtest.common import device_name, git_commit  # noqa: PLC0415

    commit, dirty = git_commit()
    load_before = round(os.getloadavg()[0], 2)
    report: dict[str, Any] = {
        "benchmark": "tp_broadcast",
        "date": _dt.date.today().isoformat(),
        "commit": commit,
        "dirty": dirty,
        "machine": "CPU",
        "card": device_name("cpu"),
        "python": platform.python_version(),
        "args": {k: v for k, v in vars(args).items() if k != "out"},
        "results": {},
    }
    for n in args.readers:
        report["results"][f"readers_{n}"] = run(n, args.rounds, args.steps, args.warmup, args.slot_bytes)
    report["load_average_1m_before_after"] = [load_before, round(os.getloadavg()[0], 2)]
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
