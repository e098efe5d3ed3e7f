"""Shared helpers for the benchmark scripts: arguments, workloads, the copy-bandwidth ceiling, the
transformers generate() peer, the `weir serve` subprocess, percentiles and the JSON report.

Every script runs the same way on a CPU with a tiny model (CI smoke test) and on a GPU at real shapes:

    python loadtest/bench_throughput.py --workload t1 --shape qwen3-0.6b --peer hf --out t1.json

`python loadtest/common.py summary DIR` prints the table of every JSON report in DIR.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import gc
import json
import math
import os
import platform
import random
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from engine.startup_phases import PHASES as STARTUP_PHASES  # noqa: E402 - plain Python, no torch
from loadtest.model_shapes import PUBLIC_SHAPES, SHAPES, num_parameters, shape_dir  # noqa: E402

SHAPE_CHOICES = tuple(SHAPES)
_DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


# --------------------------------------------------------------------------------------------- arguments
def add_common_args(
    parser: argparse.ArgumentParser, default_shape: str | None = None, peers: Sequence[str] = ("hf",)
) -> None:
    """The flags every script shares: model selection, engine knobs, peer, output."""
    g = parser.add_argument_group("model and engine")
    src = g.add_mutually_exclusive_group()
    src.add_argument("--model", help="model directory (HF layout)")
    src.add_argument(
        "--shape",
        choices=SHAPE_CHOICES,
        default=None,
        help=f"random weights at a real model shape (load_format dummy); default {default_shape}",
    )
    g.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    g.add_argument("--dtype", default="auto", choices=("auto", "float32", "float16", "bfloat16"))
    g.add_argument("--load-format", default=None, choices=("auto", "safetensors", "dummy"))
    g.add_argument("--max-model-len", type=int, default=None)
    g.add_argument("--num-kv-blocks", type=int, default=None)
    g.add_argument("--max-num-seqs", type=int, default=None)
    g.add_argument("--max-num-batched-tokens", type=int, default=None)
    g.add_argument(
        "--long-prefill-token-threshold",
        type=int,
        default=None,
        help="one request's prompt tokens per step (engine default: 0, the whole budget)",
    )
    g.add_argument("--gpu-memory-utilization", type=float, default=None)
    g.add_argument("--enforce-eager", action="store_true")
    g.add_argument(
        "--max-cuda-graph-mixed-tokens",
        type=int,
        default=None,
        help="capture prefill+decode steps up to this many tokens as CUDA graphs (engine default: 0, off)",
    )
    g.add_argument(
        "--tensor-parallel-size",
        "-tp",
        type=int,
        default=None,
        help="shard the model over this many GPUs, one worker process each (engine default: 1)",
    )
    g.add_argument(
        "--kv-cache-dtype",
        default=None,
        choices=("auto", "fp8", "fp8_e4m3", "fp8_e5m2"),
        help="engine default: auto",
    )
    g.add_argument(
        "--quantization",
        default=None,
        help="e.g. fp8 (weights quantized at load); engine default: the checkpoint's",
    )
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--temperature", type=float, default=1.0, help="1.0 as vLLM's benchmarks; 0 is greedy")
    p = parser.add_argument_group("peer and output")
    p.add_argument(
        "--peer",
        default="none",
        type=peer_list_type(peers),
        help=f"comma-separated, of {', '.join(peers)} (hf: transformers generate(); hf-cb: transformers' "
        "continuous batching, loadtest/hf_cb_peer.py), or none",
    )
    p.add_argument(
        "--peer-batch-size", type=int, default=None, help="static batch to try first (halved on OOM)"
    )
    p.add_argument(
        "--peer-max-requests",
        type=int,
        default=None,
        help="run the peer on the first N requests; extrapolate",
    )
    p.add_argument(
        "--peer-max-steps",
        type=int,
        default=None,
        help="decode at most N steps per peer batch; extrapolate the batch time from the measured steps",
    )
    p.add_argument("--copy-bytes", type=int, default=None, help="buffer size of the copy-bandwidth probe")
    p.add_argument("--out", "--output-json", dest="out", default=None, help="write the JSON report here")
    parser.set_defaults(_default_shape=default_shape)


def peer_list_type(allowed: Sequence[str]) -> Any:
    """argparse type for --peer: 'none', one peer or a comma list of them, normalised ('hf-cb,hf' -> 'hf,hf-cb')."""

    def parse(text: str) -> str:
        names = [n.strip() for n in text.split(",") if n.strip()]
        if names == ["none"]:
            return "none"
        bad = [n for n in names if n not in allowed]
        if bad or not names:
            raise argparse.ArgumentTypeError(
                f"expected none or a comma list of {', '.join(allowed)}; got {text!r}"
            )
        return ",".join(n for n in allowed if n in names)

    return parse


def peer_names(args: argparse.Namespace) -> list[str]:
    """The peers --peer asked for, in a fixed order ([] for none)."""
    return [] if args.peer == "none" else args.peer.split(",")


def parse_len(text: str) -> tuple[int, int]:
    """'128' -> (128, 128); '100:1024' -> (100, 1024), both inclusive."""
    parts = str(text).split(":")
    try:
        lo, hi = (int(parts[0]), int(parts[0])) if len(parts) == 1 else (int(parts[0]), int(parts[1]))
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected N or LO:HI, got {text!r}") from e
    if len(parts) > 2 or lo <= 0 or hi < lo:
        raise argparse.ArgumentTypeError(f"expected N or LO:HI with 0 < LO <= HI, got {text!r}")
    return lo, hi


@dataclass(slots=True)
class ModelChoice:
    model_dir: str
    shape: str | None
    load_format: str
    config: dict[str, Any]
    device: str  # resolved: cpu | cuda
    dtype: str  # resolved: float32 | float16 | bfloat16

    @property
    def num_parameters(self) -> int:
        return num_parameters(self.config)

    @property
    def weight_bytes(self) -> int:
        return self.num_parameters * _DTYPE_BYTES[self.dtype]

    @property
    def vocab_size(self) -> int:
        return int(self.config["vocab_size"])

    @property
    def max_position_embeddings(self) -> int:
        return int(self.config.get("max_position_embeddings", 2048))

    def describe(self) -> dict[str, Any]:
        return {
            "shape": self.shape,
            "dir": self.model_dir,
            "architecture": (self.config.get("architectures") or [None])[0],
            "load_format": self.load_format,
            "dtype": self.dtype,
            "num_parameters": self.num_parameters,
            "weight_bytes": self.weight_bytes,
            "vocab_size": self.vocab_size,
        }


def resolve_device(device: str) -> str:
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_dtype(dtype: str, device: str) -> str:
    if dtype != "auto":
        return dtype
    # bf16 on every GPU these benchmarks target; asking torch would create a CUDA context in processes
    # (S1's and U1's clients) that should leave the whole device to the server.
    return "bfloat16" if device == "cuda" else "float32"


def resolve_model(args: argparse.Namespace) -> ModelChoice:
    shape = args.shape
    if not args.model and not shape:
        shape = args._default_shape
    if not args.model and not shape:
        raise SystemExit("give --model DIR or --shape NAME")
    if shape:
        model_dir = str(shape_dir(shape))
        load_format = args.load_format or "dummy"
    else:
        model_dir = str(Path(args.model).resolve())
        load_format = args.load_format or "auto"
    config = json.loads((Path(model_dir) / "config.json").read_text())
    device = resolve_device(args.device)
    return ModelChoice(model_dir, shape, load_format, config, device, resolve_dtype(args.dtype, device))


def default_max_model_len(args: argparse.Namespace, model: ModelChoice, needed: int) -> int | None:
    """--max-model-len if given; for a --shape, the workload's longest sequence rounded up to 256
    (the real checkpoints allow 8k-40k, which would only shrink the KV budget per sequence); else the
    model's own limit."""
    if args.max_model_len:
        return args.max_model_len
    if model.shape:
        return min(model.max_position_embeddings, max(256, -(-needed // 256) * 256))
    return None


def engine_kwargs(args: argparse.Namespace, model: ModelChoice, **overrides: Any) -> dict[str, Any]:
    """Keyword arguments for `LLM(model_dir, **kw)`; flags left unset keep the engine's defaults."""
    kw: dict[str, Any] = {
        "dtype": model.dtype,
        "device": model.device,
        "load_format": model.load_format,
        "seed": args.seed,
    }
    optional = {
        "max_model_len": args.max_model_len,
        "num_kv_blocks": args.num_kv_blocks,
        "max_num_seqs": args.max_num_seqs,
        "max_num_batched_tokens": args.max_num_batched_tokens,
        "long_prefill_token_threshold": getattr(args, "long_prefill_token_threshold", None),
        "gpu_memory_utilization": args.gpu_memory_utilization,
        "max_cuda_graph_mixed_tokens": getattr(args, "max_cuda_graph_mixed_tokens", None),
        "tensor_parallel_size": getattr(args, "tensor_parallel_size", None),
        "kv_cache_dtype": getattr(args, "kv_cache_dtype", None),
        "quantization": getattr(args, "quantization", None),
    }
    kw.update({k: v for k, v in optional.items() if v is not None})
    if args.enforce_eager:
        kw["enforce_eager"] = True
    kw.update({k: v for k, v in overrides.items() if v is not None})
    return kw


def build_llm(model: ModelChoice, kwargs: dict[str, Any]) -> tuple[Any, float]:
    """Construct the offline engine; returns (llm, seconds)."""
    from engine import LLM

    t0 = time.perf_counter()
    llm = LLM(model.model_dir, **kwargs)
    return llm, time.perf_counter() - t0


def engine_runner(llm: Any) -> Any:
    """The in-process model runner behind an LLM or LLMEngine (through its executor), or None."""
    engine = getattr(llm, "llm_engine", llm)
    return getattr(getattr(engine, "executor", None), "runner", None)


def engine_info(llm: Any) -> dict[str, Any]:
    """What the engine resolved at start-up (read defensively: these are not a stable API)."""
    engine = getattr(llm, "llm_engine", llm)
    runner = engine_runner(llm)
    info: dict[str, Any] = {}
    for name, obj, attr in (
        ("startup_s", engine, "startup_seconds"),
        ("num_kv_blocks", engine, "num_kv_blocks"),
        ("max_model_len", engine, "max_model_len"),
        ("max_num_batched_tokens", engine, "max_num_batched_tokens"),
        ("runner_timings", runner, "timings"),
        ("memory_profile_gib", runner, "memory_profile"),
        ("use_cuda_graphs", runner, "use_cuda_graphs"),
    ):
        value = getattr(obj, attr, None) if obj is not None else None
        if isinstance(value, dict):
            value = {str(k): v for k, v in value.items() if isinstance(v, int | float | str | bool)}
        if isinstance(value, int | float | str | bool | dict):
            info[name] = value
    graph_runner = getattr(runner, "graph_runner", None)
    sizes = getattr(graph_runner, "sizes", None)
    if isinstance(sizes, list | tuple):
        info["cuda_graph_sizes"] = [min(sizes), max(sizes), len(sizes)] if sizes else []
    return info


def free_engine(llm: Any) -> None:
    """Drop an engine and give its device memory back, so the next phase starts clean."""
    for name in ("shutdown", "close"):
        fn = getattr(llm, name, None) or getattr(getattr(llm, "llm_engine", None), name, None)
        if callable(fn):
            with contextlib.suppress(Exception):
                fn()
            break
    del llm
    free_device_memory()


def free_device_memory() -> None:
    gc.collect()
    try:
        import torch

        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
    except Exception:  # noqa: BLE001 - best effort
        pass


def step_loop_delta(before: dict[str, float] | None, after: dict[str, float] | None) -> dict[str, Any] | None:
    """Seconds per step-loop phase between two readings (engine/step_loop_times.py), and each
    phase's share of their sum."""
    if not before or not after:
        return None
    delta = {k: round(after[k] - before.get(k, 0.0), 4) for k in after}
    total = sum(v for k, v in delta.items() if k != "steps")
    if total > 0:
        delta["shares"] = {k: round(v / total, 4) for k, v in delta.items() if k not in ("steps", "shares")}
    return delta


def sampling_params(max_tokens: int, temperature: float) -> Any:
    from engine import SamplingParams

    return SamplingParams(temperature=temperature, top_p=1.0, max_tokens=max_tokens, ignore_eos=True)


# --------------------------------------------------------------------------------------------- workloads
@dataclass(slots=True)
class Workload:
    prompts: list[list[int]]
    output_lens: list[int]
    description: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.prompts)

    @property
    def num_prompt_tokens(self) -> int:
        return sum(len(p) for p in self.prompts)

    @property
    def num_output_tokens(self) -> int:
        return sum(self.output_lens)

    @property
    def max_seq_len(self) -> int:
        return max(len(p) + o for p, o in zip(self.prompts, self.output_lens, strict=True))

    def head(self, n: int | None) -> Workload:
        if n is None or n >= len(self):
            return self
        return Workload(self.prompts[:n], self.output_lens[:n], {**self.description, "subset_of": len(self)})


def random_workload(
    num_requests: int,
    input_len: tuple[int, int],
    output_len: tuple[int, int],
    seed: int = 0,
    token_id_max: int = 10000,
) -> Workload:
    """nano-vllm's benchmark recipe: for each sequence a prompt length uniform in input_len, then its ids
    uniform in [0, token_id_max); then every output length uniform in output_len (inclusive bounds)."""
    rng = random.Random(seed)
    prompts = []
    for _ in range(num_requests):
        n = rng.randint(*input_len)
        prompts.append([rng.randrange(token_id_max) for _ in range(n)])
    output_lens = [rng.randint(*output_len) for _ in range(num_requests)]
    return Workload(
        prompts,
        output_lens,
        {
            "num_requests": num_requests,
            "input_len": list(input_len),
            "output_len": list(output_len),
            "token_ids": [0, token_id_max],
            "seed": seed,
        },
    )


def shared_prefix_workload(
    num_requests: int,
    prefix_len: int,
    suffix_len: int,
    output_len: int,
    seed: int = 0,
    token_id_max: int = 10000,
) -> Workload:
    """One shared system prompt of prefix_len tokens, then suffix_len own tokens per request (P1)."""
    rng = random.Random(seed)
    prefix = [rng.randrange(token_id_max) for _ in range(prefix_len)]
    prompts = [prefix + [rng.randrange(token_id_max) for _ in range(suffix_len)] for _ in range(num_requests)]
    return Workload(
        prompts,
        [output_len] * num_requests,
        {
            "num_requests": num_requests,
            "shared_prefix_len": prefix_len,
            "own_len": suffix_len,
            "output_len": output_len,
            "token_ids": [0, token_id_max],
            "seed": seed,
        },
    )


# --------------------------------------------------------------------------------------------- statistics
def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (0..100) with linear interpolation (numpy's default); None when empty."""
    if not values:
        return None
    xs = sorted(values)
    if len(xs) == 1:
        return float(xs[0])
    pos = (len(xs) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return float(xs[lo] + (xs[hi] - xs[lo]) * (pos - lo))


def summarize_ms(values_s: Sequence[float], prefix: str) -> dict[str, float | None]:
    """p50/p90/p99/mean in milliseconds of a list of seconds, keyed `<prefix>_p50_ms` etc."""
    ms = [v * 1000.0 for v in values_s]
    return {
        f"{prefix}_p50_ms": _round(percentile(ms, 50)),
        f"{prefix}_p90_ms": _round(percentile(ms, 90)),
        f"{prefix}_p99_ms": _round(percentile(ms, 99)),
        f"{prefix}_mean_ms": _round(statistics.fmean(ms)) if ms else None,
    }


def _round(x: float | None, digits: int = 4) -> float | None:
    return None if x is None else round(float(x), digits)


def ratio(ours: float | None, peer: float | None) -> float | None:
    if not ours or not peer:
        return None
    return round(ours / peer, 3)


# --------------------------------------------------------------------------------------------- bandwidth
def measure_copy_bandwidth(device: str, nbytes: int | None = None, reps: int | None = None) -> dict[str, Any]:
    """Copy bandwidth counting bytes read plus written (the decode roofline's ceiling), median of reps.

    cuda: a device-to-device copy of a 1 GiB buffer timed with events; cpu: a 64 MiB memcpy.
    """
    import torch

    if device == "cuda":
        nbytes = nbytes or (1 << 30)
        reps = reps or 20
        src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
        dst = torch.empty_like(src)
        for _ in range(3):
            dst.copy_(src)
        torch.cuda.synchronize()
        times = []
        for _ in range(reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            dst.copy_(src)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1000.0)
        del src, dst
        torch.cuda.empty_cache()
    else:
        nbytes = nbytes or (64 << 20)
        reps = reps or 5
        src = torch.empty(nbytes, dtype=torch.uint8)
        dst = torch.empty_like(src)
        dst.copy_(src)
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            dst.copy_(src)
            times.append(time.perf_counter() - t0)
        del src, dst
    t = statistics.median(times)
    bw = 2 * nbytes / t
    result = {
        "bytes_per_s": bw,
        "GB_s": round(bw / 1e9, 2),
        "buffer_bytes": nbytes,
        "reps": reps,
        "method": "device-to-device copy_, bytes read+written, median" if device == "cuda" else "memcpy",
    }
    print(
        f"[copy bandwidth] {result['GB_s']:.1f} GB/s ({device}, {nbytes >> 20} MiB, read+write)", flush=True
    )
    return result


# --------------------------------------------------------------------------------------------- the report
def device_name(device: str) -> str:
    """The card's name (nvidia-smi first: torch.cuda.get_device_name would create a CUDA context)."""
    if device == "cuda":
        try:
            out = subprocess.run(
                ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader", "-i", "0"],
                capture_output=True,
                text=True,
                timeout=30,
                check=True,
            ).stdout.strip()
            if out:
                return out.splitlines()[0].strip()
        except (OSError, subprocess.SubprocessError):
            pass
        import torch

        return torch.cuda.get_device_name(0)
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def git_commit() -> tuple[str | None, bool | None]:
    """(commit, dirty) of the repository; WEIR_COMMIT overrides (the device copy has no .git)."""
    env = os.environ.get("WEIR_COMMIT")
    if env:
        return env, None
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        return commit or None, bool(dirty)
    except (OSError, subprocess.SubprocessError):
        return None, None


class Report:
    """The JSON report of one benchmark run, saved after every phase so a timeout keeps what finished."""

    def __init__(self, benchmark: str, args: argparse.Namespace, model: ModelChoice | None) -> None:
        import torch

        commit, dirty = git_commit()
        device = model.device if model else resolve_device(args.device)
        self.path = args.out
        self._fatal = False
        self.data: dict[str, Any] = {
            "benchmark": benchmark,
            "status": "running",
            "card": device_name(device),
            "device": device,
            "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "commit": commit,
            "git_dirty": dirty,
            "versions": {
                "python": platform.python_version(),
                "torch": torch.__version__,
                "cuda": torch.version.cuda,
                "transformers": _version("transformers"),
            },
            "argv": sys.argv[1:],
            "model": model.describe() if model else None,
            "workload": {},
            "copy_bandwidth": None,
            "results": {},
            "peer": None,
            "ratios": {},
            "notes": [],
            "errors": [],
        }

    def __getitem__(self, key: str) -> Any:
        return self.data[key]

    def __setitem__(self, key: str, value: Any) -> None:
        self.data[key] = value

    def note(self, text: str) -> None:
        self.data["notes"].append(text)

    def error(self, phase: str, exc: BaseException, fatal: bool = True) -> None:
        """Record a failed phase; a fatal one (our own figures) makes the run's status "error"."""
        msg = f"{phase}: {type(exc).__name__}: {exc}"
        print(f"[error] {msg}", file=sys.stderr, flush=True)
        self.data["errors"].append(msg)
        if fatal:
            self._fatal = True

    def save(self) -> None:
        if self.path:
            write_json(self.path, self.data)

    def finish(self) -> int:
        """Mark done, save, print the report; exit status 1 when our own figures are missing."""
        failed = self._fatal or not self.data["results"]
        self.data["status"] = "error" if failed else "ok"
        self.save()
        print(json.dumps({k: self.data[k] for k in ("benchmark", "results", "peer", "ratios")}, indent=2))
        if self.path:
            print(f"wrote {self.path}")
        return 1 if failed else 0


def write_json(path: str | Path, data: Any) -> None:
    """Strict JSON (NaN and infinities become null), written atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(_finite(data), indent=2, default=str, allow_nan=False) + "\n")
    os.replace(tmp, path)


def _finite(x: Any) -> Any:
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {str(k): _finite(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_finite(v) for v in x]
    return x


def _version(module: str) -> str | None:
    try:
        return __import__(module).__version__
    except Exception:  # noqa: BLE001
        return None


def install_signal_handlers() -> None:
    """SIGTERM (from `timeout`) unwinds like Ctrl-C, so finally-blocks stop servers and save reports."""

    def _raise(signum: int, _frame: Any) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, _raise)


@contextlib.contextmanager
def phase(report: Report, name: str, required: bool = True) -> Iterator[None]:
    """Run one phase: print timing, record an exception in the report (re-raised when required)."""
    t0 = time.perf_counter()
    print(f"[{name}] ...", flush=True)
    try:
        yield
    except Exception as exc:
        report.error(name, exc, fatal=required)
        report.save()
        if required:
            raise
        import traceback

        traceback.print_exc()
    else:
        print(f"[{name}] done in {time.perf_counter() - t0:.1f}s", flush=True)
        report.save()


# --------------------------------------------------------------------------------------------- the peer
class HFPeer:
    """transformers generate() at the same shape with random weights, in static batches.

    The ignore_eos equivalent is min_new_tokens=max_new_tokens with eos_token_id=None. A static batch runs
    to its longest output; only the workload's own output tokens are counted.
    """

    def __init__(self, model: ModelChoice, seed: int = 0) -> None:
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM

        self.torch = torch
        self.device = model.device
        self.dtype = getattr(torch, model.dtype)
        self.model_choice = model
        config = AutoConfig.from_pretrained(model.model_dir)
        torch.manual_seed(seed)
        t0 = time.perf_counter()
        with torch.device(self.device):
            self.model = AutoModelForCausalLM.from_config(config, dtype=self.dtype)
        self.model.eval()
        gc_ = self.model.generation_config
        gc_.eos_token_id = None
        gc_.pad_token_id = 0
        self._sync()
        self.build_seconds = time.perf_counter() - t0
        self.num_parameters = sum(p.numel() for p in self.model.parameters())

    def _sync(self) -> None:
        if self.device == "cuda":
            self.torch.cuda.synchronize()

    def close(self) -> None:
        del self.model
        free_device_memory()

    def generate_batch(
        self, prompts: list[list[int]], max_new_tokens: int, temperature: float, max_steps: int | None = None
    ) -> dict[str, Any]:
        """One static batch, left-padded. Returns times: prefill (to the first token), per-step times,
        and the batch time, extrapolated to max_new_tokens when max_steps cut it short."""
        import torch
        from transformers import StoppingCriteria, StoppingCriteriaList

        device, sync = self.device, self._sync

        class _Clock(StoppingCriteria):
            """Called after every new token; records when it arrived (syncing, as generate() does anyway)."""

            def __init__(self) -> None:
                self.times: list[float] = []

            def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
                sync()
                self.times.append(time.perf_counter())
                return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

        steps = max_new_tokens if max_steps is None else max(2, min(max_new_tokens, max_steps))
        width = max(len(p) for p in prompts)
        ids = torch.zeros((len(prompts), width), dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, width - len(p) :] = torch.tensor(p, dtype=torch.long)
            mask[i, width - len(p) :] = 1
        ids, mask = ids.to(device), mask.to(device)
        clock = _Clock()
        sample = temperature > 0
        extra: dict[str, Any] = {"temperature": temperature, "top_k": 0, "top_p": 1.0} if sample else {}
        sync()
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = self.model.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=steps,
                min_new_tokens=steps,
                do_sample=sample,
                eos_token_id=None,
                pad_token_id=0,
                stopping_criteria=StoppingCriteriaList([clock]),
                **extra,
            )
        sync()
        t_end = time.perf_counter()
        generated = int(out.shape[1]) - width
        del out, ids, mask
        times = clock.times
        prefill = times[0] - t0 if times else t_end - t0
        gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
        if steps < max_new_tokens and gaps:
            batch_time = prefill + statistics.fmean(gaps) * (max_new_tokens - 1)
        else:
            batch_time = t_end - t0
        return {
            "prefill_s": prefill,
            "gaps_s": gaps,
            "steps_run": generated,
            "steps_full": max_new_tokens,
            "measured_s": t_end - t0,
            "batch_s": batch_time,
        }

    def pick_batch_size(self, requested: int, max_prompt: int, max_seq: int) -> int:
        """The requested batch, halved while a rough memory estimate says it cannot fit (cuda only).

        Estimate per sequence: the KV cache at max_seq, plus prefill activations (MLP intermediates and
        attention scores) at max_prompt. OOM at run time halves further.
        """
        if self.device != "cuda":
            return requested
        cfg = self.model_choice.config
        h, ffn = int(cfg["hidden_size"]), int(cfg["intermediate_size"])
        n_heads = int(cfg["num_attention_heads"])
        n_kv = int(cfg.get("num_key_value_heads") or n_heads)
        head_dim = int(cfg.get("head_dim") or h // n_heads)
        layers = int(cfg["num_hidden_layers"])
        b = _DTYPE_BYTES[self.model_choice.dtype]
        kv = 2 * layers * n_kv * head_dim * b * max_seq
        act = (
            max_prompt * b * (4 * ffn + 8 * h + 2 * n_heads * head_dim)
            + b * n_heads * max_prompt * max_prompt
        )
        free, _total = self.torch.cuda.mem_get_info()
        budget = 0.85 * free
        bs = max(1, requested)
        while bs > 1 and bs * (kv + act) > budget:
            bs //= 2
        return bs

    def run(
        self,
        workload: Workload,
        batch_size: int,
        temperature: float,
        max_requests: int | None = None,
        max_steps: int | None = None,
    ) -> dict[str, Any]:
        """Static batches over (the first max_requests of) the workload, in workload order.

        Throughput counts the workload's output tokens; time is measured, or extrapolated per batch from
        the first max_steps decode steps. With a request subset, throughput is the subset's (per-token
        rates are what carry over; the partial last batch of the full set is not modelled, which slightly
        favours the peer).
        """
        oom_type = getattr(self.torch, "OutOfMemoryError", None) or self.torch.cuda.OutOfMemoryError
        sub = workload.head(max_requests)
        bs = self.pick_batch_size(min(batch_size, len(sub)), max(map(len, sub.prompts)), sub.max_seq_len)
        first_bs = bs
        # Warm-up (excluded): one short batch, so kernels and allocator pools exist.
        self.generate_batch([p[:16] for p in sub.prompts[: min(bs, 4)]], 4, temperature)
        batches: list[dict[str, Any]] = []
        oom_retries = 0
        i = 0
        while i < len(sub):
            prompts = sub.prompts[i : i + bs]
            outs = sub.output_lens[i : i + bs]
            failed = False
            try:
                res = self.generate_batch(prompts, max(outs), temperature, max_steps)
            except oom_type:
                failed = True
            if failed:
                free_device_memory()
                if bs == 1:
                    raise RuntimeError("the peer runs out of memory even at batch size 1")
                bs //= 2
                oom_retries += 1
                print(f"[peer] OOM: retrying with batch size {bs}", flush=True)
                continue
            res.update(size=len(prompts), output_tokens=sum(outs), prompt_tokens=sum(map(len, prompts)))
            batches.append(res)
            print(
                f"[peer] batch {len(batches)}: {len(prompts)} seqs, {res['steps_run']}/{res['steps_full']} steps, "
                f"{res['measured_s']:.1f}s measured, {res['batch_s']:.1f}s full",
                flush=True,
            )
            i += len(prompts)
        total_s = sum(b["batch_s"] for b in batches)
        out_tokens = sum(b["output_tokens"] for b in batches)
        prompt_tokens = sum(b["prompt_tokens"] for b in batches)
        gaps = [g for b in batches for g in b["gaps_s"]]
        # TTFT with everything arriving at t=0: a request waits for the batches before its own.
        ttfts, clock = [], 0.0
        for b in batches:
            ttfts += [clock + b["prefill_s"]] * b["size"]
            clock += b["batch_s"]
        extrapolated = len(sub) < len(workload) or any(b["steps_run"] < b["steps_full"] for b in batches)
        return {
            "name": "transformers generate()",
            "batch_size": bs,
            "batch_size_first_tried": first_bs,
            "oom_retries": oom_retries,
            "requests_run": len(sub),
            "requests_total": len(workload),
            "max_steps_per_batch": max_steps,
            "extrapolated": extrapolated,
            "measured_s": round(sum(b["measured_s"] for b in batches), 3),
            "elapsed_s": round(total_s, 3),
            "output_tokens": out_tokens,
            "req_s": round(len(sub) / total_s, 4),
            "output_tok_s": round(out_tokens / total_s, 2),
            "total_tok_s": round((out_tokens + prompt_tokens) / total_s, 2),
            **summarize_ms(gaps, "itl"),
            **summarize_ms(ttfts, "ttft"),
            "model_build_s": round(self.build_seconds, 3),
            "counting": "the workload's output tokens; a static batch runs to its longest output",
        }


def run_peer(
    report: Report, model: ModelChoice, args: argparse.Namespace, workload: Workload, default_batch: int
) -> dict[str, Any] | None:
    """Run the HF peer on the workload (when --peer hf) as a non-fatal phase; frees it afterwards."""
    if "hf" not in peer_names(args):
        return None
    result: dict[str, Any] | None = None
    with phase(report, "peer", required=False):
        peer = HFPeer(model, seed=args.seed)
        try:
            result = peer.run(
                workload,
                batch_size=args.peer_batch_size or default_batch,
                temperature=args.temperature,
                max_requests=args.peer_max_requests,
                max_steps=args.peer_max_steps,
            )
        finally:
            peer.close()
        if result["extrapolated"]:
            steps = f"the first {args.peer_max_steps} decode steps" if args.peer_max_steps else "every step"
            report.note(
                f"peer extrapolated: {result['requests_run']}/{result['requests_total']} requests run, "
                f"{steps} of each batch timed"
            )
        report["peer"] = result
    return result


def copy_bandwidth_phase(report: Report, device: str, nbytes: int | None) -> dict[str, Any] | None:
    with phase(report, "copy_bandwidth", required=False):
        report["copy_bandwidth"] = measure_copy_bandwidth(device, nbytes)
    return report["copy_bandwidth"]


# --------------------------------------------------------------------------------------------- the server
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


# --------------------------------------------------------------------------------------------- streaming
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


# --------------------------------------------------------------------------------------------- summary
_SUMMARY_ROWS: list[tuple[str, str, str, str, str]] = [
    # (benchmark, label, path in results, path in peer (^: in the report), target)
    ("L1", "ITL p50 ms, batch 1", "batch_1.itl_p50_ms", "batch_1.itl_p50_ms", "<= 5.8 ms"),
    ("Q", "Q1 GPTQ ITL b1 / bf16", "vs_bf16.Q1_gptq_w4a16_itl_vs_bf16", "", "<= 0.40"),
    ("Q", "Q1 AWQ ITL b1 / bf16", "vs_bf16.Q1_awq_w4a16_itl_vs_bf16", "", "<= 0.40"),
    ("Q", "Q2 FP8 ITL b1 / bf16", "vs_bf16.Q2_fp8_itl_vs_bf16", "", "<= 0.60"),
    ("Q", "Q3 FP8 T2 tok/s / bf16", "vs_bf16.Q3_fp8_weights_throughput_vs_bf16", "", ">= 1.5"),
    ("Q", "Q4 FP8 KV blocks / bf16", "vs_bf16.Q4_kv_blocks_vs_bf16", "", "2.0"),
    ("Q", "Q4 FP8 KV T2 tok/s / bf16", "vs_bf16.Q4_fp8_kv_throughput_vs_bf16", "", ">= 1.0"),
    ("Q", "Q5 W4A16 b1 bandwidth frac", "vs_bf16.Q5_batch1_bandwidth_fraction_min", "", ">= 0.80"),
    ("A", "A1 tok/s, 8 adapters / base", "A1_8_adapters.vs_base", "", ">= 0.85"),
    ("A", "A2 tok/s, 64 adapters / base", "A2_64_adapters.vs_base", "", ">= 0.75"),
    ("A", "A3 ITL b1, 1 adapter / base", "A3.vs_base", "", "<= 1.15"),
    ("A", "A4 new adapter added ms", "A4.added_ms", "", "<= 100 ms"),
    ("L1", "roofline fraction, batch 1", "batch_1.roofline_fraction", "", ""),
    ("L1", "tok/s, batch 1", "batch_1.tok_s", "batch_1.tok_s", ""),
    ("L1", "ITL p50 ms, batch 8", "batch_8.itl_p50_ms", "batch_8.itl_p50_ms", ""),
    ("L1", "tok/s, batch 8", "batch_8.tok_s", "batch_8.tok_s", ""),
    ("T1", "output tok/s", "output_tok_s", "output_tok_s", ">= 15x peer"),
    ("T1", "output tok/s vs HF CB", "output_tok_s", "^peers.hf-cb.output_tok_s", ""),
    ("T2", "req/s", "req_s", "req_s", ""),
    ("T2", "output tok/s", "output_tok_s", "output_tok_s", ">= 8x peer"),
    ("T2", "total tok/s", "total_tok_s", "total_tok_s", ""),
    ("T2", "output tok/s vs HF CB", "output_tok_s", "^peers.hf-cb.output_tok_s", ""),
    ("S1", "output tok/s, rate inf", "rate_inf.output_tok_s", "", ""),
    ("S1", "serving/offline ratio", "serving_offline_ratio", "", ">= 0.95"),
    ("S1", "TTFT p50 ms, rate inf", "rate_inf.ttft_p50_ms", "", ""),
    ("S1", "TTFT p99 ms, rate inf", "rate_inf.ttft_p99_ms", "", ""),
    ("S1", "ITL p50 ms, rate inf", "rate_inf.itl_p50_ms", "", ""),
    ("S1", "ITL p99 ms, rate inf", "rate_inf.itl_p99_ms", "", ""),
    ("S1", "output tok/s, 16 req/s", "rate_16.output_tok_s", "", ""),
    ("S1", "TTFT p50 ms, 16 req/s", "rate_16.ttft_p50_ms", "", ""),
    ("S1", "ITL p50 ms, 16 req/s", "rate_16.itl_p50_ms", "", ""),
    ("P1", "TTFT p50 ms, cache on", "on.ttft_p50_ms", "ttft_p50_ms", ""),
    ("P1", "TTFT p50 ms, cache off", "off.ttft_p50_ms", "", ""),
    ("P1", "TTFT off/on", "ttft_p50_speedup", "", ">= 5x"),
    ("P1", "output tok/s, cache on", "on.output_tok_s", "output_tok_s", ""),
    ("P1", "output tok/s, cache off", "off.output_tok_s", "", ""),
    ("U1", "s to /health 200", "seconds_to_health", "", ""),
    ("U1", "s to first request", "seconds_to_first_request", "", "<= 60 s"),
    ("U1", "server s to listening", "startup_phases.total_s", "", ""),
    *(
        ("U1", f"server phase s: {name}", f"startup_phases.{name}_s", "", "")
        for name in (*STARTUP_PHASES, "other")
    ),
    ("U1", "split s: import torch", "imports_s.torch_s", "", ""),
    ("U1", "split s: weights", "in_process.runner_timings.weights_load_s|in_process.split_s.weights", "", ""),
    ("U1", "split s: KV profile", "in_process.runner_timings.profile_s", "", ""),
    ("U1", "split s: KV allocation", "in_process.runner_timings.kv_alloc_s", "", ""),
    (
        "U1",
        "split s: CUDA graph capture",
        "in_process.runner_timings.cuda_graph_capture_s|in_process.split_s.cuda_graphs",
        "",
        "",
    ),
    ("U1", "split s: engine build total", "in_process.engine_build_s", "", ""),
    ("K", "prefill step ms (8k tokens)", "prefill.wall_ms_per_step", "", ""),
    ("K", "prefill matmul TFLOP/s", "prefill.matmul_tflop_s", "", ""),
    ("K", "prefill busy fraction", "prefill.busy_fraction", "", ""),
    ("K", "decode step ms", "decode.wall_ms_per_step", "", ""),
    ("K", "decode attention KV GB/s", "decode.attention_kv_gb_s", "", ""),
    ("K", "decode busy fraction", "decode.busy_fraction", "", ""),
    ("K1", "step wall ms, batch 1 graphed", "batch1.graphed.wall_ms_per_step", "", ""),
    ("K1", "graph span us", "batch1.graphed.graph.span_us_median", "", ""),
    ("K1", "gaps inside the graph us", "batch1.graphed.graph.gap_us_per_replay", "", ""),
    ("K1", "roofline / graph span", "batch1.graphed.roofline_over_graph_span", "", ""),
    (
        "K1",
        "qkv_proj of copy bandwidth",
        "batch1.graphed.table.qkv_proj.fraction_of_copy_bw|batch1.eager_step.qkv_proj.fraction_of_copy_bw",
        "",
        "",
    ),
    (
        "K1",
        "o_proj of copy bandwidth",
        "batch1.graphed.table.o_proj.fraction_of_copy_bw|batch1.eager_step.o_proj.fraction_of_copy_bw",
        "",
        "",
    ),
    (
        "K1",
        "gate_up_proj of copy bandwidth",
        "batch1.graphed.table.gate_up_proj.fraction_of_copy_bw|batch1.eager_step.gate_up_proj.fraction_of_copy_bw",
        "",
        "",
    ),
    (
        "K1",
        "down_proj of copy bandwidth",
        "batch1.graphed.table.down_proj.fraction_of_copy_bw|batch1.eager_step.down_proj.fraction_of_copy_bw",
        "",
        "",
    ),
    (
        "K1",
        "lm_head of copy bandwidth",
        "batch1.graphed.table.lm_head.fraction_of_copy_bw|batch1.eager_step.lm_head.fraction_of_copy_bw",
        "",
        "",
    ),
    (
        "K1",
        "attention of copy bandwidth",
        "batch1.graphed.table.attention.fraction_of_copy_bw|batch1.eager_step.attention.fraction_of_copy_bw",
        "",
        "",
    ),
]


def _dig(d: Any, path: str) -> Any:
    """The value at a dotted path; 'a.b|c.d' takes the first alternative present."""
    if "|" in path:
        for alt in path.split("|"):
            found = _dig(d, alt)
            if found is not None:
                return found
        return None
    for key in path.split(".") if path else []:
        if not isinstance(d, dict) or key not in d:
            return None
        d = d[key]
    return d if path else None


def _fmt(x: Any) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:,.3f}" if abs(x) < 10 else f"{x:,.1f}"
    return str(x)


def summary_table(directory: str | Path) -> str:
    reports: dict[str, dict[str, Any]] = {}
    for f in sorted(Path(directory).glob("*.json")):
        try:
            d = json.loads(f.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if isinstance(d, dict) and "benchmark" in d:
            reports[d["benchmark"]] = d
    lines = []
    card = next((d.get("card") for d in reports.values() if d.get("card")), "?")
    commit = next((d.get("commit") for d in reports.values() if d.get("commit")), None)
    bw = next((d["copy_bandwidth"]["GB_s"] for d in reports.values() if d.get("copy_bandwidth")), None)
    lines.append(f"card: {card}   commit: {commit}   copy bandwidth: {_fmt(bw)} GB/s")
    header = f"{'id':<4} {'figure':<30} {'weir':>12} {'peer':>12} {'ratio':>8}  target"
    lines += [header, "-" * len(header)]
    for bench, label, ours_path, peer_path, target in _SUMMARY_ROWS:
        d = reports.get(bench)
        if d is None:
            continue
        ours = _dig(d.get("results"), ours_path)
        if peer_path.startswith("^"):
            peer = _dig(d, peer_path[1:])
        else:
            peer = _dig(d.get("peer"), peer_path) if peer_path else None
        r = None
        if isinstance(ours, int | float) and isinstance(peer, int | float) and peer:
            r = ours / peer
            if "ms" in label or label.startswith("s "):
                r = peer / ours if ours else None  # lower is better: show how many times faster
        lines.append(f"{bench:<4} {label:<30} {_fmt(ours):>12} {_fmt(peer):>12} {_fmt(r):>8}  {target}")
    for bench, d in reports.items():
        if d.get("status") != "ok" or d.get("errors"):
            lines.append(
                f"{bench}: status {d.get('status')}; errors: {'; '.join(d.get('errors') or []) or '-'}"
            )
    missing = [b for b in ("T1", "L1", "T2", "S1", "P1", "U1") if b not in reports]
    if missing:
        lines.append(f"no report: {', '.join(missing)}")
    return "\n".join(lines)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "summary":
        print(summary_table(sys.argv[2]))
    else:
        print(f"usage: python {sys.argv[0]} summary DIR (public shapes: {', '.join(PUBLIC_SHAPES)})")
