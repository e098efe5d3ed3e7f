"""Quantization parts of loadtest/gpu_feature_check.py, engine level: every quantized checkpoint
format on the device (fp16 and bf16) vs weir on CPU fp32 on the same checkpoint, and the FP8 KV cache
(agreement with a model-dtype cache as tests/engine/quantization/test_fp8_kv_cache.py bounds it, and
twice the blocks in the same memory)."""

from __future__ import annotations

import gc
import json
import os
import random
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from engine import LLM, SamplingParams
from loadtest.gpu_engine_check import RESULTS, check, count_replays, elapsed, strict

QUANT_MAX_TOKENS = 16
MUST_AGREE = 4  # a divergence within the first 4 tokens fails; later ones are reported (fp16/bf16 rounding)
# Teacher-forced log p drift from the fp32 reference that fp16/bf16 rounding alone gives on these tiny
# random models (measured on CPU over every format: fp16 <= 0.035, bf16 <= 0.085), with margin: an
# early greedy divergence within it is a near-tie flipped by rounding, not a wrong kernel.
DRIFT_BOUND = {"float16": 0.1, "bfloat16": 0.3}
GRAPHS = dict(max_cuda_graph_batch_size=8)


def tiny_llama(root: Path, family: str = "llama") -> Path:
    """tests/tiny_models.py's random fp32 model of `family` (tokenizer shared under root)."""
    from tests.tiny_models import build_model, build_tokenizer

    tok = root / "tokenizer"
    if not tok.exists():
        build_tokenizer(tok)
    return build_model(family, root / family, tok)


def random_prompts(seed: int, lengths: tuple[int, ...], vocab: int = 500) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(n)] for n in lengths]


def first_index(a: list[int], b: list[int]) -> int:
    """Position of the first differing token (len if equal)."""
    return next((i for i, (p, q) in enumerate(zip(a, b, strict=False)) if p != q), min(len(a), len(b)))


def wna16_layers(llm: LLM) -> int:
    """Linear layers running the Triton W4A16/W8A16 kernels (their layout is on the layer)."""
    model = llm.llm_engine.executor.runner.model
    return sum(1 for m in model.modules() if getattr(m, "wna16_bits", 0))


def _checkpoints(src: Path, root: Path) -> list[tuple[str, Callable[[], Path], dict[str, Any]]]:
    """(label, writer of the checkpoint, LLM options): every format the engine loads."""
    from tests.engine.quantization.checkpoints import (
        write_awq,
        write_compressed_tensors,
        write_fp8,
        write_gptq,
        write_squeezellm,
    )

    def gptq(*variant: Any) -> Callable[[], Path]:
        return lambda: write_gptq(src, root / "gptq", *variant)[0]

    def moe_gptq(*variant: Any) -> Callable[[], Path]:  # integer experts through the fused MoE kernel
        def write() -> Path:
            from tests.tiny_models import build_model

            moe = root / "qwen3_moe"
            if not (moe / "built").exists():  # experts 128 wide, so groups of 32 divide every input
                overrides = {"moe_intermediate_size": 128}
                build_model(
                    "qwen3_moe",
                    moe,
                    root / "tokenizer",
                    vocab_size=512,
                    config_overrides=overrides,
                    hidden_size=128,
                )
                (moe / "built").touch()
            return write_gptq(moe, root / "moe-gptq", *variant)[0]

        return write

    return [
        ("gptq 4-bit g32", gptq(4, 32, False, True, "gptq"), {}),
        ("gptq 4-bit g128", gptq(4, 128, False, True, "gptq"), {}),
        ("gptq 4-bit g32 desc_act", gptq(4, 32, True, True, "gptq"), {}),
        ("gptq 4-bit g128 desc_act asym v2", gptq(4, 128, True, False, "gptq_v2"), {}),
        ("gptq 8-bit g128", gptq(8, 128, False, False, "gptq"), {}),
        ("awq g64", lambda: write_awq(src, root / "awq", 64)[0], {}),
        ("awq g128", lambda: write_awq(src, root / "awq", 128)[0], {}),
        ("squeezellm", lambda: write_squeezellm(src, root / "sq")[0], {}),
        (
            "compressed-tensors w4a16-g32",
            lambda: write_compressed_tensors(src, root / "ct4", "w4a16-g32")[0],
            {},
        ),
        (
            "compressed-tensors fp8-channel",
            lambda: write_compressed_tensors(src, root / "ct8", "fp8-channel")[0],
            {},
        ),
        ("fp8 checkpoint per-channel", lambda: write_fp8(src, root / "fp8", "channel")[0], {}),
        ("online fp8 (quantization=fp8)", lambda: src, {"quantization": "fp8"}),
        ("qwen3-moe gptq 4-bit g32", moe_gptq(4, 32, False, True, "gptq"), {}),
        ("qwen3-moe gptq 4-bit g32 desc_act", moe_gptq(4, 32, True, True, "gptq"), {}),  # A_PERM
    ]


def teacher_forced(llm: LLM, prompts: list[list[int]], continuations: list[list[int]]) -> list[list[float]]:
    """log p of each continuation token after its prompt (prompt_logprobs over prompt + continuation)."""
    full = [p + c for p, c in zip(prompts, continuations, strict=True)]
    outs = llm.generate(full, SamplingParams(max_tokens=1, prompt_logprobs=0), use_tqdm=False)
    return [
        [o.prompt_logprobs[i][seq[i]].logprob for i in range(len(p), len(seq))]
        for o, p, seq in zip(outs, prompts, full, strict=True)
    ]


def greedy_tokens(llm: LLM, prompts: list[list[int]]) -> list[list[int]]:
    params = SamplingParams(temperature=0.0, max_tokens=QUANT_MAX_TOKENS, ignore_eos=True)
    return [list(o.outputs[0].token_ids) for o in llm.generate(prompts, params, use_tqdm=False)]


def quantized_checkpoints(device: str, time_limit_s: float = 330.0) -> None:
    from tests.engine.quantization.checkpoints import build_wide_llama
    from tests.tiny_models import build_tokenizer

    root = Path(tempfile.mkdtemp(prefix="weir-quant-"))
    src = build_wide_llama(root / "llama", build_tokenizer(root / "tokenizer"))
    # 4 prompts decode at batch 4, WEIR_CHECK_QUANT_PROMPTS=8 at batch 8: both on the 3-16-token kernels (the
    # skinny W4A16 GEMM for 4-bit integer formats, FP8's skinny GEMM); 8-bit codes keep the GEMV at 4
    count = int(os.environ.get("WEIR_CHECK_QUANT_PROMPTS", "4"))
    prompts = random_prompts(5, (5, 17, 33, 40, 9, 12, 21, 26)[:count])
    dtypes = ("float16", "bfloat16")
    rows = RESULTS["info"]["quantized_checkpoints"] = []
    for label, write, options in _checkpoints(src, root):
        if elapsed() > time_limit_s:
            check(f"quant {label}: ran", False, reason=f"no time left ({elapsed():.0f}s)")
            continue
        try:
            ckpt = write()
            t0 = time.perf_counter()
            cpu = LLM(str(ckpt), device="cpu", dtype="float32", num_kv_blocks=64, **options)
            method = cpu.llm_engine.config.quant.method
            expected = greedy_tokens(cpu, prompts)
            expected_lp = teacher_forced(cpu, prompts, expected)
            cpu.shutdown()
            del cpu
            for dtype in dtypes:
                llm = strict(
                    LLM(str(ckpt), device=device, dtype=dtype, num_kv_blocks=256, **GRAPHS, **options)
                )
                replays = count_replays(llm)
                got = greedy_tokens(llm, prompts)
                firsts = [first_index(g, e) for g, e in zip(got, expected, strict=True)]
                # how far the device moves log p of the reference's own tokens: small when an early
                # divergence is a near-tie flipped by fp16/bf16 rounding, large when the kernel is wrong
                got_lp = teacher_forced(llm, prompts, expected)
                drift = max(
                    abs(a - b)
                    for g, e in zip(got_lp, expected_lp, strict=True)
                    for a, b in zip(g, e, strict=True)
                )
                row = {
                    "checkpoint": label,
                    "method": method,
                    "dtype": dtype,
                    "tokens_equal": got == expected,
                    "first_divergence_per_prompt": firsts,
                    "max_logprob_drift": round(drift, 4),
                    "triton_wna16_layers": wna16_layers(llm),
                    "graph_replays": sum(replays.values()),
                    "seconds": round(time.perf_counter() - t0, 1),
                }
                rows.append(row)
                check(
                    f"quant {label} {device} {dtype} vs cpu fp32: greedy tokens (first {MUST_AGREE} agree, "
                    f"or log p of the reference's tokens within {DRIFT_BOUND[dtype]})",
                    min(firsts) >= MUST_AGREE or drift <= DRIFT_BOUND[dtype],
                    equal=got == expected,
                    first_divergence=firsts,
                    max_logprob_drift=round(drift, 4),
                    method=method,
                    triton_wna16_layers=row["triton_wna16_layers"],
                )
                llm.shutdown()
                del llm
                gc.collect()
            if device == "cuda" and method in ("gptq", "awq") and "desc_act" not in label:
                wired = [r["triton_wna16_layers"] for r in rows if r["checkpoint"] == label]
                check(
                    f"quant {label} cuda: linear layers run the Triton W4A16/W8A16 kernels",
                    min(wired) > 0,
                    layers=wired,
                )
        except Exception as e:  # noqa: BLE001 - one format failing does not stop the others
            import traceback

            traceback.print_exc()
            check(f"quant {label}: ran", False, error=f"{type(e).__name__}: {e}"[:300])


# ------------------------------------------------------------------------------------------ e. FP8 KV cache
def fp8_kv_agreement(device: str) -> None:
    """tests/engine/quantization/fp8_kv_agreement.py's run on the device, with graphs: teacher-
    forced log p drift mean <= 0.06, max <= 1.0; >= 4 of 5 greedy prompts identical, every prompt's
    first 5 tokens identical, log p drift before divergence <= 0.3."""
    from tests.engine.quantization.fp8_kv_agreement import DEFAULT_MODEL, PROMPTS, held_out_window

    window = held_out_window()
    greedy = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True, logprobs=0)
    scored, generated, blocks = {}, {}, {}
    for kv in ("auto", "fp8"):
        llm = strict(
            LLM(
                str(DEFAULT_MODEL),
                device=device,
                dtype="float32",
                kv_cache_dtype=kv,
                num_kv_blocks=256,
                **GRAPHS,
            )
        )
        (out,) = llm.generate([window], SamplingParams(max_tokens=1, prompt_logprobs=0), use_tqdm=False)
        scored[kv] = [out.prompt_logprobs[p][window[p]].logprob for p in range(1, len(window))]
        generated[kv] = []
        for o in llm.generate(PROMPTS, greedy, use_tqdm=False):
            c = o.outputs[0]
            generated[kv].append(
                (list(c.token_ids), [lp[t].logprob for lp, t in zip(c.logprobs, c.token_ids, strict=True)])
            )
        caches = llm.llm_engine.executor.runner.kv_caches
        blocks[kv] = sorted({str(k.dtype) for pair in caches for k in pair})
        llm.shutdown()
        del llm
        gc.collect()
    drift = [abs(a - b) for a, b in zip(scored["auto"], scored["fp8"], strict=True)]
    mean, worst = sum(drift) / len(drift), max(drift)
    check(
        f"fp8 kv {device}: teacher-forced log p drift vs the fp32 cache (mean <= 0.06, max <= 1.0, nonzero)",
        mean <= 0.06 and worst <= 1.0 and sum(drift) > 0 and blocks["fp8"] == ["torch.float8_e4m3fn"],
        mean=round(mean, 4),
        max=round(worst, 3),
        cache_dtypes=blocks,
    )
    identical, firsts, lp_drift = 0, [], []
    for (ref_ids, ref_lp), (ids8, lp8) in zip(generated["auto"], generated["fp8"], strict=True):
        first = first_index(ref_ids, ids8)
        firsts.append(first)
        identical += first == len(ref_ids)
        lp_drift.append(
            max(abs(a - b) for a, b in zip(ref_lp[:first], lp8[:first], strict=True)) if first else 0.0
        )
    check(
        f"fp8 kv {device}: greedy >= 4 of 5 prompts identical, first 5 tokens all, log p drift <= 0.3",
        identical >= 4 and min(firsts) >= 5 and max(lp_drift) <= 0.3,
        identical=identical,
        first_divergence=firsts,
        max_lp_drift=round(max(lp_drift), 3),
    )


def fp8_kv_blocks(device: str) -> None:
    """The same memory holds twice the blocks: on CUDA at the Qwen3-0.6B shape (dummy weights, the KV
    cache sized by gpu_memory_utilization); on CPU (dry run) the tiny model with cpu_kv_cache_gb."""
    from loadtest.model_shapes import write_shape

    if device == "cuda":
        model_dir = write_shape("qwen3-0.6b", Path(tempfile.mkdtemp(prefix="weir-fp8kv-")) / "qwen3-0.6b")
        kw: dict[str, Any] = dict(
            load_format="dummy",
            dtype="bfloat16",
            max_model_len=4096,
            gpu_memory_utilization=0.5,
            enforce_eager=True,
        )
    else:
        model_dir = tiny_llama(Path(tempfile.mkdtemp(prefix="weir-fp8kv-")))
        kw = dict(dtype="bfloat16", cpu_kv_cache_gb=1 / 64)
    blocks, outputs = {}, {}
    for kv in ("auto", "fp8"):
        llm = strict(LLM(str(model_dir), device=device, kv_cache_dtype=kv, **kw))
        blocks[kv] = llm.llm_engine.num_kv_blocks
        vocab = json.loads((model_dir / "config.json").read_text())["vocab_size"]
        prompt = [(17 * i) % (vocab - 10) + 5 for i in range(200)]
        params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
        outputs[kv] = list(llm.generate([prompt], params, use_tqdm=False)[0].outputs[0].token_ids)
        llm.shutdown()
        del llm
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    ratio = blocks["fp8"] / max(blocks["auto"], 1)
    RESULTS["info"]["fp8_kv_blocks"] = {
        **blocks,
        "ratio": ratio,
        "greedy_first_divergence": first_index(outputs["auto"], outputs["fp8"]),
    }
    check(
        f"fp8 kv {device}: {'qwen3-0.6b shape' if device == 'cuda' else 'tiny'} bf16, twice the KV blocks in the same memory",
        1.95 <= ratio <= 2.05 and len(outputs["fp8"]) == 16,
        blocks=blocks,
        ratio=round(ratio, 3),
    )


def fp8_kv_cache(device: str) -> None:
    fp8_kv_agreement(device)
    fp8_kv_blocks(device)
