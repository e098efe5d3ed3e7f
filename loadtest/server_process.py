"""A `weir serve` subprocess for the serving benchmarks and tests: a free port, the command line from the
benchmark's arguments, start-up until /health answers, and a stop that leaves nothing behind."""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from loadtest.common import ModelChoice  # noqa: E402


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def raise_fd_limit() -> None:
    """Hundreds of concurrent streams need as many sockets; lift the soft limit to the hard one."""
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if hard == resource.RLIM_INFINITY or hard > soft:
            resource.setrlimit(
                resource.RLIMIT_NOFILE, (hard if hard != resource.RLIM_INFINITY else 65536, hard)
            )
    except (ImportError, ValueError, OSError):
        pass


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    """Linux: SIGKILL the server if the benchmark dies (a `timeout -s KILL` must not leave it on the GPU)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except Exception:  # noqa: BLE001
        pass


def serve_command(model_dir: str, port: int, extra: Sequence[str] = ()) -> list[str]:
    """`weir serve ...` through the interpreter running us (works without the console script installed)."""
    return [
        sys.executable,
        "-m",
        "app",
        "serve",
        model_dir,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        *extra,
    ]


def server_flags(args: argparse.Namespace, model: ModelChoice, max_model_len: int | None) -> list[str]:
    """Engine flags for `weir serve` (EngineConfig field names with dashes)."""
    flags = ["--dtype", model.dtype, "--device", model.device, "--seed", str(args.seed)]
    if model.load_format != "auto":
        flags += ["--load-format", model.load_format]
    for name, value in (
        ("--max-model-len", max_model_len),
        ("--num-kv-blocks", args.num_kv_blocks),
        ("--max-num-seqs", args.max_num_seqs),
        ("--max-num-batched-tokens", args.max_num_batched_tokens),
        ("--long-prefill-token-threshold", getattr(args, "long_prefill_token_threshold", None)),
        ("--gpu-memory-utilization", args.gpu_memory_utilization),
        ("--max-cuda-graph-mixed-tokens", getattr(args, "max_cuda_graph_mixed_tokens", None)),
    ):
        if value is not None:
            flags += [name, str(value)]
    if args.enforce_eager:
        flags.append("--enforce-eager")
    return flags


class ServerProcess:
    """A `weir serve` subprocess on loopback: started, waited on until /health is 200, stopped."""

    def __init__(
        self,
        model_dir: str,
        extra_args: Sequence[str] = (),
        log_path: str | Path | None = None,
        port: int = 0,
    ) -> None:
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.cmd = serve_command(model_dir, self.port, extra_args)
        self.log_path = Path(log_path) if log_path else Path(f"/tmp/weir-serve-{self.port}.log")
        self.proc: subprocess.Popen | None = None
        self.started_at: float | None = None

    def start(self) -> ServerProcess:
        raise_fd_limit()
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "wb")  # noqa: SIM115 - kept open for the child's lifetime
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
        print(f"[server] {' '.join(self.cmd[3:])} (log: {self.log_path})", flush=True)
        self.started_at = time.perf_counter()
        self.proc = subprocess.Popen(
            self.cmd,
            cwd=REPO_ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            start_new_session=True,
            preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,  # noqa: PLW1509
        )
        log.close()
        return self

    def wait_healthy(self, timeout: float = 600.0, interval: float = 0.05) -> float:
        """Poll /health until 200; returns seconds since start(). Raises with the log tail on failure."""
        import httpx

        assert self.proc is not None and self.started_at is not None
        deadline = time.perf_counter() + timeout
        with httpx.Client(timeout=5.0) as client:
            while time.perf_counter() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"weir serve exited with {self.proc.returncode}:\n{self.log_tail()}")
                try:
                    if client.get(f"{self.url}/health").status_code == 200:
                        return time.perf_counter() - self.started_at
                except httpx.TransportError:
                    pass
                time.sleep(interval)  # nothing to wait on: the server gives no other signal
        raise TimeoutError(f"weir serve not healthy after {timeout:.0f}s:\n{self.log_tail()}")

    def log_tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def stop(self, grace: float = 20.0) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        with contextlib.suppress(ProcessLookupError):
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(grace)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            return self.proc.wait(10)

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def first_model_id(url: str) -> str | None:
    import httpx

    try:
        data = httpx.get(f"{url}/v1/models", timeout=10).json()
        return data["data"][0]["id"]
    except Exception:  # noqa: BLE001
        return None
