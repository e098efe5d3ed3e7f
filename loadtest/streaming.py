"""One streaming request timed chunk by chunk (TTFT, inter-token gaps), as `vllm bench serve` times them."""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))


@dataclass(slots=True)
class StreamResult:
    ok: bool
    start: float  # perf_counter when the request was sent
    ttft: float | None = None  # seconds to the first chunk carrying a choice
    itl: list[float] = field(default_factory=list)  # gaps between later chunks
    latency: float | None = None
    chunks: int = 0
    output_tokens: int = 0
    prompt_tokens: int = 0
    error: str | None = None


async def stream_completion(
    client: Any, payload: dict[str, Any], path: str = "/v1/completions"
) -> StreamResult:
    """POST a streaming request and time its SSE chunks (as `vllm bench serve` does: every chunk with a
    choice is a token event). A stream without `data: [DONE]` or with an error event is a failure."""
    start = time.perf_counter()
    res = StreamResult(ok=False, start=start)
    last = start
    done = False
    event = None
    try:
        async with client.stream("POST", path, json=payload) as resp:
            if resp.status_code != 200:
                body = (await resp.aread()).decode(errors="replace")
                res.error = f"HTTP {resp.status_code}: {body[:300]}"
                return res
            async for line in resp.aiter_lines():
                if not line:
                    event = None
                    continue
                if line.startswith("event:"):
                    event = line[6:].strip()
                    continue
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    done = True
                    break
                obj = json.loads(data)
                if event == "error" or (isinstance(obj, dict) and obj.get("error")):
                    res.error = f"error event: {data[:300]}"
                    return res
                usage = obj.get("usage")
                if usage:
                    res.output_tokens = int(usage.get("completion_tokens") or 0)
                    res.prompt_tokens = int(usage.get("prompt_tokens") or 0)
                if obj.get("choices"):
                    now = time.perf_counter()
                    if res.ttft is None:
                        res.ttft = now - start
                    else:
                        res.itl.append(now - last)
                    last = now
                    res.chunks += 1
    except Exception as exc:  # noqa: BLE001 - a transport error fails this request, not the run
        res.error = f"{type(exc).__name__}: {exc}"
        return res
    res.latency = time.perf_counter() - start
    if not done:
        res.error = "stream ended without data: [DONE]"
        return res
    res.ok = True
    return res
