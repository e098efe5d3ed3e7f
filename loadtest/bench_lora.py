"""A1-A4: multi-LoRA at the Llama-3-8B shape (random weights), rank-16 adapters on all seven projections.

    python loadtest/bench_lora.py --shape llama3-8b --out a.json

    A1  T2 throughput (1024 prompt / 128 output tokens) with 8 distinct adapters, vs the base model
    A2  the same with 64 distinct adapters (max_loras 64)
    A3  L1 batch-1 ITL (32 prompt / 128 output tokens) with one adapter, vs the base model
    A4  the first request of an adapter not loaded before: its added latency (disk load, checks, slot
        write) over the same request on an adapter already in a slot

The adapters are random PEFT-format directories (adapter_config.json + adapter_model.safetensors)
written to a temporary directory first. The base figures come from an engine without LoRA, built
with the same settings (the same call), measured first and again last (`base_t2_last`, `base_l1_last`):
the ratios are against the mean of the two, so a drift over the run (the first engine of a process
paying one-time costs, a clock settling) does not land on one side only; `base_t2_drift` is last / first. T2 runs --num-requests requests (default 500), round-robin
over the adapters; warm-up requests are excluded from the timing.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from loadtest.common import (  # noqa: E402
    Report,
    add_common_args,
    build_llm,
    default_max_model_len,
    engine_info,
    engine_kwargs,
    engine_runner,
    free_engine,
    install_signal_handlers,
    phase,
    random_workload,
    ratio,
    resolve_model,
    sampling_params,
    summarize_ms,
)

A4_TRIALS = 3
TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num-requests", type=int, default=500, help="T2 requests per throughput run")
    p.add_argument("--input-len", type=int, default=1024)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--adapter-counts", default="8,64", help="distinct adapters of A1, A2")
    p.add_argument("--l1-input-len", type=int, default=32)
    p.add_argument("--l1-output-len", type=int, default=128)
    p.add_argument("--l1-iters", type=int, default=3)
    p.add_argument("--adapter-dir", default=None, help="write the adapters here (default: a temp dir)")
    add_common_args(p, default_shape="llama3-8b")
    return p


def write_adapters(root: Path, config: dict[str, Any], count: int, rank: int, dtype: str) -> list[Path]:
    """`count` distinct rank-`rank` PEFT adapters over every projection of `config`'s model. One set
    of random tensors, scaled differently per adapter (distinct weights, cheap to write)."""
    import torch
    from safetensors.torch import save_file

    hidden = config["hidden_size"]
    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or hidden // heads
    kv = config.get("num_key_value_heads", heads) * head_dim
    inter = config["intermediate_size"]
    shapes = {  # projection -> (in, out)
        "self_attn.q_proj": (hidden, heads * head_dim),
        "self_attn.k_proj": (hidden, kv),
        "self_attn.v_proj": (hidden, kv),
        "self_attn.o_proj": (heads * head_dim, hidden),
        "mlp.gate_proj": (hidden, inter),
        "mlp.up_proj": (hidden, inter),
        "mlp.down_proj": (inter, hidden),
    }
    torch_dtype = getattr(torch, dtype)
    gen = torch.Generator().manual_seed(0)
    base: dict[str, torch.Tensor] = {}
    for layer in range(config["num_hidden_layers"]):
        for proj, (n_in, n_out) in shapes.items():
            key = f"base_model.model.model.layers.{layer}.{proj}"
            base[f"{key}.lora_A.weight"] = (torch.randn(rank, n_in, generator=gen) / n_in**0.5).to(
                torch_dtype
            )
            base[f"{key}.lora_B.weight"] = (torch.randn(n_out, rank, generator=gen) * 0.01).to(torch_dtype)
    paths = []
    for i in range(count):
        path = root / f"adapter-{i}"
        path.mkdir(parents=True, exist_ok=True)
        cfg = {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": TARGET_MODULES}
        (path / "adapter_config.json").write_text(json.dumps(cfg))
        scale = 1.0 + 0.01 * i
        save_file(
            {k: (v * scale).contiguous() for k, v in base.items()}, str(path / "adapter_model.safetensors")
        )
        paths.append(path)
    return paths


def throughput(
    llm: Any, prompts: list[list[int]], params: list[Any], loras: list[Any] | None
) -> dict[str, Any]:
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False, **({"lora_request": loras} if loras else {}))
    elapsed = time.perf_counter() - t0
    out_tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    prompt_tokens = sum(len(p) for p in prompts)
    return {
        "elapsed_s": round(elapsed, 4),
        "num_requests": len(outs),
        "req_s": round(len(outs) / elapsed, 4),
        "output_tok_s": round(out_tokens / elapsed, 2),
        "total_tok_s": round((out_tokens + prompt_tokens) / elapsed, 2),
    }


def one_request(engine: Any, prompt: list[int], params: Any, tag: str, lora: Any = None) -> dict[str, Any]:
    """One request through the step-level engine: (latency, inter-token gaps)."""
    t0 = time.perf_counter()
    engine.add_request(tag, prompt, params, lora_request=lora)
    times: list[float] = []
    while engine.has_unfinished_requests():
        if any(o.outputs[0].token_ids_delta for o in engine.step()):
            times.append(time.perf_counter())
    return {
        "latency": time.perf_counter() - t0,
        "gaps": [b - a for a, b in zip(times, times[1:], strict=False)],
    }


def itl(
    engine: Any, prompt: list[int], params: Any, iters: int, tag: str, lora: Any = None
) -> dict[str, Any]:
    one_request(engine, prompt, params, f"{tag}-warm", lora)
    gaps: list[float] = []
    latencies = []
    for i in range(iters):
        r = one_request(engine, prompt, params, f"{tag}-{i}", lora)
        gaps += r["gaps"]
        latencies.append(r["latency"])
    return {**summarize_ms(gaps, "itl"), "latency_p50_s": round(statistics.median(latencies), 4)}


def against_mean(results: dict[str, Any]) -> None:
    """Once the base ran again: each ratio against the mean of the base's two runs (first-run ratios kept
    as `vs_base_first`), and the base's drift between them."""
    first_t2, last_t2 = results["base_t2"]["output_tok_s"], results["base_t2_last"]["output_tok_s"]
    first_l1, last_l1 = results["base_l1"]["itl_p50_ms"], results["base_l1_last"]["itl_p50_ms"]
    results["base_t2_drift"] = ratio(last_t2, first_t2)
    results["base_l1_drift"] = ratio(last_l1, first_l1)
    for key, res in results.items():
        if not isinstance(res, dict) or "vs_base" not in res:
            continue
        res["vs_base_first"] = res["vs_base"]
        if key == "A3":
            res["vs_base"] = ratio(res["itl_p50_ms"], (first_l1 + last_l1) / 2)
        else:
            res["vs_base"] = ratio(res["output_tok_s"], (first_t2 + last_t2) / 2)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from engine import LoRARequest

    model = resolve_model(args)
    report = Report("A", args, model)
    counts = [int(c) for c in args.adapter_counts.split(",")]
    token_id_max = min(10000, model.vocab_size)  # the real shapes' 10,000; a tiny model's vocabulary
    workload = random_workload(
        args.num_requests,
        (args.input_len, args.input_len),
        (args.output_len, args.output_len),
        args.seed,
        token_id_max,
    )
    warm = random_workload(16, (args.input_len, args.input_len), (8, 8), args.seed + 1, token_id_max)
    params = [sampling_params(n, args.temperature) for n in workload.output_lens]
    warm_params = [sampling_params(n, args.temperature) for n in warm.output_lens]
    l1_prompt, *a4_prompts = random_workload(
        1 + 2 * A4_TRIALS, (args.l1_input_len,) * 2, (1, 1), args.seed + 2, token_id_max
    ).prompts
    l1_params = sampling_params(args.l1_output_len, 0.0)
    report["workload"] = {"t2": workload.description, "rank": args.rank, "adapter_counts": counts}
    max_model_len = default_max_model_len(args, model, args.input_len + args.output_len)
    results = report["results"]
    tmp = tempfile.TemporaryDirectory(prefix="weir-loras-")
    root = Path(args.adapter_dir or tmp.name)
    with phase(report, "write_adapters"):
        t0 = time.perf_counter()
        paths = write_adapters(root, model.config, max(counts) + A4_TRIALS, args.rank, model.dtype)
        results["adapters_written_s"] = round(time.perf_counter() - t0, 2)
    requests = [LoRARequest(f"adapter-{i}", i + 1, str(p)) for i, p in enumerate(paths)]

    llm = None
    try:
        with phase(report, "base"):
            kwargs = engine_kwargs(args, model, max_model_len=max_model_len)
            llm, _ = build_llm(model, kwargs)
            report["engine"] = engine_info(llm)
            throughput(llm, warm.prompts, warm_params, None)
            results["base_t2"] = throughput(llm, workload.prompts, params, None)
            results["base_l1"] = itl(llm.llm_engine, l1_prompt, l1_params, args.l1_iters, "base")
            free_engine(llm)
            llm = None
        for n in counts:
            bench = "A1" if n == counts[0] else "A2"
            with phase(report, f"{bench}_{n}_adapters", required=False):
                kwargs = engine_kwargs(
                    args, model, max_model_len=max_model_len, enable_lora=True, max_loras=n,
                    max_lora_rank=args.rank, max_cpu_loras=n + A4_TRIALS,
                )  # fmt: skip
                llm, build_s = build_llm(model, kwargs)
                engine = llm.llm_engine
                t0 = time.perf_counter()
                for req in requests[:n]:
                    engine.add_lora(req)
                load_s = time.perf_counter() - t0
                loras = [requests[i % n] for i in range(len(workload))]
                throughput(llm, warm.prompts, warm_params, [requests[i % n] for i in range(len(warm))])
                res = throughput(llm, workload.prompts, params, loras)
                res.update(engine_build_s=round(build_s, 2), add_lora_ms_each=round(1000 * load_s / n, 2))
                res["vs_base"] = ratio(res["output_tok_s"], results["base_t2"]["output_tok_s"])
                results[f"{bench}_{n}_adapters"] = res
                if n == counts[0]:
                    # A3: batch-1 ITL with one adapter (and base requests on this LoRA engine)
                    res3 = itl(engine, l1_prompt, l1_params, args.l1_iters, "a3", requests[0])
                    res3["base_on_lora_engine"] = itl(engine, l1_prompt, l1_params, args.l1_iters, "a3b")
                    res3["vs_base"] = ratio(res3["itl_p50_ms"], results["base_l1"]["itl_p50_ms"])
                    results["A3"] = res3
                    # A4: a request naming an adapter never loaded, then one more on it (in its slot
                    # by then); medians over A4_TRIALS adapters, each request on a prompt of its own
                    # (no prefix-cache hit)
                    firsts, loaded, host_ms = [], [], []
                    manager = getattr(engine_runner(engine), "lora", None)  # in-process worker only
                    for t in range(A4_TRIALS):
                        new = requests[n + t]
                        p_new, p_loaded = a4_prompts[2 * t], a4_prompts[2 * t + 1]
                        firsts.append(one_request(engine, p_new, sampling_params(16, 0.0), f"a4-new{t}", new))
                        if manager is not None:  # the host's part: disk read + checks, slot image
                            host_ms.append((1000 * manager.last_load_s, 1000 * manager.last_slot_write_s))
                        loaded.append(
                            one_request(engine, p_loaded, sampling_params(16, 0.0), f"a4-in{t}", new)
                        )
                    first_s = statistics.median(r["latency"] for r in firsts)
                    loaded_s = statistics.median(r["latency"] for r in loaded)
                    results["A4"] = {
                        "first_request_s": round(first_s, 4),
                        "loaded_request_s": round(loaded_s, 4),
                        "added_ms": round(1000 * (first_s - loaded_s), 2),
                        "trials": A4_TRIALS,
                        "read_ms": [round(r, 2) for r, _ in host_ms],  # per trial
                        "slot_write_ms": [round(w, 2) for _, w in host_ms],
                        "adapter_mb": round(
                            sum(f.stat().st_size for f in Path(new.lora_path).iterdir()) / 2**20, 1
                        ),
                    }
                free_engine(llm)
                llm = None
        with phase(report, "base_again", required=False):
            llm, _ = build_llm(model, engine_kwargs(args, model, max_model_len=max_model_len))
            throughput(llm, warm.prompts, warm_params, None)
            results["base_t2_last"] = throughput(llm, workload.prompts, params, None)
            results["base_l1_last"] = itl(llm.llm_engine, l1_prompt, l1_params, args.l1_iters, "base-last")
            free_engine(llm)
            llm = None
            against_mean(results)
    except Exception:  # noqa: BLE001 - recorded by phase(); the report is still written
        pass
    finally:
        if llm is not None:
            free_engine(llm)
        tmp.cleanup()
    print(
        "[A] "
        + ", ".join(
            f"{k}: {v.get('vs_base')}" for k, v in results.items() if isinstance(v, dict) and "vs_base" in v
        ),
        flush=True,
    )
    return report.finish()


if __name__ == "__main__":
    install_signal_handlers()
    raise SystemExit(main())
