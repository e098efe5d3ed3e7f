"""U1: start-up. `weir serve` with dummy weights (Llama-3-8B shape) until /health answers 200 and a first
request completes: the seconds, and how they split (imports, weights, KV allocation, CUDA graph capture).

    python loadtest/bench_startup.py --shape llama3-8b --peer hf --out u1.json

The end-to-end figures come from the server subprocess (timed from spawn), and so does the first split:
the server's own "startup phases" log line (engine/startup_phases.py: wall seconds from its process's
start to listening, per phase), recorded as results.startup_phases. A second split comes from the same
start-up repeated in this process with the model runner's set-up methods timed (whatever their names:
load, KV profile/allocation, capture/graph/warm-up), the engine's own phases and attributes, the
timings the server logged, and the import times measured in a fresh interpreter.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import inspect
import json
import random
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from loadtest.common import (  # noqa: E402
    REPO_ROOT,
    Report,
    add_common_args,
    build_llm,
    copy_bandwidth_phase,
    engine_kwargs,
    engine_runner,
    free_engine,
    install_signal_handlers,
    phase,
    resolve_model,
    sampling_params,
)
from loadtest.hf_peer import HFPeer  # noqa: E402
from loadtest.server_process import (  # noqa: E402
    ServerProcess,
    server_flags,
)
from loadtest.streaming import stream_completion  # noqa: E402

# Runner methods timed during the in-process start-up, by what their names say.
_TIMED = re.compile(r"load|kv|profile|capture|graph|warm|compile|alloc")
_LOG_PATTERNS = {
    "weights_s": re.compile(r"loaded .*? in ([\d.]+)\s*s"),
    "engine_ready_s": re.compile(r"engine ready.*?\(([\d.]+)\s*s\)"),
    "cuda_graphs_s": re.compile(r"(?:captur|cuda.?graph)[^\n]*?([\d.]+)\s*s\b", re.IGNORECASE),
}
_IMPORTS = """
import json, time
t0 = time.perf_counter(); import torch; t1 = time.perf_counter()
import engine.llm_engine; t2 = time.perf_counter()
try:
    import app.server
except Exception:
    pass
t3 = time.perf_counter()
print(json.dumps({"torch_s": t1 - t0, "engine_s": t2 - t1, "app_s": t3 - t2}))
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--output-len", type=int, default=16)
    p.add_argument("--no-split", action="store_true", help="skip the in-process start-up split")
    p.add_argument("--no-imports", action="store_true", help="skip timing the imports in a fresh interpreter")
    p.add_argument("--server-log", default=None)
    p.add_argument("--server-timeout", type=float, default=600.0)
    p.add_argument(
        "--server-arg", action="append", default=[], help="extra `weir serve` argument (repeatable)"
    )
    add_common_args(p, default_shape="llama3-8b")
    return p


async def first_request(url: str, prompt: list[int], max_tokens: int) -> Any:
    import httpx

    async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(600.0)) as client:
        payload = {
            "model": "weir-bench",
            "prompt": prompt,
            "max_tokens": max_tokens,
            "temperature": 0.0,
            "ignore_eos": True,
            "stream": True,
        }
        return await stream_completion(client, payload)


def startup_phases(text: str) -> dict[str, float] | None:
    """The server's "startup phases" line (total_s, <phase>_s for every phase, other_s), or None."""
    for line in text.splitlines():
        if '"startup phases"' not in line:
            continue
        try:
            entry = json.loads(line[line.index("{") :])
        except ValueError:
            continue
        return {k: v for k, v in entry.items() if k.endswith("_s") and isinstance(v, int | float)}
    return None


def tokenizer_loader(text: str) -> str | None:
    """Which loader read the server's tokenizer, from its "startup phases" line: `tokenizers` (weir's
    own, no transformers import) or `transformers`."""
    for line in text.splitlines():
        if '"startup phases"' in line:
            try:
                return json.loads(line[line.index("{") :]).get("tokenizer_loader")
            except ValueError:
                continue
    return None


def parse_server_log(text: str) -> dict[str, Any]:
    found: dict[str, Any] = {}
    for key, pat in _LOG_PATTERNS.items():
        m = pat.search(text)
        if m:
            found[key] = float(m.group(1))
    keywords = (
        "loaded",
        "ready",
        "captur",
        "graph",
        "kv cache",
        "profile",
        "startup",
        "start-up",
        "listening",
        "compile ahead",
    )
    found["lines"] = [ln[:300] for ln in text.splitlines() if any(k in ln.lower() for k in keywords)][:20]
    return found


def import_times() -> dict[str, float] | None:
    """Import times in a fresh interpreter (what every `weir serve` pays before any model work)."""
    try:
        out = subprocess.run(
            [sys.executable, "-c", _IMPORTS],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=300,
            check=True,
        ).stdout
        return {k: round(v, 3) for k, v in json.loads(out.strip().splitlines()[-1]).items()}
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return None


# What `weir serve` imports before it serves, and what its tokenizer's first load imports, with the
# collector off as in `weir serve` (app/cli.py).
_IMPORT_PROFILE = """
import gc, sys
gc.disable()
import app.cli, app.logging, app.startup, engine.async_engine, app.runner, app.server
from engine.inputs.tokenizer import load_tokenizer
load_tokenizer(sys.argv[1])
"""


def import_profile(model_dir: str, top: int = 25) -> dict[str, Any] | None:
    """`python -X importtime` of `_IMPORT_PROFILE` in a fresh interpreter: the seconds of its top-level
    imports, and the modules with the most cumulative and the most self time (with their depth in the
    import tree, 0 = imported by the script itself), to show which imports the start-up's "imports"
    and "tokenizer" phases are made of."""
    try:
        err = subprocess.run(
            [sys.executable, "-X", "importtime", "-c", _IMPORT_PROFILE, model_dir],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=300,
            check=True,
        ).stderr
    except (OSError, subprocess.SubprocessError):
        return None
    rows = []  # (module, depth, self µs, cumulative µs)
    for line in err.splitlines():
        m = re.match(r"import time:\s+(\d+) \|\s+(\d+) \|( *)(\S+)", line)
        if m:
            rows.append((m.group(4), (len(m.group(3)) - 1) // 2, int(m.group(1)), int(m.group(2))))
    if not rows:
        return None

    def listed(key: int) -> list[list[Any]]:
        best = sorted(rows, key=lambda r: r[key], reverse=True)[:top]
        return [[name, depth, round(r[key] / 1e6, 3)] for r in best for name, depth in [(r[0], r[1])]]

    return {
        "total_s": round(sum(r[3] for r in rows if r[1] == 0) / 1e6, 3),
        "modules": len(rows),
        "top_cumulative_s": listed(3),  # [module, depth, seconds]
        "top_self_s": listed(2),
    }


def _timed_classes() -> list[type]:
    """ModelRunner, plus any engine class whose name says it runs or captures (a CUDA-graph runner may
    live in its own module)."""
    import engine.llm_engine  # noqa: F401 - imports the runner and whatever it uses
    from engine.worker.model_runner import ModelRunner

    classes: list[type] = [ModelRunner]
    for mod_name, mod in list(sys.modules.items()):
        if not mod_name.startswith("engine.") or mod is None:
            continue
        for obj in list(vars(mod).values()):
            if (
                inspect.isclass(obj)
                and obj.__module__ == mod_name
                and obj not in classes
                and re.search(r"Runner|Graph", obj.__name__)
            ):
                classes.append(obj)
    return classes


def timed_startup(model: Any, kwargs: dict[str, Any], prompt: list[int], max_tokens: int) -> dict[str, Any]:
    """Build the engine here with the runner's set-up methods wrapped in timers; then one request.

    Each top-level timed call goes to one bucket by its name; CUDA-graph capture nested inside another
    call (say, called from the KV-cache set-up) is moved to the CUDA-graph bucket.
    """
    calls: list[dict[str, Any]] = []
    stack: list[dict[str, Any]] = []
    originals: list[tuple[type, str, Any]] = []

    def wrap(name: str, fn: Any) -> Any:
        @functools.wraps(fn)
        def timed(*a: Any, **k: Any) -> Any:
            frame = {"method": name, "depth": len(stack), "graphs_inside": 0.0}
            stack.append(frame)
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                _sync(model.device)
                frame["s"] = time.perf_counter() - t0
                stack.pop()
                is_graph = _category(name) == "cuda_graphs"
                if is_graph and not any(_category(f["method"]) == "cuda_graphs" for f in stack):
                    for f in stack:
                        f["graphs_inside"] += frame["s"]
                calls.append(frame)

        return timed

    for cls in _timed_classes():
        for name, fn in list(vars(cls).items()):
            # Plain functions only: a wrapped staticmethod would start receiving self.
            if inspect.isfunction(fn) and (
                name == "__init__" or (not name.startswith("__") and _TIMED.search(name))
            ):
                originals.append((cls, name, fn))
                setattr(cls, name, wrap(f"{cls.__name__}.{name}", fn))
    try:
        llm, build_s = build_llm(model, kwargs)
    finally:
        for cls, name, fn in originals:
            setattr(cls, name, fn)
    try:
        t0 = time.perf_counter()
        llm.generate([prompt], sampling_params(max_tokens, 0.0), use_tqdm=False)
        first_s = time.perf_counter() - t0
        engine = llm.llm_engine
        runner = engine_runner(llm)
        attrs = _timing_attributes(engine) | {f"runner.{k}": v for k, v in _timing_attributes(runner).items()}
        # The runner's own start-up split, where it keeps one (weights_load_s, profile_s, kv_alloc_s, ...).
        runner_timings = getattr(runner, "timings", None)
        memory_profile = getattr(runner, "memory_profile", None)
        # The engine's own phases (engine/startup_phases.py); its tokenizer loads on a thread of its
        # own, so what start-up waited for it is its "tokenizer" phase.
        phases = engine.startup_phases.report()
    finally:
        free_engine(llm)
    split = {
        "weights": 0.0,
        "kv_cache (profile + allocation)": 0.0,
        "cuda_graphs": 0.0,
        "tokenizer": 0.0,
        "other timed set-up": 0.0,
    }
    top: dict[str, float] = {}
    for c in calls:
        if c["depth"] == 0:
            top[c["method"]] = round(top.get(c["method"], 0.0) + c["s"], 4)
            bucket = _category(c["method"])
            if bucket == "cuda_graphs":
                split[bucket] += c["s"]
            else:
                split[bucket] += c["s"] - c["graphs_inside"]
                split["cuda_graphs"] += c["graphs_inside"]
    split["tokenizer"] = phases["tokenizer_s"]
    split["rest (config, scheduler, imports)"] = build_s - sum(top.values()) - split["tokenizer"]
    nested = [
        {"method": c["method"], "depth": c["depth"], "s": round(c["s"], 4)} for c in calls if c["depth"]
    ]
    return {
        "engine_build_s": round(build_s, 3),
        "split_s": {k: round(v, 3) for k, v in split.items()},
        "timed_methods_s": top,
        "nested_calls": nested[:50],
        "engine_attributes": attrs,
        "runner_timings": _numbers(runner_timings),
        "memory_profile_gib": _numbers(memory_profile),
        "engine_startup_phases": phases,
        "first_request_s": round(first_s, 4),
    }


def _numbers(d: Any) -> dict[str, float] | None:
    if not isinstance(d, dict):
        return None
    return {str(k): round(float(v), 4) for k, v in d.items() if isinstance(v, int | float)}


def _category(method: str) -> str:
    """One bucket per timed method, by its name (first match wins)."""
    method = method.rsplit(".", 1)[-1].lower()
    if "capture" in method or "graph" in method:
        return "cuda_graphs"
    if "kv" in method or "profile" in method or "alloc" in method:
        return "kv_cache (profile + allocation)"
    if "load" in method:
        return "weights"
    return "other timed set-up"


def _sync(device: str) -> None:
    """Wait for the device, so a timed method owns its GPU work (never inside a CUDA-graph capture)."""
    if device == "cuda":
        import torch

        if not torch.cuda.is_current_stream_capturing():
            torch.cuda.synchronize()


def _timing_attributes(obj: Any) -> dict[str, Any]:
    """Numbers (or dicts of numbers) on obj whose names say they are timings."""
    out: dict[str, Any] = {}
    for name in dir(obj):
        if name.startswith("__") or not re.search(r"seconds|_s$|_time$|timing", name):
            continue
        try:
            value = getattr(obj, name)
        except Exception:  # noqa: BLE001
            continue
        if isinstance(value, int | float) and not isinstance(value, bool):
            out[name] = round(float(value), 4)
        elif isinstance(value, dict) and all(isinstance(v, int | float) for v in value.values()):
            out[name] = {str(k): round(float(v), 4) for k, v in value.items()}
    return out


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    model = resolve_model(args)
    report = Report("U1", args, model)
    rng = random.Random(args.seed)
    prompt = [rng.randrange(min(10000, model.vocab_size)) for _ in range(args.prompt_len)]
    mml = args.max_model_len  # None: what `weir serve` picks for the model, as a user would get
    report["workload"] = {"prompt_len": args.prompt_len, "output_len": args.output_len, "max_model_len": mml}
    flags = server_flags(args, model, mml) + ["--served-model-name", "weir-bench", *args.server_arg]
    server = ServerProcess(model.model_dir, flags, log_path=args.server_log)
    try:
        with phase(report, "server"):
            server.start()
            health = server.wait_healthy(args.server_timeout, interval=0.02)
            report["results"]["seconds_to_health"] = round(health, 3)
            res = asyncio.run(first_request(server.url, prompt, args.output_len))
            assert server.started_at is not None
            total = time.perf_counter() - server.started_at
            if not res.ok:
                raise RuntimeError(f"the first request failed: {res.error}")
            report["results"]["seconds_to_first_request"] = round(total, 3)
            report["results"]["first_request_s"] = round(res.latency or 0.0, 4)
            report["results"]["first_request_ttft_ms"] = round((res.ttft or 0.0) * 1000, 3)
            print(f"[U1] /health 200 after {health:.2f}s; first request done after {total:.2f}s", flush=True)
    except Exception:  # noqa: BLE001 - recorded by phase()
        print(server.log_tail(), file=sys.stderr)
    finally:
        report["results"]["server_exit_code"] = server.stop()
        try:
            log_text = server.log_path.read_text(errors="replace")
        except OSError:
            log_text = ""
        report["results"]["server_log"] = parse_server_log(log_text)
        phases = startup_phases(log_text)
        if phases is not None:
            report["results"]["startup_phases"] = phases
            print(f"[U1] server's start-up phases (s): {phases}", flush=True)
        report["results"]["tokenizer_loader"] = tokenizer_loader(log_text)
        report.save()

    if not args.no_imports:
        with phase(report, "imports", required=False):
            report["results"]["imports_s"] = import_times()
            report["results"]["import_profile"] = import_profile(str(model.model_dir))
    if not args.no_split:
        with phase(report, "split", required=False):
            kwargs = engine_kwargs(args, model, max_model_len=mml)
            report["results"]["in_process"] = timed_startup(model, kwargs, prompt, args.output_len)
            print(f"[U1] in-process split: {report['results']['in_process']['split_s']}", flush=True)
    copy_bandwidth_phase(report, model.device, args.copy_bytes)
    if args.peer == "hf":
        with phase(report, "peer", required=False):
            t0 = time.perf_counter()
            peer = HFPeer(model, seed=args.seed)
            try:
                r = peer.generate_batch([prompt], args.output_len, 0.0)
            finally:
                peer.close()
            report["peer"] = {
                "name": "transformers from_config + generate()",
                "model_build_s": round(peer.build_seconds, 3),
                "first_request_s": round(r["measured_s"], 4),
                "seconds_to_first_request": round(time.perf_counter() - t0, 3),
                "note": "in-process, imports excluded",
            }
    return report.finish()


if __name__ == "__main__":
    install_signal_handlers()
    raise SystemExit(main())
