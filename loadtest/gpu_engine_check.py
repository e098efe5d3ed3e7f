"""GPU check of the engine (model runner, CUDA graphs, memory profile) in one device call.

a. Parity, float32, tiny random models of every family (tests/tiny_models.py): the engine on CUDA vs
   transformers generate() greedy token-for-token (CPU float32 reference), with CUDA graphs on, with
   enforce_eager, with chunked prefill (7-token budget), under preemption (9 blocks of 8) and with
   mixed-step graphs (max_cuda_graph_mixed_tokens=32, 24-token budget); graphs on
   and eager must give the same tokens, and graphs must really be replayed.
b. bfloat16 at the Qwen3-0.6B shape with random weights (load_format="dummy", re-drawn at a realistic
   N(0, 0.02) scale so greedy argmaxes are not coin flips): start-up split (runner.timings), memory
   profile vs what the engine really holds, graphs vs eager greedy tokens for a batch (bit-identical on
   the same padded inputs; plain eager reported), host syncs per decode step
   (torch.cuda.set_sync_debug_mode; none at all while an async-scheduling step is launched), decode
   step time at batch 1/32/128 with graphs vs eager vs graphs + async scheduling (end-to-end engine
   step, runner alone, GPU forward alone), where a step's host time goes, the host
   cost of each op launch in an eager forward, and the copy-bandwidth floor for context.
   Then fp32 at the same shape: graphs and plain eager must give identical greedy tokens.
d. Engines back to back: 6 LLMs on the tiny llama at gpu_memory_utilization=0.9 (profiled KV cache,
   CUDA graphs), one after another, each dropped, shut down or left by `with`, with the garbage
   collector off: each must get as many KV blocks as the first and give the same tokens, and the
   device memory must be back to where it was right after each one goes (no cycle holds it).
c. tests/engine/test_cuda_graphs.py under pytest (its CUDA test runs here).

Prints a PASS/FAIL and timing table last; writes $OUT/engine_check.json.
Run: PYTHONUNBUFFERED=1 python loadtest/gpu_engine_check.py
Imports nothing from app/ (the GPU machine lacks the HTTP stack).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import datetime
import json
import logging
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from engine import LLM, SamplingParams  # noqa: E402
from loadtest.gpu_timing import back_to_back_ms  # noqa: E402
from tests.tiny_models import FAMILIES, build_model, build_tokenizer, hf_causal_lm, preemption_cache  # noqa: E402

OUT_DIR = os.environ.get("OUT")
START = time.time()
# The device call's limit: the pytest part only starts with time to finish before it.
HARD_LIMIT_S = float(os.environ.get("WEIR_CHECK_LIMIT_S", "410"))
RESULTS: dict[str, Any] = {"checks": [], "timings": {}, "info": {}, "errors": []}
GIB = 1 << 30

logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")


def elapsed() -> float:
    return time.time() - START


def check(name: str, ok: bool, **detail: Any) -> bool:
    RESULTS["checks"].append({"name": name, "ok": bool(ok), **detail})
    extra = ", ".join(f"{k}={v}" for k, v in detail.items())
    print(f"[{'PASS' if ok else 'FAIL'}] {name}" + (f" ({extra})" if extra else ""), flush=True)
    return ok


def save() -> None:
    if OUT_DIR:
        Path(OUT_DIR).mkdir(parents=True, exist_ok=True)
        (Path(OUT_DIR) / "engine_check.json").write_text(json.dumps(RESULTS, indent=2, default=str))


def run_part(
    name: str,
    fn: Callable[[], None],
    limit_s: float | None = None,
    save_results: Callable[[], None] | None = None,
) -> None:
    """Run one part; an exception (a missing feature, an import error) is a FAIL line, not a crash. A part
    due after `limit_s` seconds of the call is a FAIL without running; results go to `save_results`
    (default: this script's engine_check.json) after each part."""
    print(f"\n=== {name} ({elapsed():.0f}s) ===", flush=True)
    if limit_s is not None and elapsed() > limit_s:
        check(f"{name}: ran", False, reason=f"no time left ({elapsed():.0f}s > {limit_s:.0f}s)")
        return
    try:
        fn()
    except Exception as e:  # noqa: BLE001 - report and go on to the next part
        traceback.print_exc()
        RESULTS["errors"].append(
            {"part": name, "error": f"{type(e).__name__}: {e}", "tb": traceback.format_exc()}
        )
        check(f"{name}: ran to the end", False, error=f"{type(e).__name__}: {e}"[:300])
    finally:
        free()
        (save_results or save)()


def free() -> None:
    import gc

    gc.collect()
    if torch.cuda.is_available():  # gpu_feature_check's --dry-run runs on a CPU machine
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def strict(llm: LLM) -> LLM:
    """Make a failed forward raise instead of failing the requests quietly."""

    def fail(_so: Any, exc: BaseException) -> list:
        raise exc

    llm.llm_engine.fail_scheduled = fail  # type: ignore[method-assign]
    return llm


def count_replays(llm: LLM) -> dict[Any, int]:
    """Wrap the graph runner's replay with a counter: batch size (mixed graphs: "mixed<T>") -> replays."""
    counts: dict[Any, int] = {}
    runner = llm.llm_engine.executor.runner
    gr = runner.graph_runner
    if gr is None:
        return counts
    replay = gr.replay

    def counted(md: Any) -> torch.Tensor:
        key = f"mixed{md.cuda_graph_size}" if md.cuda_graph_mixed else md.cuda_graph_size
        counts[key] = counts.get(key, 0) + 1
        return replay(md)

    gr.replay = counted  # type: ignore[method-assign]
    return counts


def first_divergence(a: list[list[int]], b: list[list[int]]) -> list[tuple[int, int]]:
    """(sequence, position) of the first differing token of each differing sequence."""
    out = []
    for i, (x, y) in enumerate(zip(a, b, strict=True)):
        if x != y:
            pos = next((j for j, (p, q) in enumerate(zip(x, y, strict=False)) if p != q), min(len(x), len(y)))
            out.append((i, pos))
    return out


# ------------------------------------------------------------------------------------------ a. tiny parity
TINY_PROMPT_LENGTHS = (5, 17, 33, 40)
TINY_MAX_TOKENS = 20


def hf_greedy(
    model_dir: Path, prompts: list[list[int]], max_tokens: int, device: str = "cpu"
) -> list[list[int]]:
    """transformers' greedy continuation of each prompt (float32, on `device`), EOS ignored."""
    model = hf_causal_lm(str(model_dir), dtype=torch.float32).to(device).eval()
    outs = []
    with torch.no_grad():
        for p in prompts:
            seq = model.generate(
                torch.tensor([p], device=device),
                max_new_tokens=max_tokens,
                do_sample=False,
                eos_token_id=None,
                pad_token_id=0,
            )
            outs.append(seq[0, len(p) :].tolist())
    return outs


def tiny_parity() -> None:
    RESULTS["info"]["tf32"] = {
        "torch.backends.cuda.matmul.allow_tf32": torch.backends.cuda.matmul.allow_tf32,
        "torch.backends.cudnn.allow_tf32": torch.backends.cudnn.allow_tf32,
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
        "triton paged_attention fp32 dot": "input_precision='ieee' (ops/triton/paged_attention.py)",
    }
    root = Path(tempfile.mkdtemp(prefix="weir-tiny-"))
    tok = build_tokenizer(root / "tokenizer")
    rng = random.Random(0)
    prompts = [[rng.randrange(3, 500) for _ in range(n)] for n in TINY_PROMPT_LENGTHS]
    params = SamplingParams(temperature=0.0, max_tokens=TINY_MAX_TOKENS, ignore_eos=True)
    common = dict(device="cuda", dtype="float32", max_cuda_graph_batch_size=8)
    configs: dict[str, dict[str, Any]] = {
        "graphs": dict(num_kv_blocks=256),
        "eager": dict(num_kv_blocks=256, enforce_eager=True),
        "chunked_prefill": dict(num_kv_blocks=256, max_num_batched_tokens=7),
        "preemption": {},  # preemption_cache(family), per family below
        # Mixed prefill+decode steps replayed from CUDA graphs (off by default in the engine).
        "mixed_graphs": dict(num_kv_blocks=256, max_num_batched_tokens=24, max_cuda_graph_mixed_tokens=32),
    }
    summary = RESULTS["info"]["tiny_parity"] = {}
    for family in FAMILIES:
        model_dir = build_model(family, root / family, tok)
        expected = hf_greedy(model_dir, prompts, TINY_MAX_TOKENS)
        got: dict[str, list[list[int]]] = {}
        fam = summary[family] = {}
        for name, kw in configs.items():
            if name == "preemption":
                kw = preemption_cache(family)
            llm = strict(LLM(str(model_dir), **common, **kw))
            replays = count_replays(llm)
            outs = llm.generate(prompts, params, use_tqdm=False)
            got[name] = [o.outputs[0].token_ids for o in outs]
            stats = llm.llm_engine.stats()
            fam[name] = {
                "matches_hf": got[name] == expected,
                "divergences": first_divergence(got[name], expected),
                "graph_replays": replays,
                "preemptions": stats.num_preemptions,
                "capture_s": round(llm.llm_engine.executor.runner.timings["cuda_graph_capture_s"], 3),
            }
            ok = got[name] == expected
            detail: dict[str, Any] = {}
            if not ok:
                detail["first_divergence"] = fam[name]["divergences"]
            if name != "eager":
                replayed = sum(replays.values())
                detail["graph_replays"] = replayed
                ok = ok and replayed > 0
            else:
                ok = ok and llm.llm_engine.executor.runner.graph_runner is None
            if name == "mixed_graphs":
                mixed_replays = sum(v for k, v in replays.items() if str(k).startswith("mixed"))
                detail["mixed_graph_replays"] = mixed_replays
                ok = ok and mixed_replays > 0
            if name == "preemption":
                detail["preemptions"] = stats.num_preemptions
                ok = ok and stats.num_preemptions > 0
            check(f"tiny {family} fp32 {name}: tokens == transformers", ok, **detail)
            del llm, outs
            free()
        check(f"tiny {family} fp32: graphs == eager tokens", got["graphs"] == got["eager"])


# ------------------------------------------------------------------------------------------ b. Qwen3-0.6B bf16
QWEN_MAX_MODEL_LEN = 4096
DECODE_BATCHES = (1, 32, 128)


def copy_bandwidth() -> float:
    n = 1 << 30
    src = torch.empty(n, dtype=torch.uint8, device="cuda").random_()
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    times = []
    for _ in range(20):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        dst.copy_(src)
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    del src, dst
    free()
    return 2 * n / statistics.median(times)


def reinit_weights(model: torch.nn.Module, seed: int = 0) -> None:
    """N(0, 0.02) for matrices (norm weights stay 1): peaked enough that greedy is not decided by noise."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.02, generator=gen)
            elif not name.endswith("norm.weight"):
                p.zero_()


def run_steps(engine: Any, n: int) -> tuple[list[float], list[float]]:
    """n synchronous engine steps; per step: seconds of the whole step and of execute (the runner) alone."""
    steps, executes = [], []
    engine.flush()  # an async step() may have left a step in flight
    for _ in range(n):
        t0 = time.perf_counter()
        so = engine.schedule()
        t1 = time.perf_counter()
        out = engine.execute(so)
        t2 = time.perf_counter()
        engine.update(so, out)
        t3 = time.perf_counter()
        steps.append(t3 - t0)
        executes.append(t2 - t1)
    return steps, executes


def run_async_steps(engine: Any, n: int) -> list[float]:
    """n async-scheduling engine steps (step N+1 launched before step N is applied); seconds each."""
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - t0)
    return times


@dataclasses.dataclass
class LaunchWatch:
    """What `watched_launches` saw: each launch's wall time and the synchronizing calls it made."""

    launch_ms: list[float] = dataclasses.field(default_factory=list)
    syncs: list[warnings.WarningMessage] = dataclasses.field(default_factory=list)

    def check_no_syncs(self, name: str, launches: int) -> bool:
        """The check that the watched block launched `launches` steps and none of them synced."""
        return check(
            name,
            not self.syncs and len(self.launch_ms) == launches,
            syncs=len(self.syncs),
            launches=len(self.launch_ms),
            where=sorted({f"{Path(w.filename).name}:{w.lineno}" for w in self.syncs}),
        )


@contextlib.contextmanager
def watched_launches(engine: Any) -> Iterator[LaunchWatch]:
    """Each executor launch inside the block under torch.cuda.set_sync_debug_mode("warn"), timed; the
    synchronizing calls it made are in the LaunchWatch once the block ends."""
    watch = LaunchWatch()
    real_launch = engine.executor.launch

    def watched_launch(so: Any, previous: Any) -> Any:
        torch.cuda.set_sync_debug_mode("warn")
        start = time.perf_counter()
        try:
            return real_launch(so, previous)
        finally:
            watch.launch_ms.append((time.perf_counter() - start) * 1000)
            torch.cuda.set_sync_debug_mode(0)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        engine.executor.launch = watched_launch
        try:
            yield watch
        finally:
            del engine.executor.launch
    watch.syncs = [w for w in caught if "called a synchronizing" in str(w.message)]


def gpu_forward_ms(runner: Any, bs: int, graphs: bool, iters: int = 50) -> float:
    """GPU time of one decode forward at batch bs (padding rows: seq_len 1), events around the loop."""
    gr = runner.graph_runner
    step = gr.dummy_step(bs)
    md = step.metadata

    def fwd() -> None:
        if graphs:
            gr.replay(md)
        else:
            runner._run_model(step.input_ids, step.positions, md)

    with torch.inference_mode():
        return back_to_back_ms(fwd, "cuda", calls=iters, warmup=5)


def graphs_vs_eager(llm: LLM, prompts: list[list[int]], label: str, plain_eager_must_match: bool) -> None:
    """Greedy tokens of one engine in three modes: graphs; "padded eager" (the same padded static-buffer
    inputs and attention config as the graphs, run eagerly: must be bit-identical, it isolates capture
    and replay); plain eager (graph runner off: unpadded batches, split-KV chosen from the batch's real
    max_seq_len, so bf16 rounding differs and greedy ties can flip)."""
    runner = llm.llm_engine.executor.runner
    gr = runner.graph_runner
    uniform = SamplingParams(temperature=0.0, max_tokens=48, ignore_eos=True)
    staggered = [
        SamplingParams(temperature=0.0, max_tokens=8 + 2 * i, ignore_eos=True) for i in range(len(prompts))
    ]
    for batch_label, params in (("uniform batch 32", uniform), ("staggered 32->1", staggered)):
        results = {}
        replays: dict[int, int] = {}
        for mode in ("graphs", "padded_eager", "eager"):
            runner.graph_runner = None if mode == "eager" else gr
            if mode == "graphs":
                replays = count_replays(llm)
            if mode == "padded_eager":
                runner._forward = runner._run_model  # type: ignore[method-assign]
            try:
                outs = llm.generate(prompts, params, use_tqdm=False)
            finally:
                if mode == "graphs" and gr is not None:
                    del gr.replay  # drop the counting wrapper (the instance attribute)
                if mode == "padded_eager":
                    del runner._forward
            results[mode] = [o.outputs[0].token_ids for o in outs]
        runner.graph_runner = gr
        div = first_divergence(results["graphs"], results["padded_eager"])
        check(
            f"{label} {batch_label}: graphs == eager on the same padded inputs",
            not div and sum(replays.values()) > 0,
            differing_seqs=len(div),
            replays=sum(replays.values()),
            sizes_replayed=sorted(replays),
        )
        div = first_divergence(results["graphs"], results["eager"])
        total = sum(len(t) for t in results["graphs"])
        agree = sum(
            next((j for j, (p, q) in enumerate(zip(a, b, strict=False)) if p != q), len(a))
            for a, b in zip(results["graphs"], results["eager"], strict=True)
        )
        detail = dict(
            differing_seqs=len(div), first_divergences=div[:6], tokens_before_divergence=f"{agree}/{total}"
        )
        if plain_eager_must_match:
            check(f"{label} {batch_label}: graphs == plain eager greedy tokens", not div, **detail)
        else:
            RESULTS["info"][f"{label} {batch_label}: graphs vs plain eager"] = detail
            print(f"[INFO] {label} {batch_label}: graphs vs plain eager: {detail}", flush=True)


class HostTimers:
    """Host seconds spent in wrapped callables (attributes of objects or modules), by label."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.calls: dict[str, int] = {}
        self._undo: list[Callable[[], None]] = []

    def timed(self, fn: Callable[..., Any], label: str) -> Callable[..., Any]:
        def timed(*a: Any, **k: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                self.seconds[label] = self.seconds.get(label, 0.0) + time.perf_counter() - t0
                self.calls[label] = self.calls.get(label, 0) + 1

        return timed

    def wrap(self, obj: Any, name: str, label: str) -> None:
        fn = getattr(obj, name)
        had_instance_attr = name in getattr(obj, "__dict__", {})
        setattr(obj, name, self.timed(fn, label))
        self._undo.append(lambda: setattr(obj, name, fn) if had_instance_attr else delattr(obj, name))

    def wrap_model_ops(self, model: torch.nn.Module) -> None:
        """Time every op launch of `model`: its layers hold their kernels (the attention backend's, see
        engine.model.layers.attention_backend), so a timed copy is swapped onto each layer."""
        import ops  # noqa: PLC0415  (after the environment set-up above, as the other engine imports)

        swapped: dict[int, Any] = {}
        for module in model.modules():
            for attr in ("kernels", "attn_backend"):
                held = module.__dict__.get(attr)
                if held is None:
                    continue
                if id(held) not in swapped:
                    if attr == "kernels":
                        swapped[id(held)] = dataclasses.replace(
                            held, **{op: self.timed(getattr(held, op), f"ops.{op}") for op in ops.OP_NAMES}
                        )
                    else:  # the backend: its two attention kernels, on a copy
                        backend = copy.copy(held)
                        for op in ("write_kv_cache", "paged_attention"):
                            setattr(backend, op, self.timed(getattr(held, op), f"ops.{op}"))
                        swapped[id(held)] = backend
                setattr(module, attr, swapped[id(held)])
                self._undo.append(lambda m=module, a=attr, h=held: setattr(m, a, h))

    def undo(self) -> None:
        while self._undo:
            self._undo.pop()()

    def per_call_us(self) -> dict[str, dict[str, float]]:
        return {
            k: {"calls": self.calls[k], "us_per_call": round(1e6 * v / self.calls[k], 1)}
            for k, v in self.seconds.items()
        }


def qwen_bf16() -> None:
    import engine.worker.model_runner as model_runner_module
    from engine.worker.step_in_flight import StepInFlight
    from loadtest.model_shapes import num_parameters, write_shape

    bw = copy_bandwidth()
    RESULTS["info"]["copy_bandwidth_GB_s"] = round(bw / 1e9, 1)
    model_dir = write_shape("qwen3-0.6b", Path(tempfile.mkdtemp(prefix="weir-qwen3-")) / "qwen3-0.6b")
    cfg = json.loads((model_dir / "config.json").read_text())
    t0 = time.perf_counter()
    llm = strict(
        LLM(
            str(model_dir),
            load_format="dummy",
            dtype="bfloat16",
            device="cuda",
            max_model_len=QWEN_MAX_MODEL_LEN,
            enable_prefix_caching=False,  # graphs-vs-eager reruns the same prompts: no cache hits
        )
    )
    build_s = time.perf_counter() - t0
    engine = llm.llm_engine
    runner = engine.executor.runner
    gr = runner.graph_runner
    free_b, total_b = torch.cuda.mem_get_info()
    info = RESULTS["info"]["qwen3_0.6b"] = {
        "engine_build_s": round(build_s, 2),
        "runner.timings": {k: round(v, 3) for k, v in runner.timings.items()},
        "num_graphs": gr.num_graphs if gr else 0,
        "graph_sizes": gr.sizes if gr else [],
        "graph_mixed_sizes": gr.mixed_sizes if gr else [],
        "graph_memory_measured_gib": round(gr.memory_bytes / GIB, 3) if gr else None,
        "memory_profile_gib": {k: round(v, 3) for k, v in runner.memory_profile.items()},
        "num_kv_blocks": runner.num_kv_blocks,
        "max_num_batched_tokens": runner.max_num_batched_tokens,
        "used_fraction_after_start": round((total_b - free_b) / total_b, 4),
    }
    print(json.dumps(info, indent=1), flush=True)
    # One graph per decode batch size plus one per mixed-step token count (67 + 6 with the defaults).
    decode_sizes, mixed_sizes = runner.cuda_graph_sizes(), runner.cuda_graph_mixed_sizes()
    check(
        "qwen3-0.6b bf16: graphs captured",
        gr is not None
        and gr.sizes == decode_sizes
        and gr.mixed_sizes == mixed_sizes
        and gr.num_graphs == len(decode_sizes) + len(mixed_sizes),
        num_graphs=info["num_graphs"],
        expected=f"{len(decode_sizes)} decode + {len(mixed_sizes)} mixed",
    )
    estimate = runner.memory_profile.get("cuda_graphs_estimate_gib", 0.0)
    measured = info["graph_memory_measured_gib"] or 0.0
    check(
        "qwen3-0.6b bf16: graph memory within the profile's estimate",
        measured <= estimate * 1.1 + 0.05,
        estimate_gib=round(estimate, 3),
        measured_gib=measured,
    )
    reinit_weights(runner.model)

    rng = random.Random(1)
    vocab = int(cfg["vocab_size"])
    prompts = [[rng.randrange(10, vocab) for _ in range(rng.randrange(16, 200))] for _ in range(32)]
    graphs_vs_eager(llm, prompts, "qwen3-0.6b bf16", plain_eager_must_match=False)

    # Host syncs in the decode hot path: what set_sync_debug_mode flags over a few decode steps.
    for label, params in (
        ("greedy", SamplingParams(temperature=0.0, max_tokens=64, ignore_eos=True)),
        (
            "top-p + logprobs",
            SamplingParams(temperature=0.8, top_p=0.9, max_tokens=64, ignore_eos=True, logprobs=2),
        ),
    ):
        for i in range(8):
            engine.add_request(f"sync-{label}-{i}", prompts[i], params)
        run_steps(engine, 3)  # prefill and a first decode
        steps = 5
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                run_steps(engine, steps)
            finally:
                torch.cuda.set_sync_debug_mode(0)
        engine.abort_request([f"sync-{label}-{i}" for i in range(8)])
        run_steps(engine, 1)
        syncs = [w for w in caught if "called a synchronizing" in str(w.message)]
        where = sorted({f"{Path(w.filename).name}:{w.lineno}" for w in syncs})
        per_step = len(syncs) / steps
        expected = 1 if label == "greedy" else 2
        check(
            f"decode hot path host syncs ({label}, batch 8)",
            per_step <= expected,
            syncs_per_step=per_step,
            expected_at_most=expected,
            where=where,
        )
        RESULTS["info"][f"sync_messages_{label}"] = sorted({str(w.message)[:160] for w in syncs})

    # Async scheduling: launching a decode step must not wait for the device at all.
    for i in range(8):
        engine.add_request(
            f"async-sync-{i}", prompts[i], SamplingParams(temperature=0.0, max_tokens=64, ignore_eos=True)
        )
    run_async_steps(engine, 4)
    with watched_launches(engine) as watch:
        run_async_steps(engine, 5)
    engine.abort_request([f"async-sync-{i}" for i in range(8)])
    engine.flush()
    watch.check_no_syncs("async scheduling: no host sync while launching a decode step (batch 8)", 5)

    # Async scheduling: launching a step that holds prompts (eager, above the mixed graphs) must not wait
    # for the device either. A launch that did would return only once its own forward ran, and the
    # first tokens of the step before it would reach their requests a step late (P1's queued TTFT).
    trip_ms: list[float] = []
    with watched_launches(engine) as watch:
        try:
            # 16 prompts of 700 tokens: steps of prompt chunks up to max_num_batched_tokens, then decodes.
            for i in range(16):
                prompt = [rng.randrange(10, vocab) for _ in range(700)]
                engine.add_request(  # temperature 1.0: the benchmarks' sampling (P1, T1, T2, S1)
                    f"async-prefill-{i}",
                    prompt,
                    SamplingParams(temperature=1.0, max_tokens=8, ignore_eos=True),
                )
            trip_ms = [t * 1000 for t in run_async_steps(engine, 4)]
        except Exception as exc:  # noqa: BLE001 - one failed check, not the rest of the part
            check("async scheduling: prompt steps ran", False, error=repr(exc))
    engine.abort_request([f"async-prefill-{i}" for i in range(16)])
    engine.flush()
    watch.check_no_syncs(
        "async scheduling: no host sync while launching prompt steps (16 x 700 tokens, eager, temperature 1)",
        4,
    )
    # Timing, not a pass/fail: each trip launches step N and waits for N-1; a launch near its trip's
    # length (the first 8,192-token step's forward is several ms on the GPU) says the launch waited.
    RESULTS["info"]["prompt_step_launch_ms"] = [round(x, 3) for x in watch.launch_ms]
    RESULTS["info"]["prompt_step_trip_ms"] = [round(x, 3) for x in trip_ms]

    # Decode step time, graphs vs eager, alternating blocks of steps on the same running batch.
    params = SamplingParams(temperature=0.0, max_tokens=QWEN_MAX_MODEL_LEN - 200, ignore_eos=True)
    rows = []
    for bs in DECODE_BATCHES:
        ids = [f"t{bs}-{i}" for i in range(bs)]
        for i, rid in enumerate(ids):
            engine.add_request(rid, prompts[i % len(prompts)][:128], params)
        while engine.stats().num_waiting:
            run_steps(engine, 1)
        run_steps(engine, 2)  # the last prompt's prefill chunk, a first decode
        times: dict[str, list[float]] = {"graphs": [], "eager": [], "graphs_async": []}
        execs: dict[str, list[float]] = {"graphs": [], "eager": []}
        for _ in range(3):
            for mode in ("graphs", "eager"):
                runner.graph_runner = gr if mode == "graphs" else None
                run_steps(engine, 2)  # settle
                s, e = run_steps(engine, 10)
                times[mode] += s
                execs[mode] += e
            runner.graph_runner = gr
            run_async_steps(engine, 2)  # settle
            times["graphs_async"] += run_async_steps(engine, 10)
            engine.flush()
        runner.graph_runner = gr
        # Where a graph-mode step's host time goes (StepInFlight.result: includes the wait for the GPU).
        timers = HostTimers()
        for name in ("_build_inputs", "_forward", "compute_logits"):
            timers.wrap(runner, name, f"runner.{name}")
        timers.wrap(model_runner_module, "update_states", "runner.update_states")
        timers.wrap(runner.sampler, "sample", "sampler.sample")
        timers.wrap(StepInFlight, "result", "StepInFlight.result")
        timers.wrap(model_runner_module, "build_sampling_metadata", "build_sampling_metadata")
        timers.wrap(engine, "schedule", "engine.schedule")
        timers.wrap(engine, "update", "engine.update")
        try:
            run_steps(engine, 10)
        finally:
            timers.undo()
        RESULTS["info"][f"host_breakdown_graphs_batch{bs}"] = timers.per_call_us()
        engine.abort_request(ids)
        run_steps(engine, 1)
        fwd = {m: gpu_forward_ms(runner, bs, m == "graphs") for m in ("graphs", "eager")}
        if bs == DECODE_BATCHES[0]:
            # Host cost of each op launch in an eager forward (every prefill/mixed step runs eagerly).
            timers = HostTimers()
            timers.wrap_model_ops(runner.model)
            timers.wrap(torch.nn.functional, "linear", "F.linear")
            step = gr.dummy_step(bs)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            with torch.inference_mode():
                for _ in range(5):
                    runner._run_model(step.input_ids, step.positions, step.metadata)
            torch.cuda.synchronize()
            timers.undo()
            RESULTS["info"]["eager_forward_host_ms_batch1"] = round(1e3 * (time.perf_counter() - t0) / 5, 3)
            RESULTS["info"]["eager_op_launch_us"] = timers.per_call_us()
            print("eager op launch cost:", RESULTS["info"]["eager_op_launch_us"], flush=True)
        row = {
            "batch": bs,
            "step_ms_graphs": round(1e3 * statistics.median(times["graphs"]), 3),
            "step_ms_eager": round(1e3 * statistics.median(times["eager"]), 3),
            "step_ms_graphs_async": round(1e3 * statistics.median(times["graphs_async"]), 3),
            "execute_ms_graphs": round(1e3 * statistics.median(execs["graphs"]), 3),
            "execute_ms_eager": round(1e3 * statistics.median(execs["eager"]), 3),
            "gpu_forward_ms_graphs": round(fwd["graphs"], 3),
            "gpu_forward_ms_eager": round(fwd["eager"], 3),
        }
        row["speedup_step"] = round(row["step_ms_eager"] / row["step_ms_graphs"], 2)
        rows.append(row)
        print(row, flush=True)
    weight_bytes = 2 * num_parameters(cfg)  # tied: embedding read once as the LM head
    RESULTS["timings"]["decode_qwen3_0.6b_bf16"] = rows
    RESULTS["info"]["decode_floor_ms_batch1"] = round(1e3 * weight_bytes / bw, 3)
    check(
        "qwen3-0.6b bf16: graphs faster than eager at batch 1",
        rows[0]["step_ms_graphs"] < rows[0]["step_ms_eager"],
        speedup=rows[0]["speedup_step"],
    )

    # Memory: what the engine holds after the runs, against the utilization target.
    free_b, total_b = torch.cuda.mem_get_info()
    peak_reserved = torch.cuda.max_memory_reserved()
    non_torch = (total_b - free_b) - torch.cuda.memory_reserved()
    peak_frac = (peak_reserved + non_torch) / total_b
    info["peak_used_fraction"] = round(peak_frac, 4)
    check(
        "qwen3-0.6b bf16: peak device memory within gpu_memory_utilization (0.9)",
        peak_frac <= 0.9 + 0.01,
        peak_fraction=round(peak_frac, 4),
    )
    del llm, engine, runner, gr
    free()


def qwen_fp32() -> None:
    """fp32 at the Qwen3-0.6B shape: graphs and plain eager must give the same greedy tokens (fp32
    rounding is far below the logit gaps, unlike bf16)."""
    from loadtest.model_shapes import write_shape

    model_dir = write_shape("qwen3-0.6b", Path(tempfile.mkdtemp(prefix="weir-qwen3f-")) / "qwen3-0.6b")
    cfg = json.loads((model_dir / "config.json").read_text())
    llm = strict(
        LLM(
            str(model_dir),
            load_format="dummy",
            dtype="float32",
            device="cuda",
            max_model_len=QWEN_MAX_MODEL_LEN,
            enable_prefix_caching=False,
            max_cuda_graph_batch_size=32,
            gpu_memory_utilization=0.5,
        )
    )
    reinit_weights(llm.llm_engine.executor.runner.model)
    rng = random.Random(1)
    prompts = [
        [rng.randrange(10, int(cfg["vocab_size"])) for _ in range(rng.randrange(16, 200))] for _ in range(32)
    ]
    graphs_vs_eager(llm, prompts, "qwen3-0.6b fp32", plain_eager_must_match=True)
    del llm
    free()


# ------------------------------------------------------------------------------------------ d. back to back
BACK_TO_BACK_RELEASES = ("del", "shutdown", "with", "del", "shutdown", "with")


def back_to_back() -> None:
    """Engines built one after another in one process, as notebooks and test suites do: the memory
    of each must be free (by reference counting alone) before the next one profiles the device."""
    import gc

    root = Path(tempfile.mkdtemp(prefix="weir-b2b-"))
    model_dir = build_model("llama", root / "llama", build_tokenizer(root / "tokenizer"))
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    prompts = [[5, 6, 7, 8], [9, 10]]
    free()
    baseline = torch.cuda.memory_allocated()
    rows: list[dict[str, Any]] = []
    first: dict[str, Any] = {}
    gc.disable()  # (the engine's start-up still collects on its own, inside the profile and capture)
    try:
        for i, release in enumerate(BACK_TO_BACK_RELEASES):
            llm: LLM | None = LLM(str(model_dir), device="cuda", gpu_memory_utilization=0.9)
            assert llm is not None
            engine = llm.llm_engine
            num_blocks = engine.num_kv_blocks
            num_graphs = (
                engine.executor.runner.graph_runner.num_graphs if engine.executor.runner.graph_runner else 0
            )
            del engine
            if release == "with":
                with llm:
                    tokens = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
            else:
                tokens = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
                if release == "shutdown":
                    llm.shutdown()
                else:
                    llm = None
            torch.cuda.synchronize()
            left = torch.cuda.memory_allocated() - baseline
            llm = None
            # What stays allocated process-wide after the first engine (cuBLAS workspaces, kernel
            # caches) is allowed once; anything that grows from one engine to the next is a leak.
            first = first or {"num_blocks": num_blocks, "tokens": tokens, "left": left}
            rows.append(
                {
                    "release": release,
                    "kv_blocks": num_blocks,
                    "graphs": num_graphs,
                    "left_mib": left / (1 << 20),
                }
            )
            check(
                f"back to back #{i + 1} ({release}): KV blocks, same tokens, memory released",
                num_blocks > 0
                and num_blocks >= 0.95 * first["num_blocks"]
                and tokens == first["tokens"]
                and left <= first["left"] + (16 << 20)
                and first["left"] <= 256 << 20,
                kv_blocks=num_blocks,
                first_kv_blocks=first["num_blocks"],
                graphs=num_graphs,
                left_mib=round(left / (1 << 20), 1),
            )
    finally:
        gc.enable()
    RESULTS["info"]["back_to_back"] = rows


# ------------------------------------------------------------------------------------------ c. pytest
def pytest_cuda_graphs() -> None:
    """The CUDA test of tests/engine/test_cuda_graphs.py (its CPU tests run in CI)."""
    timeout = int(HARD_LIMIT_S - elapsed() - 15)
    if timeout < 45:
        check("pytest test_cuda_graphs.py -k gpu", False, reason=f"no time left ({timeout}s)")
        return
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "tests/engine/test_cuda_graphs.py",
            "-k",
            "gpu",
            "-q",
            "-rs",
            "-p",
            "no:cacheprovider",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    tail = (proc.stdout + proc.stderr)[-1500:]
    print(tail, flush=True)
    RESULTS["info"]["pytest_tail"] = tail
    lines = proc.stdout.strip().splitlines()
    summary = lines[-1] if lines else ""
    check(
        "pytest test_cuda_graphs.py -k gpu (the CUDA test ran and passed)",
        proc.returncode == 0 and "1 passed" in summary and "skipped" not in summary,
        rc=proc.returncode,
        summary=summary,
    )


def main() -> int:
    RESULTS["info"].update(
        {
            "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "device": torch.cuda.get_device_name(0),
            "torch": torch.__version__,
            "commit": os.environ.get("WEIR_COMMIT"),
        }
    )
    try:
        import transformers
        import triton

        RESULTS["info"]["triton"] = triton.__version__
        RESULTS["info"]["transformers"] = transformers.__version__
    except ImportError:
        pass
    print(f"device: {RESULTS['info']['device']}", flush=True)
    # WEIR_CHECK_PARTS="a b" runs a subset (letters as below); default: all.
    wanted = os.environ.get("WEIR_CHECK_PARTS", "a b b2 d c").split()
    for key, name, fn in (
        ("a", "a. tiny fp32 parity", tiny_parity),
        ("b", "b. qwen3-0.6b bf16", qwen_bf16),
        ("b2", "b2. qwen3-0.6b fp32 graphs vs eager", qwen_fp32),
        ("d", "d. engines back to back", back_to_back),
        ("c", "c. pytest", pytest_cuda_graphs),
    ):
        if key in wanted:
            run_part(name, fn)

    print("\n================ engine check: " + RESULTS["info"]["device"], flush=True)
    for c in RESULTS["checks"]:
        extra = {k: v for k, v in c.items() if k not in ("name", "ok")}
        print(f"{'PASS' if c['ok'] else 'FAIL'}  {c['name']}" + (f"  {extra}" if extra else ""))
    rows = RESULTS["timings"].get("decode_qwen3_0.6b_bf16", [])
    if rows:
        print(
            "\nQwen3-0.6B bf16 decode (ms)   step graphs / eager   execute graphs / eager   GPU fwd graphs / eager"
        )
        for r in rows:
            print(
                f"  batch {r['batch']:>4}   {r['step_ms_graphs']:>8.3f} / {r['step_ms_eager']:<8.3f}"
                f" (async {r['step_ms_graphs_async']:.3f})"
                f"   {r['execute_ms_graphs']:>8.3f} / {r['execute_ms_eager']:<8.3f}"
                f"   {r['gpu_forward_ms_graphs']:>8.3f} / {r['gpu_forward_ms_eager']:<8.3f}  x{r['speedup_step']}"
            )
        print(
            f"  batch-1 floor (weights / copy bandwidth): {RESULTS['info'].get('decode_floor_ms_batch1')} ms"
        )
    q = RESULTS["info"].get("qwen3_0.6b", {})
    if q:
        print(
            f"start-up: {q.get('runner.timings')}  graphs: {q.get('num_graphs')}  build {q.get('engine_build_s')}s"
        )
    failed = [c["name"] for c in RESULTS["checks"] if not c["ok"]]
    print(
        f"\n{'ALL PASS' if not failed else f'{len(failed)} FAILED'} ({len(RESULTS['checks'])} checks, {elapsed():.0f}s)"
    )
    save()
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
