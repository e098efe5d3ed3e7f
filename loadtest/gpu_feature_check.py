"""GPU check of the features landed together (multi-LoRA, beam search, copy-on-write forks, quantized
checkpoints, FP8 KV cache, the LoRA / W4A16 / fp8 paged-attention kernels), each against a CPU
reference, in one device call.

a. Multi-LoRA: tiny fp32 Llama + four PEFT adapters (ranks 4/8/16/2, tests/engine/test_lora.py), one
   batch mixing them and the base, and one request decoding alone (batch 1) on an adapter; weir on
   CUDA with graphs, enforce_eager, chunked prefill, max_loras=2 and the one-token LoRA GEMV (expand
   epilogue; also with the shrink in the launch), forced on every layer, vs transformers + PEFT on CPU
   fp32: greedy tokens equal, graphs replayed with LoRA.
b. Beam search widths 2 and 4 (tests/engine/test_beam_search.py's EOS-prone tiny models), weir on
   CUDA with graphs vs transformers generate(num_beams) on CPU fp32: tokens equal, scores within 1e-4.
c. Copy-on-write forks on CUDA with graphs: n=4 greedy (children == transformers greedy), n=4 seeded
   (each child == the lone seeded request) and best_of: KV blocks in use = the prompt's full blocks
   once + two per child, every block free at the end.
d. Quantized checkpoints (tests/engine/quantization/checkpoints.py): weir on CUDA in fp16 and bf16 vs
   weir on CPU fp32 on the same checkpoint (first divergence reported; FAIL if within 4 tokens), and
   the wired W4A16 GEMM at the Llama-3-8B shapes vs dequantize-then-matmul, timed against bf16 matmul.
e. FP8 KV cache: the default model, fp8 vs auto on CUDA within tests/engine/quantization/
   test_fp8_kv_cache.py's bounds; blocks doubled at the Qwen3-0.6B shape; the Triton paged attention
   on an fp8 cache at the Llama-3-8B shape vs the reference.
f. LoRA shrink / expand kernels at the Llama-3-8B shape vs the torch reference in bf16, timed; the
   one-token LoRA GEMVs at each Llama-3-8B layer shape vs F.linear + the reference pair, and a layer's
   time as graph replays: base + shrink + expand, shrink + GEMV with the expand epilogue, one launch.
(Tensor parallel tp=1 is covered by gpu_engine_check.py; `pytest tests/ops` runs separately.)

Prints PASS/FAIL lines and a table last; writes $OUT/feature_check.json.
Run: OUT=$OUT WEIR_COMMIT=<hash> PYTHONUNBUFFERED=1 python3 loadtest/gpu_feature_check.py
     WEIR_CHECK_PARTS="a b" for a subset; --dry-run builds everything on CPU (engines on cpu, kernel
     parts skipped) to check the plumbing without a GPU.
Imports nothing from app/ (the GPU machine lacks the HTTP stack).
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from engine import LLM, LoRARequest, SamplingParams  # noqa: E402
from engine.lora.gemv import lora_gemv_forced  # noqa: E402
from loadtest.feature_check_quant import tiny_llama  # noqa: E402
from loadtest.gpu_engine_check import (  # noqa: E402
    RESULTS,
    check,
    count_replays,
    elapsed,
    first_divergence,
    free,
    hf_greedy,
    run_part,
    strict,
)
from tests.tiny_models import hf_causal_lm  # noqa: E402

OUT_DIR = os.environ.get("OUT")
# Parts start only while there is time left in the device call (the slow quantized sweep goes last).
HARD_LIMIT_S = float(os.environ.get("WEIR_CHECK_LIMIT_S", "320"))
DRY_RUN = "--dry-run" in sys.argv
DEVICE = "cpu" if DRY_RUN else "cuda"
GRAPHS = dict(max_cuda_graph_batch_size=8)  # a few small graphs: quick to capture
MAX_TOKENS = 8
FUSED_GEMV = {"block_n": 16, "block_k": 32, "split_k": 1}  # the tiny model's forced LoRA GEMV launch


def save() -> None:
    if OUT_DIR:
        Path(OUT_DIR).mkdir(parents=True, exist_ok=True)
        (Path(OUT_DIR) / "feature_check.json").write_text(json.dumps(RESULTS, indent=2, default=str))


def replayed(counts: dict[Any, int]) -> bool:
    """Graphs really ran (on CPU, the dry run, there are none to replay)."""
    return sum(counts.values()) > 0 or DEVICE == "cpu"


def blocks_free(llm: LLM) -> bool:
    kv = llm.llm_engine.scheduler.kv_cache_manager
    return kv.num_free_blocks == kv.num_blocks


# ------------------------------------------------------------------------------------------ a. multi-LoRA
def build_adapters(model_dir: Path, root: Path) -> dict[str, LoRARequest]:
    """test_lora.py's four adapters, saved by peft with random non-zero B (so each changes the output)."""
    from tests.engine.test_lora import save_peft_adapters

    return save_peft_adapters(model_dir, root)


def peft_greedy(
    model_dir: Path, requests: dict[str, LoRARequest], prompts: list[list[int]], adapters: list[str | None]
) -> list[list[int]]:
    """transformers + PEFT greedy on CPU fp32, one model per adapter."""
    from peft import PeftModel

    models: dict[str | None, torch.nn.Module] = {}
    outs = []
    with torch.no_grad():
        for prompt, name in zip(prompts, adapters, strict=True):
            if name not in models:
                base = hf_causal_lm(str(model_dir), dtype=torch.float32)
                models[name] = (
                    base if name is None else PeftModel.from_pretrained(base, requests[name].lora_path)
                ).eval()
            seq = models[name].generate(
                torch.tensor([prompt]),
                max_new_tokens=MAX_TOKENS,
                do_sample=False,
                eos_token_id=None,
                pad_token_id=0,
            )
            outs.append(seq[0, len(prompt) :].tolist())
    return outs


def multi_lora() -> None:
    from tests.engine.test_lora import MIXED, PROMPTS

    root = Path(tempfile.mkdtemp(prefix="weir-lora-"))
    model_dir = tiny_llama(root)
    requests = build_adapters(model_dir, root / "adapters")
    expected = peft_greedy(model_dir, requests, PROMPTS, MIXED)
    # The same prompt under every adapter: all different, so LoRA not applied would be caught.
    probe = peft_greedy(model_dir, requests, [PROMPTS[2]] * 5, [None, *requests])
    check("lora: PEFT outputs differ per adapter (the check can fail)", len({tuple(p) for p in probe}) == 5)
    loras = [requests[a] if a else None for a in MIXED]
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
    configs: dict[str, dict[str, Any]] = {
        "graphs": dict(max_loras=4, **GRAPHS),
        "eager": dict(max_loras=4, enforce_eager=True),
        "chunked_prefill": dict(max_loras=4, max_num_batched_tokens=7, **GRAPHS),
        "max_loras=2 (4 adapters)": dict(max_loras=2, **GRAPHS),
        # The one-token GEMV with the LoRA expand in its epilogue (engine/lora/gemv.py), then also with
        # the shrink in the same launch: forced, as the tiny fp32 model has no planned shape of its own.
        "graphs, fused LoRA GEMV": dict(max_loras=4, lora_gemv=FUSED_GEMV, **GRAPHS),
        "graphs, fused LoRA GEMV + shrink": dict(
            max_loras=4, lora_gemv={**FUSED_GEMV, "split_k": 2, "fuse_shrink": True}, **GRAPHS
        ),
    }
    summary = RESULTS["info"]["multi_lora"] = {}
    # A request decoding alone on an adapter of every projection: batch-1 steps, where the fused GEMV
    # serves every LoRA layer (when planned).
    alone = MIXED.index("r8-all")
    for name, kw in configs.items():
        forced = kw.pop("lora_gemv", None)
        with lora_gemv_forced(forced) if forced else contextlib.nullcontext():
            llm = strict(
                LLM(str(model_dir), device=DEVICE, dtype="float32", enable_lora=True, num_kv_blocks=256, **kw)
            )
        replays = count_replays(llm)
        scheduler = llm.llm_engine.scheduler
        schedule = scheduler.schedule
        per_step: list[int] = []

        def counting_schedule(schedule=schedule, scheduler=scheduler, per_step=per_step):  # noqa: ANN001, ANN202
            out = schedule()
            per_step.append(len({scheduler.requests[r].lora_int_id for r in out.num_scheduled_tokens} - {0}))
            return out

        scheduler.schedule = counting_schedule
        got = [
            o.outputs[0].token_ids for o in llm.generate(PROMPTS, params, use_tqdm=False, lora_request=loras)
        ]
        del scheduler.schedule
        got_alone = llm.generate([PROMPTS[alone]], params, use_tqdm=False, lora_request=loras[alone])
        got_alone = got_alone[0].outputs[0].token_ids
        runner = llm.llm_engine.executor.runner
        detail: dict[str, Any] = dict(
            graph_replays=sum(replays.values()),
            most_adapters_per_step=max(per_step),
            slot_loads=runner.lora.num_slot_loads,
            fused_gemv_layers=sum(layer.gemv_launch is not None for layer in runner.lora.layers.values()),
        )
        ok = got == expected and got_alone == expected[alone] and blocks_free(llm)
        if got != expected:
            detail["first_divergence"] = first_divergence(got, expected)
        if got_alone != expected[alone]:
            detail["alone_divergence"] = first_divergence([got_alone], [expected[alone]])
        if forced and DEVICE == "cuda":  # every LoRA layer planned the fused GEMV
            ok = ok and detail["fused_gemv_layers"] == len(runner.lora.layers)
        if name == "eager":
            ok = ok and runner.graph_runner is None
        else:
            ok = ok and replayed(replays)
        if name.startswith("max_loras=2"):
            ok = ok and max(per_step) <= 2 and runner.lora.num_slot_loads >= 4
        summary[name] = {"ok": ok, **detail}
        check(
            f"lora {DEVICE} {name}: mixed batch and a lone adapter request == transformers+PEFT (cpu fp32)",
            ok,
            **detail,
        )
        llm.shutdown()
        del llm
        free()


# ------------------------------------------------------------------------------------------ b. beam search
BEAM_CASES = [(2, 0.5, True), (4, 1.0, False), (4, 2.0, "never")]  # (width, length_penalty, early_stopping)


def beam_search() -> None:
    from engine import BeamSearchParams
    from tests.engine.test_beam_search import PROMPT, _eos_prone_copy, _transformers_beams

    root = Path(tempfile.mkdtemp(prefix="weir-beam-"))
    rows = RESULTS["info"]["beam_search"] = []
    for family in ("llama", "qwen3"):
        path = _eos_prone_copy(tiny_llama(root, family), root / f"{family}-eos")
        hf = hf_causal_lm(str(path), dtype=torch.float32).eval()
        llm = strict(
            LLM(str(path), device=DEVICE, dtype="float32", block_size=8, num_kv_blocks=256, **GRAPHS)
        )
        replays = count_replays(llm)
        for width, length_penalty, early_stopping in BEAM_CASES:
            expected, scores = _transformers_beams(hf, width, length_penalty, early_stopping)
            params = BeamSearchParams(width, 8, length_penalty=length_penalty, early_stopping=early_stopping)
            (out,) = llm.beam_search([PROMPT], params)
            got = [s.tokens[len(PROMPT) :] for s in out.sequences]
            score_err = max(abs(s.score - e) for s, e in zip(out.sequences, scores, strict=False))
            free_ok = blocks_free(llm)
            row = dict(
                family=family,
                width=width,
                tokens_equal=got == expected,
                max_score_err=score_err,
                blocks_free=free_ok,
            )
            rows.append(row)
            check(
                f"beam {DEVICE} {family} width {width} (lp {length_penalty}, early {early_stopping}): "
                "beams == transformers (cpu fp32), scores within 1e-4, blocks free",
                got == expected and len(got) == len(expected) and score_err <= 1e-4 and free_ok,
                max_score_err=f"{score_err:.2e}",
                **({} if got == expected else {"got": got, "expected": expected}),
            )
        check(f"beam {DEVICE} {family}: decode steps replayed graphs", replayed(replays), replays=replays)
        llm.shutdown()
        del llm
        free()


# ------------------------------------------------------------------------------------------ c. copy-on-write
COW_PROMPT = list(range(5, 26))  # 21 tokens: 2 full blocks of 8 and a partial one (test_cow_fork.py)
COW_PEAK = 2 + 4 * 2  # the prompt's 2 full blocks once, then each child's partial copy and a fourth block


def run_counting_blocks(llm: LLM, req_id: str, params: SamplingParams) -> tuple[list[list[int]], int]:
    """One request step by step: its outputs' tokens and the most KV blocks in use at once."""
    engine = llm.llm_engine
    engine.add_request(req_id, COW_PROMPT, params)
    kv = engine.scheduler.kv_cache_manager
    peak, final = 0, None
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                final = out
        peak = max(peak, kv.num_blocks - kv.num_free_blocks)
    for out in engine.flush():  # an async step may still be in flight
        if out.finished:
            final = out
    return ([list(c.token_ids) for c in final.outputs] if final else []), peak


def copy_on_write() -> None:
    root = Path(tempfile.mkdtemp(prefix="weir-cow-"))
    model_dir = tiny_llama(root)
    (greedy,) = hf_greedy(model_dir, [COW_PROMPT], 6)
    llm = strict(
        LLM(str(model_dir), device=DEVICE, dtype="float32", block_size=8, num_kv_blocks=32, **GRAPHS)
    )
    replays = count_replays(llm)
    tokens, peak = run_counting_blocks(
        llm, "greedy", SamplingParams(n=4, temperature=0.0, max_tokens=6, ignore_eos=True)
    )
    check(
        f"cow {DEVICE} n=4 greedy: 4 children == transformers greedy (cpu fp32), blocks = prompt once + 2 per child",
        tokens == [greedy] * 4 and peak == COW_PEAK and blocks_free(llm),
        peak_blocks=peak,
        expected_peak=COW_PEAK,
        **({} if tokens == [greedy] * 4 else {"got": tokens, "expected": greedy}),
    )
    sample = dict(temperature=1.0, seed=7, max_tokens=6, ignore_eos=True)
    tokens, peak = run_counting_blocks(llm, "seeded", SamplingParams(n=4, **sample))
    alone = [
        list(
            llm.generate([COW_PROMPT], SamplingParams(**{**sample, "seed": 7 + i}), use_tqdm=False)[0]
            .outputs[0]
            .token_ids
        )
        for i in range(4)
    ]
    check(
        f"cow {DEVICE} n=4 seeded: each child == the lone request with its seed (same device), blocks shared",
        tokens == alone and peak == COW_PEAK and blocks_free(llm),
        peak_blocks=peak,
        distinct_children=len({tuple(t) for t in tokens}),
    )
    tokens, peak = run_counting_blocks(llm, "best_of", SamplingParams(n=2, best_of=4, **sample))
    check(
        f"cow {DEVICE} best_of=4 n=2 seeded: 2 outputs from 4 forked children, blocks shared and freed",
        len(tokens) == 2 and all(t in alone for t in tokens) and peak == COW_PEAK and blocks_free(llm),
        peak_blocks=peak,
    )
    check(f"cow {DEVICE}: forked children's decode steps replayed graphs", replayed(replays), replays=replays)
    llm.shutdown()


# ------------------------------------------------------------------------------------------ main
def main() -> int:
    from loadtest.feature_check_kernels import fp8_paged_attention_kernel, lora_kernels, wna16_kernel
    from loadtest.feature_check_quant import fp8_kv_cache, quantized_checkpoints

    cuda = torch.cuda.is_available()
    RESULTS["info"].update(
        {
            "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "device": torch.cuda.get_device_name(0) if cuda else "cpu (dry run)" if DRY_RUN else "no CUDA",
            "torch": torch.__version__,
            "commit": os.environ.get("WEIR_COMMIT"),
            "dry_run": DRY_RUN,
        }
    )
    print(f"device: {RESULTS['info']['device']}", flush=True)
    if not cuda and not DRY_RUN:
        check("CUDA available", False, hint="run on the GPU machine, or --dry-run on CPU")
        save()
        return 1
    kernel = lambda fn: lambda: print("skipped: the kernels need CUDA") if DRY_RUN else fn()  # noqa: E731
    default = "f d2 e2 a b c e d" if not DRY_RUN else "a b c e d"
    wanted = os.environ.get("WEIR_CHECK_PARTS", default).split()
    for key, name, fn in (
        ("f", "f. LoRA kernels at the Llama-3-8B shape", kernel(lora_kernels)),
        ("d2", "d2. W4A16 GEMM at the Llama-3-8B shapes", kernel(wna16_kernel)),
        (
            "e2",
            "e2. paged attention on an fp8 cache at the Llama-3-8B shape",
            kernel(fp8_paged_attention_kernel),
        ),
        ("a", "a. multi-LoRA vs transformers+PEFT", multi_lora),
        ("b", "b. beam search vs transformers", beam_search),
        ("c", "c. copy-on-write forks", copy_on_write),
        ("e", "e. FP8 KV cache", lambda: fp8_kv_cache(DEVICE)),
        ("d", "d. quantized checkpoints, device vs cpu", lambda: quantized_checkpoints(DEVICE, HARD_LIMIT_S)),
    ):
        if key in wanted:
            run_part(name, fn, limit_s=HARD_LIMIT_S, save_results=save)

    print("\n================ feature check: " + RESULTS["info"]["device"], flush=True)
    for c in RESULTS["checks"]:
        extra = {k: v for k, v in c.items() if k not in ("name", "ok")}
        print(f"{'PASS' if c['ok'] else 'FAIL'}  {c['name']}" + (f"  {extra}" if extra else ""))
    timings = RESULTS["timings"]
    if timings:
        print("\nkernel timings (median ms per call, CUDA-graph replays, loadtest/gpu_timing.py)")
        for label, rows in timings.items():
            for r in rows:
                print(f"  {label:<28} " + "  ".join(f"{k}={v}" for k, v in r.items()))
    failed = [c["name"] for c in RESULTS["checks"] if not c["ok"]]
    print(
        f"\n{'ALL PASS' if not failed else f'{len(failed)} FAILED'} ({len(RESULTS['checks'])} checks, {elapsed():.0f}s)"
    )
    save()
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
