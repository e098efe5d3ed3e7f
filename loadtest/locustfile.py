"""Locust load test for weir's OpenAI-compatible streaming API.

Each user streams chat and completion requests (SSE) in a closed loop and records, next to Locust's own
entry per request (the whole stream, in ms), two custom metrics:

    TTFT  time to the first chunk carrying generated text, one sample per request;
    ITL   the gap between consecutive chunks carrying text, one sample per gap.

A non-200 answer, an error event, or a stream that ends without `data: [DONE]` is a failure.

    weir serve &
    locust -f loadtest/locustfile.py --host http://127.0.0.1:8000 --headless -u 8 -r 8 -t 60s \\
        --prompt-tokens 128 --max-tokens 64

Options (each also an environment variable): --prompt-tokens (WEIR_PROMPT_TOKENS, words of prompt text,
about one token each), --max-tokens (WEIR_MAX_TOKENS), --model-name (WEIR_MODEL_NAME; default: the first
model /v1/models lists), --chat-fraction (WEIR_CHAT_FRACTION, share of requests sent to chat),
--temperature (WEIR_TEMPERATURE), --ignore-eos / --no-ignore-eos (WEIR_IGNORE_EOS).
"""

from __future__ import annotations

import json
import random
import time
from typing import Any

from locust import HttpUser, constant, events, task

WORDS = (
    "the of and to in is that it for as with was on be by this are from or an at which but not have all "
    "one can has were more their when will there each other about many then them these some would into "
    "time two way could first been call who its now find long down day did get come made may part over "
    "new sound take only little work know place year live back give most very after thing just name good "
    "sentence man think say great where help through much before line right too mean old any same tell"
).split()


@events.init_command_line_parser.add_listener
def _add_arguments(parser: Any) -> None:
    group = parser.add_argument_group("weir")
    group.add_argument(
        "--prompt-tokens", type=int, env_var="WEIR_PROMPT_TOKENS", default=128, help="prompt length in words"
    )
    group.add_argument(
        "--max-tokens", type=int, env_var="WEIR_MAX_TOKENS", default=64, help="tokens to generate"
    )
    group.add_argument("--model-name", env_var="WEIR_MODEL_NAME", default="", help="default: from /v1/models")
    group.add_argument("--chat-fraction", type=float, env_var="WEIR_CHAT_FRACTION", default=0.5)
    group.add_argument("--temperature", type=float, env_var="WEIR_TEMPERATURE", default=1.0)
    group.add_argument(
        "--ignore-eos",
        env_var="WEIR_IGNORE_EOS",
        default="true",
        choices=("true", "false"),
        help="generate exactly --max-tokens tokens",
    )


def _prompt_text(rng: random.Random, n_words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(max(1, n_words)))


def _chunk_text(obj: dict[str, Any]) -> str:
    """The generated text a chunk carries ('' for role-only, finish-only and usage chunks)."""
    choices = obj.get("choices") or []
    if not choices:
        return ""
    choice = choices[0]
    if "delta" in choice:
        return (choice.get("delta") or {}).get("content") or ""
    return choice.get("text") or ""


class WeirUser(HttpUser):
    """Streams requests back to back; the mix of chat and completions follows --chat-fraction."""

    wait_time = constant(0)

    def on_start(self) -> None:
        opts = self.environment.parsed_options
        self.rng = random.Random()
        self.model = getattr(opts, "model_name", "") if opts else ""
        if not self.model:
            with self.client.get("/v1/models", name="/v1/models", catch_response=True) as resp:
                try:
                    self.model = resp.json()["data"][0]["id"]
                except Exception as exc:  # noqa: BLE001 - reported as a failed request
                    resp.failure(f"cannot read a model id from /v1/models: {exc}")
                    self.model = "default"

    def _opt(self, name: str, default: Any) -> Any:
        opts = self.environment.parsed_options
        return getattr(opts, name, default) if opts is not None else default

    @task
    def generate(self) -> None:
        prompt = _prompt_text(self.rng, int(self._opt("prompt_tokens", 128)))
        common = {
            "model": self.model,
            "max_tokens": int(self._opt("max_tokens", 64)),
            "temperature": float(self._opt("temperature", 1.0)),
            "ignore_eos": str(self._opt("ignore_eos", "true")).lower() == "true",
            "stream": True,
        }
        if self.rng.random() < float(self._opt("chat_fraction", 0.5)):
            payload = {**common, "messages": [{"role": "user", "content": prompt}]}
            self._stream("/v1/chat/completions", payload, "chat")
        else:
            self._stream("/v1/completions", {**common, "prompt": prompt}, "completions")

    def _stream(self, path: str, payload: dict[str, Any], name: str) -> None:
        start = time.perf_counter()
        ttft_ms: float | None = None
        gaps_ms: list[float] = []
        with self.client.post(path, json=payload, stream=True, catch_response=True, name=name) as resp:
            if resp.status_code != 200:
                resp.failure(f"HTTP {resp.status_code}: {resp.text[:200]}")
                return
            done, error, nbytes, last, event = False, None, 0, start, None
            try:
                for raw in resp.iter_lines():
                    nbytes += len(raw) + 1
                    line = raw.decode("utf-8", errors="replace") if isinstance(raw, bytes) else raw
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
                        error = f"error event: {data[:200]}"
                        break
                    if _chunk_text(obj):
                        now = time.perf_counter()
                        if ttft_ms is None:
                            ttft_ms = (now - start) * 1000
                        else:
                            gaps_ms.append((now - last) * 1000)
                        last = now
            except Exception as exc:  # noqa: BLE001 - a broken stream fails this request
                error = f"{type(exc).__name__}: {exc}"
            # Locust's own entry times the whole stream, not just the headers.
            resp.request_meta["response_time"] = (time.perf_counter() - start) * 1000
            resp.request_meta["response_length"] = nbytes
            if error is None and not done:
                error = "stream ended without data: [DONE]"
            if error is not None:
                resp.failure(error)
            else:
                resp.success()
        if ttft_ms is not None:
            self._fire("TTFT", name, ttft_ms)
        for gap in gaps_ms:
            self._fire("ITL", name, gap)

    def _fire(self, kind: str, name: str, ms: float) -> None:
        self.environment.events.request.fire(
            request_type=kind, name=name, response_time=ms, response_length=0, exception=None, context={}
        )
