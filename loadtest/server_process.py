"""A `weir serve` subprocess for the serving benchmarks and tests: the command line from the benchmark's
arguments, start-up until /health answers, and a stop that leaves nothing behind.

The server picks its own port: `--port 0`, so the kernel chooses one as the server binds, and
`--port-file` tells us which (app/port_file.py). A port picked here and passed as --port would be free
only when picked: in the seconds before the server binds it, another process (a concurrent CI job,
another test's server) could take it. The server's log goes to /tmp/weir-serve-starting-*.log until
the port is known, then is renamed /tmp/weir-serve-{port}.log (unless a log path is given).
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from app.port_file import read_port_file  # noqa: E402
from loadtest.common import ModelChoice  # noqa: E402

_instances = itertools.count()  # names the log files of this process's servers until their ports are known


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
        ("--admission-reserve-tokens", getattr(args, "admission_reserve_tokens", None)),
        ("--gpu-memory-utilization", args.gpu_memory_utilization),
        ("--max-cuda-graph-mixed-tokens", getattr(args, "max_cuda_graph_mixed_tokens", None)),
    ):
        if value is not None:
            flags += [name, str(value)]
    if args.enforce_eager:
        flags.append("--enforce-eager")
    return flags


class ServerProcess:
    """A `weir serve` subprocess on loopback: started, waited on until /health is 200, stopped.

    `port` 0 (default): the server binds a port of the kernel's choosing; `port` and `url` are known
    once `wait_healthy` has seen it (before that, `port` is None)."""

    def __init__(
        self,
        model_dir: str,
        extra_args: Sequence[str] = (),
        log_path: str | Path | None = None,
        port: int = 0,
    ) -> None:
        self.port: int | None = None
        self._model_dir, self._extra_args, self._requested_port = model_dir, list(extra_args), port
        self.cmd = serve_command(model_dir, port, extra_args)  # start() adds --port-file
        self._name_log_by_port = log_path is None and not port
        if log_path is not None:
            self.log_path = Path(log_path)
        elif port:
            self.log_path = Path(f"/tmp/weir-serve-{port}.log")
        else:  # until the server has bound a port (then weir-serve-{port}.log)
            self.log_path = Path(f"/tmp/weir-serve-starting-{os.getpid()}-{next(_instances)}.log")
        self._workdir: Path | None = None
        self.port_file: Path | None = None
        self.proc: subprocess.Popen | None = None
        self.started_at: float | None = None

    @property
    def url(self) -> str:
        if self.port is None:
            raise RuntimeError("the server's port is not known yet: call wait_healthy() first")
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> ServerProcess:
        raise_fd_limit()
        self._workdir = Path(tempfile.mkdtemp(prefix="weir-serve-"))  # removed by stop()
        self.port_file = self._workdir / "port"
        self.cmd = serve_command(
            self._model_dir, self._requested_port, [*self._extra_args, "--port-file", str(self.port_file)]
        )
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
        """Wait for the server's port (its --port-file), then poll /health until 200; returns seconds
        since start(). Raises with the log tail on failure.

        The server writes the port file once it listens and /health answers, so the interval timed is
        the same as polling /health alone: from start() to the first 200, within `interval`."""
        import httpx

        assert self.proc is not None and self.started_at is not None
        deadline = time.perf_counter() + timeout
        with httpx.Client(timeout=5.0) as client:
            while time.perf_counter() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"weir serve exited with {self.proc.returncode}:\n{self.log_tail()}")
                if self.port is None:
                    assert self.port_file is not None
                    port = read_port_file(self.port_file)
                    if port is None:
                        time.sleep(interval)  # polled, as /health is: nothing to wait on
                        continue
                    self._bound(port)
                try:
                    if client.get(f"{self.url}/health").status_code == 200:
                        return time.perf_counter() - self.started_at
                except httpx.TransportError:
                    pass
                time.sleep(interval)  # nothing to wait on: the server gives no other signal
        raise TimeoutError(f"weir serve not healthy after {timeout:.0f}s:\n{self.log_tail()}")

    def _bound(self, port: int) -> None:
        """The server listens on `port`: the URL, and the log's name after it (the child's open file
        follows the rename)."""
        self.port = port
        if self._name_log_by_port:
            named = self.log_path.with_name(f"weir-serve-{port}.log")
            try:
                os.replace(self.log_path, named)
                self.log_path = named
            except OSError:  # e.g. another user's old file of that name in /tmp: keep the first name
                pass
        print(f"[server] listening on {self.url} (log: {self.log_path})", flush=True)

    def log_tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def stop(self, grace: float = 20.0) -> int | None:
        try:
            return self._stop(grace)
        finally:
            if self._workdir is not None:
                shutil.rmtree(self._workdir, ignore_errors=True)

    def _stop(self, grace: float) -> int | None:
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
