"""K1: where a batch-1 decode step's time goes, kernel by kernel (L1's step: Llama-3-8B shape, one sequence).

    python loadtest/profile_kernels.py --mode batch1 --shape llama3-8b --out profile_l1.json

One request is prefilled, then decode steps are profiled twice with torch.profiler:
1. eager (the graph runner set aside for one step), with every module of interest wrapped in a
   `weir::<part>` range: which kernel (in launch order) belongs to which part;
2. graphed, as the engine runs L1 (the forward replayed from its CUDA graph; the LM head and the sampler
   run after it, eagerly). Graph kernels carry no Python ranges, so each gets its part from the eager
   sequence: the next eager kernel of the same name (a kernel the eager step lacks, e.g. a different
   split-KV attention variant, gets its family's part).
For each part: kernels per step, device time per step, bytes it must read (projection weights, the LM
head, the KV cache for attention, norm weights), the achieved GB/s and its fraction of the copy bandwidth
measured in the same call; then the gaps between consecutive kernels inside the graph, the graph's span,
and what runs outside it. On a CPU (the smoke test) there is no graph: the eager pass's CPU operator
times stand in for kernel times, so the table's plumbing is what is tested there.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from loadtest.kernel_families import family_of

# Part of the model -> how its module's qualified name ends (first match wins).
MODULE_PARTS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("qkv_proj", ("qkv_proj",)),
    ("o_proj", ("o_proj",)),
    ("gate_up_proj", ("gate_up_proj",)),
    ("down_proj", ("down_proj",)),
    ("embedding", ("embed_tokens",)),
    ("norm", ("input_layernorm", "post_attention_layernorm", "q_norm", "k_norm", "model.norm")),
    ("rotary", ("rotary_emb",)),
    ("activation", ("act_fn",)),
    ("attention", ("self_attn.attn",)),
)
# Table order; "kv_write" is the KV-cache store inside the attention module (told apart by kernel name).
PARTS = (
    "qkv_proj",
    "o_proj",
    "gate_up_proj",
    "down_proj",
    "lm_head",
    "attention",
    "kv_write",
    "norm",
    "rotary",
    "activation",
    "embedding",
    "sampler",
    "lora",
    "copies",
    "other",
)
PREFIX = "weir::"
TOP_UNLABELLED = 8  # the "other" part's kernels listed by name, longest first
PROJECTIONS = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")
GRAPH = "graph_replay"


def part_of_module(name: str) -> str | None:
    for part, suffixes in MODULE_PARTS:
        if any(name == s or name.endswith("." + s) or name.endswith(s) for s in suffixes):
            return part
    return None


@contextlib.contextmanager
def labelled(runner: Any) -> Iterator[dict[str, int]]:
    """Wrap the model's modules, the LM head, the sampler and the graph replay in `weir::<part>` ranges
    for the duration; yields the bytes of parameters per part (what a step reads of each)."""
    from torch.autograd.profiler import record_function

    model = runner.model
    param_bytes: dict[str, int] = defaultdict(int)
    handles = []

    def enter(name: str) -> Callable[..., None]:
        def pre(module: Any, args: Any) -> None:
            module._weir_range = record_function(PREFIX + name)
            module._weir_range.__enter__()

        return pre

    def leave(module: Any, args: Any, output: Any) -> None:
        rng = module.__dict__.pop("_weir_range", None)
        if rng is not None:
            rng.__exit__(None, None, None)

    for name, module in model.named_modules():
        part = part_of_module(name)
        if part is None:
            continue
        if part != "embedding":  # a step reads one row of the table, counted apart
            param_bytes[part] += sum(p.numel() * p.element_size() for p in module.parameters(recurse=True))
        if part in PROJECTIONS:  # a quantized layer's words, scales and zero points are buffers after loading
            # (its own: an attached LoRA hook's adapter stacks are buffers too, read as the "lora" part, a slot a
            # request, not whole)
            param_bytes[part] += sum(b.numel() * b.element_size() for b in module.buffers(recurse=False))
        handles.append(module.register_forward_pre_hook(enter(part)))
        handles.append(module.register_forward_hook(leave))
    lm_head = getattr(model, "lm_head", None)
    if lm_head is not None:
        param_bytes["lm_head"] = sum(p.numel() * p.element_size() for p in lm_head.parameters())

    def wrap(obj: Any, attr: str, part: str) -> None:
        original = getattr(obj, attr)

        def wrapped(*args: Any, **kwargs: Any) -> Any:
            with record_function(PREFIX + part):
                return original(*args, **kwargs)

        setattr(obj, attr, wrapped)  # an instance attribute shadows the method until deleted

    wrapped: list[tuple[Any, str]] = []
    for obj, attr, part in (
        (runner, "compute_logits", "lm_head"),
        (getattr(runner, "sampler", None), "sample", "sampler"),
        (getattr(runner, "graph_runner", None), "replay", GRAPH),
    ):
        if obj is not None and hasattr(obj, attr):
            wrap(obj, attr, part)
            wrapped.append((obj, attr))
    try:
        yield dict(param_bytes)
    finally:
        for h in handles:
            h.remove()
        for obj, attr in wrapped:
            with contextlib.suppress(AttributeError):
                delattr(obj, attr)


def _range(evt: Any, by_id: dict[int, Any]) -> Any:
    """The innermost `weir::` range event above a profiler event (for a device event: above its launch)."""
    fe = evt
    if str(getattr(evt, "device_type", "")).split(".")[-1] != "CPU":
        fe = by_id.get(getattr(evt, "linked_correlation_id", 0) or -1)
    while fe is not None:
        if fe.name.startswith(PREFIX):
            return fe
        fe = fe.cpu_parent
    return None


def _label(evt: Any, by_id: dict[int, Any]) -> str | None:
    rng = _range(evt, by_id)
    return None if rng is None else rng.name[len(PREFIX) :]


def _labels_by_kernel(
    events: Sequence[Any], by_id: dict[int, Any]
) -> dict[tuple[str, float], list[str | None]]:
    """For a torch without FunctionEvent.linked_correlation_id: each launching event's kernels (name,
    duration) with its label, to hand out in order."""
    out: dict[tuple[str, float], list[str | None]] = defaultdict(list)
    for e in events:
        for k in getattr(e, "kernels", None) or []:
            out[(k.name, round(k.duration, 3))].append(_label(e, by_id))
    return out


def timeline(prof: Any, cuda: bool) -> list[dict[str, Any]]:
    """Device kernels (cuda) or CPU operators with self time (cpu) in start order: name, start/end us,
    the `weir::` range they ran under."""
    events = list(prof.events())
    # Operators and ranges only (linked id 0): runtime events carry CUPTI's correlation ids, another
    # numbering, which a kernel's link to its launching operator must not land on.
    by_id = {
        e.id: e
        for e in events
        if str(e.device_type).split(".")[-1] == "CPU" and not getattr(e, "linked_correlation_id", 0)
    }
    fallback = None
    if cuda and not all(hasattr(e, "linked_correlation_id") for e in events):
        fallback = _labels_by_kernel(events, by_id)
    out = []
    for e in events:
        device = str(e.device_type).split(".")[-1]
        if cuda:
            if device != "CUDA":
                continue
        elif device != "CPU" or not e.name.startswith("aten::") or e.self_cpu_time_total <= 0:
            continue
        start, end = e.time_range.start, e.time_range.end
        if not cuda:
            end = start + e.self_cpu_time_total  # an operator's own time, not its children's
        range_id = None
        if fallback is not None:
            queue = fallback.get((e.name, round(end - start, 3)))
            label = queue.pop(0) if queue else None
        else:
            rng = _range(e, by_id)
            label = None if rng is None else rng.name[len(PREFIX) :]
            range_id = None if rng is None else rng.id  # one graph replay per step: its kernels share it
            launcher = by_id.get(getattr(e, "linked_correlation_id", 0) or -1)
            if label == GRAPH and launcher is not None and launcher.name.startswith("aten::"):
                # Launched by an aten operator inside the replay range (CUDAGraph.replay's own fill, in
                # some torch versions), not by the graph launch itself: not a kernel of the graph.
                label = None
        out.append({"name": e.name, "start": start, "end": end, "label": label, "range": range_id})
    out.sort(key=lambda k: k["start"])
    return out


def align_labels(
    eager: Sequence[tuple[str, str]], graph_names: Sequence[str], window: int = 16
) -> list[str | None]:
    """Each graph kernel's part: the next kernel of the same name in the eager (name, part) sequence,
    searched within `window` places past the last match; None where there is none."""
    out: list[str | None] = []
    pos = 0
    for name in graph_names:
        found = None
        for j in range(pos, min(len(eager), pos + window)):
            if eager[j][0] == name:
                found = j
                break
        if found is None:
            out.append(None)
        else:
            out.append(eager[found][1])
            pos = found + 1
    return out


def refine(part: str | None, name: str) -> str:
    """A part for the table: the KV store within attention by its kernel name; unlabelled kernels by
    their family (an unlabelled matmul is "other")."""
    family = family_of(name)
    if part == "attention" and family == "kv_write":
        return "kv_write"
    if family == "lora":  # a LoRA kernel runs inside a projection's module but is its own part
        return "lora"
    if part in PARTS:
        return part
    return family if family in PARTS else "other"


def gaps(kernels: Sequence[dict[str, Any]]) -> list[float]:
    """Idle microseconds between each kernel's end and the next one's start (overlap counts as 0)."""
    return [max(0.0, b["start"] - a["end"]) for a, b in zip(kernels, kernels[1:], strict=False)]


def part_table(
    rows: Sequence[dict[str, Any]], steps: int, bytes_per_step: dict[str, int | None], copy_gb_s: float | None
) -> dict[str, dict[str, Any]]:
    """Per part: kernels and us per step, bytes, GB/s, fraction of the copy bandwidth; for "other", its kernels by
    name too (what no range or family labelled: the next labelling rule to write)."""
    acc: dict[str, list[float]] = defaultdict(list)
    unlabelled: dict[str, list[float]] = defaultdict(list)  # kernel name -> its durations, part "other"
    for r in rows:
        acc[r["part"]].append(r["end"] - r["start"])
        if r["part"] == "other":
            unlabelled[r["name"]].append(r["end"] - r["start"])
    total_us = sum(sum(v) for v in acc.values()) / steps
    table = {}
    for part in PARTS:
        if part not in acc:
            continue
        us = sum(acc[part]) / steps
        row: dict[str, Any] = {
            "kernels_per_step": round(len(acc[part]) / steps, 2),
            "us_per_step": round(us, 2),
            "share": round(us / total_us, 4) if total_us else None,
            "us_per_kernel_median": round(statistics.median(acc[part]), 2),
        }
        nbytes = bytes_per_step.get(part)
        if nbytes and us > 0:
            row["bytes_per_step"] = nbytes
            row["gb_s"] = round(nbytes / (us * 1e-6) / 1e9, 1)
            if copy_gb_s:
                row["fraction_of_copy_bw"] = round(row["gb_s"] / copy_gb_s, 4)
        if part == "other":
            by_time = sorted(unlabelled.items(), key=lambda kv: -sum(kv[1]))[:TOP_UNLABELLED]
            row["top_kernels"] = [
                {
                    "name": name[:120],
                    "kernels_per_step": round(len(d) / steps, 2),
                    "us_per_step": round(sum(d) / steps, 2),
                }
                for name, d in by_time
            ]
        table[part] = row
    return table


def graphed_breakdown(
    graph_rows: Sequence[dict[str, Any]],
    eager_rows: Sequence[dict[str, Any]],
    steps: int,
    bytes_per_step: dict[str, int | None],
    copy_gb_s: float | None,
) -> dict[str, Any]:
    """The graphed steps' kernels, labelled from the eager step: the table, the gaps inside the graph,
    and what ran outside it."""
    inside = [r for r in graph_rows if r["label"] == GRAPH]
    outside = [r for r in graph_rows if r["label"] != GRAPH]
    eager_forward = [
        (r["name"], r["label"]) for r in eager_rows if r["label"] not in (None, "lm_head", "sampler")
    ]
    parts = align_labels(eager_forward * max(steps, 1), [r["name"] for r in inside])
    matched = sum(p is not None for p in parts)
    rows = [{**r, "part": refine(p, r["name"])} for r, p in zip(inside, parts, strict=True)]
    rows += [{**r, "part": refine(r["label"], r["name"])} for r in outside]
    # The graph's replays, one per step: the kernels of one `weir::graph_replay` range, or (when the
    # profiler does not link kernels to their launch) equal consecutive shares of the window's kernels.
    replays: list[list[dict[str, Any]]] = []
    if inside and all(r.get("range") is not None for r in inside):
        groups: dict[int, list[dict[str, Any]]] = defaultdict(list)
        for r in inside:
            groups[r["range"]].append(r)
        replays = sorted(groups.values(), key=lambda g: g[0]["start"])
    elif inside:
        size = max(1, len(inside) // max(steps, 1))
        replays = [inside[i : i + size] for i in range(0, len(inside), size)]
    inner_gaps = [g for rep in replays for g in gaps(rep)]
    spans = [rep[-1]["end"] - rep[0]["start"] for rep in replays]
    busy = [sum(k["end"] - k["start"] for k in rep) for rep in replays]
    return {
        "table": part_table(rows, steps, bytes_per_step, copy_gb_s),
        "graph": {
            "replays": len(replays),
            "kernels_per_replay": round(len(inside) / len(replays), 2) if replays else 0,
            "labelled_from_eager": round(matched / len(inside), 4) if inside else None,
            "span_us_median": round(statistics.median(spans), 2) if spans else None,
            "kernel_us_median": round(statistics.median(busy), 2) if busy else None,
            "gap_us_per_replay": round(sum(inner_gaps) / len(replays), 2) if replays else None,
            "gap_us_median": round(statistics.median(inner_gaps), 3) if inner_gaps else None,
            "gap_us_max": round(max(inner_gaps), 2) if inner_gaps else None,
            "gaps_over_2us": sum(g > 2.0 for g in inner_gaps),
        },
        "outside_graph_us_per_step": round(sum(r["end"] - r["start"] for r in outside) / steps, 2),
    }


def bytes_per_step(
    param_bytes: dict[str, int], config: dict[str, Any], dtype_bytes: int, context: int, batch: int = 1
) -> dict:
    """What each part must read per decode step of `batch` sequences of `context` tokens: its weights
    (once, whatever the batch), the embedding rows, the KV caches."""
    heads = config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads", heads)
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    layers = config["num_hidden_layers"]
    out: dict[str, int | None] = dict(param_bytes)
    out["embedding"] = config["hidden_size"] * dtype_bytes * batch
    out["attention"] = 2 * layers * kv_heads * head_dim * dtype_bytes * context * batch
    out["kv_write"] = 2 * layers * kv_heads * head_dim * dtype_bytes * batch
    return out


def profile_steps(engine: Any, steps: int, cuda: bool) -> tuple[Any, float]:
    """`steps` engine steps under the profiler (the window starts and ends with nothing in flight)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    engine.flush()
    if cuda:
        torch.cuda.synchronize()
    with profile(activities=activities) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            engine.step()
        engine.flush()
        if cuda:
            torch.cuda.synchronize()
        wall = time.perf_counter() - t0
    return prof, wall


def run(llm: Any, model: Any, args: Any, copy_gb_s: float | None, lora_request: Any = None) -> dict[str, Any]:
    """Prefill one request (on lora_request's adapter when given), then the eager labelled step and the
    graphed window; the K1 results."""
    from loadtest.common import engine_runner, sampling_params

    engine = llm.llm_engine
    runner = engine_runner(llm)
    cuda = model.device == "cuda"
    batch = getattr(args, "decode_batch", 1)  # L1's batch-8 step with --decode-batch 8
    for b in range(batch):
        prompt = [(7 * i + b) % min(model.vocab_size, 10000) for i in range(args.input_len)]
        engine.add_request(
            f"k1-{b}", prompt, sampling_params(args.output_len, args.temperature), lora_request=lora_request
        )
    for _ in range(4):  # the prefill, then decode steps (graph replays) before anything is timed
        engine.step()
    engine.flush()
    if cuda:
        profile_steps(engine, 1, cuda)  # CUPTI's one-time start-up (~0.5 s) outside the windows
    graph_runner = getattr(runner, "graph_runner", None)
    with labelled(runner) as param_bytes:
        runner.graph_runner = None  # one eager step: hooks see every module
        try:
            prof, _ = profile_steps(engine, 1, cuda)
        finally:
            runner.graph_runner = graph_runner
        eager_rows = timeline(prof, cuda)
        graph_rows, wall = [], 0.0
        if cuda and graph_runner is not None:
            prof, wall = profile_steps(engine, args.decode_steps, cuda)
            graph_rows = timeline(prof, cuda)
    running = list(engine.scheduler.running.values())
    context = running[0].num_computed_tokens if running else args.input_len
    dtype_bytes = {"float32": 4, "float16": 2, "bfloat16": 2}[model.dtype]
    nbytes = bytes_per_step(param_bytes, model.config, dtype_bytes, context, batch)
    eager = part_table(
        [{**r, "part": refine(r["label"], r["name"])} for r in eager_rows], 1, nbytes, copy_gb_s
    )
    result: dict[str, Any] = {
        "batch": batch,
        "sequences_running": len(running),  # after the windows: the batch, unless one ended early
        "context_tokens": context,
        "time_source": "CUDA kernels" if cuda else "CPU operators (no CUDA graph on a CPU)",
        "eager_step": eager,
        "weight_bytes_per_step": sum(v for k, v in param_bytes.items()),
    }
    if copy_gb_s:
        # L1's roofline: every weight read once per step at the copy bandwidth (bench_latency's convention).
        result["roofline_us"] = round(model.weight_bytes / (copy_gb_s * 1e9) * 1e6, 2)
    if cuda and graph_runner is not None:
        # Split the step's wall time: the graph alone (back to back) against the rest.
        replay_ms = graph_replay_ms(runner, batch)
        result["graph_replay_ms"] = round(replay_ms, 4) if replay_ms is not None else None
        # Each size's decode graph on its capture's dummy step (padding rows only, written into the static
        # buffer first: what a later step left there, a mixed step's layout included, is no decode batch
        # of that size): whether a setting changes every graph or only some (--replay-sizes)
        by_size = {}
        for size in getattr(args, "replay_sizes", None) or []:
            ms = graph_replay_ms(runner, size, on_dummy_step=True)
            by_size[str(size)] = round(ms, 4) if ms is not None else None
        if by_size:
            result["graph_replay_ms_by_size"] = by_size
    if graph_rows:
        wall_ms = wall * 1e3 / args.decode_steps
        graphed = graphed_breakdown(graph_rows, eager_rows, args.decode_steps, nbytes, copy_gb_s)
        result["graphed"] = {"steps": args.decode_steps, "wall_ms_per_step": round(wall_ms, 4), **graphed}
        span = graphed["graph"]["span_us_median"]
        if span and result.get("roofline_us"):
            result["graphed"]["roofline_over_graph_span"] = round(result["roofline_us"] / span, 4)
            result["graphed"]["roofline_over_wall"] = round(result["roofline_us"] / (wall_ms * 1e3), 4)
        if not graphed["graph"]["replays"]:
            result["graphed"]["note"] = "no kernel of a graph replay was recorded (no graph-node tracing?)"
    return result


def graph_replay_ms(runner: Any, num_seqs: int, reps: int = 50, on_dummy_step: bool = False) -> float | None:
    """ms per replay of the decode graph a `num_seqs`-sequence step takes, replayed back to back with no
    host work between (one sync at the end): the graph's own device time, gaps inside it included.
    The step's wall time less this is what lies outside the graph (the LM head and sampler where they
    run eagerly, the host between replays). None without a captured graph of that size."""
    import torch

    from loadtest.gpu_timing import back_to_back_ms

    graph_runner = getattr(runner, "graph_runner", None)
    replay = graph_runner.decode_replay(num_seqs) if graph_runner is not None else None
    if replay is None:
        return None
    with torch.inference_mode():  # as the engine replays (its buffers are inference tensors)
        if on_dummy_step:  # the padding-only batch the graph was captured on (not the last step's rows)
            graph_runner.dummy_step(graph_runner.padded_size(num_seqs))
        # warmup: the first replay after other work may pay for its upload
        return back_to_back_ms(replay, runner.device, calls=reps, warmup=1)


def format_table(table: dict[str, dict[str, Any]]) -> str:
    lines = [
        f"{'part':<13}{'kern/step':>10}{'us/step':>10}{'share':>8}{'MB/step':>10}{'GB/s':>9}{'of copy':>9}"
    ]
    for part, r in table.items():
        mb = r.get("bytes_per_step")
        lines.append(
            f"{part:<13}{r['kernels_per_step']:>10}{r['us_per_step']:>10.1f}{(r['share'] or 0):>8.3f}"
            f"{(mb / 1e6 if mb else 0):>10.2f}{r.get('gb_s', 0):>9.1f}{r.get('fraction_of_copy_bw', 0):>9.3f}"
        )
    return "\n".join(lines)
