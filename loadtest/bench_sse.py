"""CPU cost of streaming chat chunks as Server-Sent Events: weir's app/sse.py vs sse-starlette.

Each variant serves one `text/event-stream` response of N chat-completion chunks (the bytes weir sends
per streamed token: `data: {"id":..,"choices":[{"index":0,"delta":{"content":" tok"},..}],..}\\n\\n`),
encoding every chunk as it goes, and the response is read in-process through httpx.ASGITransport, so
the figure is event-loop time per event: what the server's loop spends beside the engine's step loop.
The headline is CPU time (time.process_time, all threads): on a shared machine wall time also counts
the time other processes held the core.

Variants (the same JSON, encoded by weir's ChunkFrame, in every one):
- `weir_sse`: app/sse.SSEResponse over the framed bytes (what the routes use);
- `starlette_streaming`: Starlette's StreamingResponse over the same bytes (no keep-alive, no
  disconnect-driven abort; the floor);
- `sse_starlette_str`: sse-starlette's EventSourceResponse framing each JSON string itself (its
  usual use; `sep="\\n"` so the bytes match weir's);
- `sse_starlette_bytes`: EventSourceResponse over weir's already framed bytes (its response machinery
  alone).

    python loadtest/bench_sse.py --out loadtest/results/sse-cpu-<date>-<commit>/sse.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import AsyncIterator, Callable
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import httpx  # noqa: E402
from starlette.responses import Response, StreamingResponse  # noqa: E402

from app.protocol import ChatCompletionChunk, ChatStreamChoice, DeltaMessage  # noqa: E402
from app.sse import ChunkFrame, SSEResponse  # noqa: E402

PING_S = 15.0  # weir's default --sse-keepalive; no ping fires during a run


def frames(n: int) -> Callable[[], AsyncIterator[bytes]]:
    """A body of n chat chunks, each encoded when the response asks for it (as weir's routes do)."""
    frame = ChunkFrame(
        ChatCompletionChunk(
            id="chatcmpl-" + "0" * 32, created=1_796_000_000, model="default_model", choices=[]
        )
    )

    async def body() -> AsyncIterator[bytes]:
        yield frame(ChatStreamChoice(index=0, delta=DeltaMessage(role="assistant", content="")))
        for i in range(n - 1):
            yield frame(ChatStreamChoice(index=0, delta=DeltaMessage(content=f" tok{i % 50}")))

    return body


async def as_json_strings(body: AsyncIterator[bytes]) -> AsyncIterator[str]:
    """The JSON of each frame as a str, for sse-starlette to frame itself."""
    async for chunk in body:
        yield chunk[6:-2].decode()  # strip b"data: " and b"\n\n"


def make_response(variant: str, n: int) -> Response:
    body = frames(n)()
    if variant == "weir_sse":
        return SSEResponse(body, ping_interval=PING_S)
    if variant == "starlette_streaming":
        return StreamingResponse(body, media_type="text/event-stream")
    from sse_starlette import EventSourceResponse

    if variant == "sse_starlette_str":
        return EventSourceResponse(as_json_strings(body), ping=int(PING_S), sep="\n")
    if variant == "sse_starlette_bytes":
        return EventSourceResponse(body, ping=int(PING_S), sep="\n")
    raise ValueError(variant)


VARIANTS = ["weir_sse", "starlette_streaming", "sse_starlette_str", "sse_starlette_bytes"]


def available_variants() -> list[str]:
    """sse-starlette is not a dependency of weir (this benchmark is why): its variants run where it is
    installed (`pip install sse-starlette`)."""
    try:
        import sse_starlette  # noqa: F401
    except ImportError:
        return VARIANTS[:2]
    return VARIANTS


async def one_response(client: httpx.AsyncClient, variant: str, n: int) -> tuple[float, float, bytes]:
    """(wall s, CPU s, body) of one streamed response of n events."""
    t0, c0 = time.perf_counter(), time.process_time()
    r = await client.get(f"/{variant}/{n}")
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    if r.status_code != 200:
        raise RuntimeError(f"{variant}: HTTP {r.status_code}")
    return wall, cpu, r.content


async def asgi_app(scope: dict, receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    _, variant, n = scope["path"].split("/")
    await make_response(variant, int(n))(scope, receive, send)


async def measure(events: list[int], rounds: int, variants: list[str]) -> dict[str, Any]:
    transport = httpx.ASGITransport(app=asgi_app)
    results: dict[str, Any] = {}
    async with httpx.AsyncClient(transport=transport, base_url="http://bench") as client:
        for n in events:
            # Every variant must put the same events on the wire (weir's bytes, event for event).
            expected = b"".join([chunk async for chunk in frames(n)()])
            for variant in variants:
                _, _, content = await one_response(client, variant, n)
                if content != expected:
                    raise RuntimeError(f"{variant}: body differs from weir's frames: {content[:200]!r}")
            walls: dict[str, list[float]] = {v: [] for v in variants}
            cpus: dict[str, list[float]] = {v: [] for v in variants}
            for _ in range(rounds):  # interleaved, so drift of the machine hits every variant alike
                for variant in variants:
                    wall, cpu, _ = await one_response(client, variant, n)
                    walls[variant].append(wall)
                    cpus[variant].append(cpu)
            res = results[f"events_{n}"] = {
                v: {
                    "cpu_us_per_event_median": round(statistics.median(cpus[v]) / n * 1e6, 3),
                    "cpu_us_per_event_min": round(min(cpus[v]) / n * 1e6, 3),
                    "cpu_us_per_response_median": round(statistics.median(cpus[v]) * 1e6, 1),
                    "wall_us_per_event_median": round(statistics.median(walls[v]) / n * 1e6, 3),
                }
                for v in variants
            }
            base = res["weir_sse"]["cpu_us_per_event_median"]
            for v in variants:
                res[v]["cpu_vs_weir_sse"] = round(res[v]["cpu_us_per_event_median"] / base, 3)
    return results


PACKAGES = ("starlette", "sse-starlette", "httpx", "msgspec", "uvloop")


def installed_version(package: str) -> str | None:
    try:
        return version(package)
    except PackageNotFoundError:
        return None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--events", default="16,1000", help="events per response, comma-separated")
    p.add_argument("--rounds", type=int, default=15, help="responses per variant and size (median taken)")
    p.add_argument("--no-uvloop", action="store_true", help="the default asyncio loop instead of uvloop")
    p.add_argument("--out", help="write the JSON report here")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    events = [int(x) for x in args.events.split(",") if x.strip()]
    loop, loop_name = asyncio.new_event_loop(), "asyncio"
    if not args.no_uvloop:
        try:
            import uvloop  # what `weir serve` runs on

            loop.close()
            loop, loop_name = uvloop.new_event_loop(), "uvloop"
        except ImportError:
            pass
    variants = available_variants()
    load_before = round(os.getloadavg()[0], 2)  # a busy machine inflates even CPU time (shared caches)
    try:
        results = loop.run_until_complete(measure(events, args.rounds, variants))
    finally:
        # sse-starlette leaves a shutdown watcher running on the loop: stop it before closing.
        pending = asyncio.all_tasks(loop)
        for task in pending:
            task.cancel()
        if pending:  # gather() of nothing looks for a current loop, which this thread does not have
            loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
        loop.close()

    from loadtest.common import device_name, git_commit

    commit, dirty = git_commit()
    report = {
        "benchmark": "sse",
        "date": time.strftime("%Y-%m-%d"),
        "commit": commit,
        "dirty": dirty,
        "card": device_name("cpu"),
        "python": platform.python_version(),
        "event_loop": loop_name,
        "load_average_1m_before_after": [load_before, round(os.getloadavg()[0], 2)],
        "versions": {p: installed_version(p) for p in PACKAGES},
        "variants": variants,
        "args": {"events": events, "rounds": args.rounds},
        "results": results,
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
