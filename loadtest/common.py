"""Shared helpers for the benchmark scripts: arguments, the model and engine, workloads, percentiles, the
copy-bandwidth ceiling and the JSON report. The transformers peer is loadtest/hf_peer.py, the `weir
serve` subprocess loadtest/server_process.py, a timed stream loadtest/streaming.py, the table of a
folder's reports loadtest/summary.py.

Every script runs the same way on a CPU with a tiny model (CI smoke test) and on a GPU at real shapes:

    python loadtest/bench_throughput.py --workload t1 --shape qwen3-0.6b --peer hf --out t1.json

`python loadtest/summary.py DIR` prints the table of every JSON report in DIR.
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
import pstats
import random
import signal
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

from loadtest.model_shapes import SHAPES, active_parameters, num_parameters, shape_dir  # noqa: E402

SHAPE_CHOICES = tuple(SHAPES)
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


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
    g.add_argument(
        "--admission-reserve-tokens",
        type=int,
        default=None,
        help="KV blocks kept free at admission for each running request's next this-many tokens "
        "(engine default: 128; 0: vLLM's policy, preempt to grow)",
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


def add_peer_last_arg(p: argparse.ArgumentParser) -> None:
    """--peer-last, for the scripts whose generate() peer can run after weir's measurement."""
    p.add_argument(
        "--peer-last",
        action="store_true",
        help="run the generate() peer after weir's measurement (a slow peer then loses only its own "
        "figure to a timeout; device_call.sh's MoE steps)",
    )


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
        return self.num_parameters * DTYPE_BYTES[self.dtype]

    def step_weight_bytes(self, num_tokens: int) -> float:
        """Weight bytes a forward over num_tokens tokens reads: weight_bytes for a dense model; for an MoE
        model the experts its tokens choose (model_shapes.active_parameters)."""
        return active_parameters(self.config, num_tokens) * DTYPE_BYTES[self.dtype]

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
        "admission_reserve_tokens": getattr(args, "admission_reserve_tokens", None),
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
    stats = allocator_stats()
    if stats:
        info["cuda_allocator"] = stats
    return info


# The caching allocator's counters that tell whether a step's launch could have waited on the device:
# an alloc retry frees cached blocks after a failed cudaMalloc, synchronizing the device first, and a
# cudaMalloc / cudaFree past start-up means the cache did not hold a step's working memory.
_ALLOCATOR_COUNTERS = (
    "num_alloc_retries",
    "num_ooms",
    "num_device_alloc",
    "num_device_free",
    "num_sync_all_streams",
)


def allocator_stats() -> dict[str, int]:
    """The CUDA caching allocator's counters since the process started ({} without CUDA)."""
    try:
        import torch

        if not torch.cuda.is_available() or not torch.cuda.is_initialized():
            return {}
        stats = torch.cuda.memory_stats()
    except Exception:  # noqa: BLE001 - a report, never a failure
        return {}
    return {k: int(stats[k]) for k in _ALLOCATOR_COUNTERS if k in stats}


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


def copy_bandwidth_phase(report: Report, device: str, nbytes: int | None) -> dict[str, Any] | None:
    with phase(report, "copy_bandwidth", required=False):
        report["copy_bandwidth"] = measure_copy_bandwidth(device, nbytes)
    return report["copy_bandwidth"]


def profile_rows(stats: pstats.Stats, key: str, top: int) -> list[dict[str, Any]]:
    """A cProfile run's top `top` functions by `key` ("tottime", "cumulative"), as JSON rows."""
    stats.sort_stats(key)
    rows = []
    for func in stats.fcn_list[:top]:  # type: ignore[attr-defined]
        cc, nc, tt, ct, _ = stats.stats[func]  # type: ignore[attr-defined]
        filename, line, name = func
        rows.append(
            {
                "function": f"{Path(filename).parent.name}/{Path(filename).name}:{line}({name})"
                if line
                else name,
                "calls": nc,
                "own_s": round(tt, 4),
                "cumulative_s": round(ct, 4),
            }
        )
    return rows
