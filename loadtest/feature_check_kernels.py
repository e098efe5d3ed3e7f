"""Kernel parts of loadtest/gpu_feature_check.py at the Llama-3-8B shapes (CUDA only): the LoRA
shrink/expand kernels, the W4A16 GEMM as GPTQ/AWQ layers call it, and the Triton paged attention on
an fp8 KV cache, each against its torch reference (relative error) and timed as CUDA-graph replays
(loadtest/gpu_timing.py: no host launch overhead, weights cycled past L2 where they would fit)."""

from __future__ import annotations

from typing import Any

import torch

from loadtest.gpu_engine_check import RESULTS, check

DEV = "cuda"
BF16 = torch.bfloat16
HIDDEN, INTERMEDIATE = 4096, 14336  # Llama-3-8B
REL_TOL = 1e-2


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64 (NaN if out has NaNs, so it fails every bound)."""
    out, ref = out.double(), ref.double()
    if torch.isnan(out).any():
        return float("nan")
    return ((out - ref).norm() / ref.norm()).item()


def bench_ms(fn: Any) -> float:
    """Median milliseconds per call, one call of `fn` (or of each of a list of them) per CUDA-graph step."""
    from loadtest.gpu_timing import graph_ms

    return round(graph_ms(fn), 4)


def check_close(name: str, out: torch.Tensor, ref: torch.Tensor, tol: float = REL_TOL, **detail: Any) -> bool:
    torch.cuda.synchronize()
    err = rel_err(out, ref)
    return check(name, err < tol, rel_err=f"{err:.2e}", tol=tol, **detail)  # NaN fails


# ------------------------------------------------------------------------------------------ f. LoRA kernels
def lora_kernels() -> None:
    """hidden 4096, rank 16, 8 slots; tokens of mixed slots with -1 rows (base-model tokens)."""
    from ops import reference
    from ops.triton.lora import lora_expand, lora_shrink

    g = torch.Generator(device=DEV).manual_seed(0)
    rank, slots = 16, 8
    a = torch.randn(slots, rank, HIDDEN, device=DEV, generator=g).mul_(0.02).to(BF16)  # [slots, r, in]
    b = torch.randn(slots, HIDDEN, rank, device=DEV, generator=g).mul_(0.1).to(BF16)  # [slots, out, r]
    rows = []
    for num_tokens in (1, 8, 64):
        x = torch.randn(num_tokens, HIDDEN, device=DEV, generator=g).to(BF16)  # [T, in]
        token_slots = torch.randint(-1, slots, (num_tokens,), device=DEV, generator=g, dtype=torch.int32)
        if num_tokens >= 8:
            token_slots[:2] = -1  # some base-model rows for sure
        t = lora_shrink(x, a, token_slots)  # [split, T, r] fp32: partials over splits of the input
        t_ref = reference.lora_shrink(x, a, token_slots)
        check_close(
            f"lora_shrink bf16 {num_tokens} tokens x 4096 -> rank 16 (8 slots, -1 rows)", t.sum(0), t_ref
        )
        # expand into zeros: the delta itself is compared, not drowned by y's own magnitude
        y = lora_expand(t_ref, b, token_slots, torch.zeros(num_tokens, HIDDEN, device=DEV, dtype=BF16))
        y_ref = reference.lora_expand(
            t_ref, b, token_slots, torch.zeros(num_tokens, HIDDEN, device=DEV, dtype=BF16)
        )
        check_close(f"lora_expand bf16 {num_tokens} tokens rank 16 -> 4096 (8 slots, -1 rows)", y, y_ref)
        base = torch.randn(num_tokens, HIDDEN, device=DEV, generator=g).to(BF16)  # [T, out]
        y = lora_expand(t_ref, b, token_slots, base.clone())
        untouched = bool((y[token_slots < 0] == base[token_slots < 0]).all())
        check(f"lora_expand {num_tokens} tokens: rows of slot -1 left exactly as they were", untouched)
        w = torch.randn(HIDDEN, HIDDEN, device=DEV, generator=g).to(BF16)  # [in, out]: the base layer
        rows.append(
            {
                "tokens": num_tokens,
                "shrink_ms": bench_ms(lambda x=x, s=token_slots: lora_shrink(x, a, s)),
                "expand_ms": bench_ms(lambda t=t_ref, s=token_slots, y=y: lora_expand(t, b, s, y)),
                "base_layer_bf16_4096x4096_ms": bench_ms(lambda x=x, w=w: x @ w),
            }
        )
        print(rows[-1], flush=True)
    RESULTS["timings"]["lora_kernels_llama3_8b"] = rows
    lora_gemv_layers()


# (name, in, sub-matrices' outputs) of a Llama-3-8B decoder layer's LoRA layers (A3: all seven projections)
LLAMA3_8B_LORA_LAYERS = (
    ("qkv", HIDDEN, (4096, 1024, 1024)),
    ("o", HIDDEN, (HIDDEN,)),
    ("gate_up", HIDDEN, (INTERMEDIATE, INTERMEDIATE)),
    ("down", INTERMEDIATE, (HIDDEN,)),
)


def lora_gemv_layers() -> None:
    """A3's batch-1 LoRA layers at rank 16 (8 slots, the token on slot 3): the GEMV with the expand
    epilogue (after the shrink) and the one-launch version vs F.linear + the reference shrink/expand,
    slot -1 vs the plain GEMV; then microseconds per layer as graph replays, weights cycled past L2:
    today's base (the planned float GEMV, else cuBLAS) + shrink + expand, shrink + fused GEMV, one launch."""
    g = torch.Generator(device=DEV).manual_seed(1)
    rows = [_lora_gemv_layer(name, k, sizes, g) for name, k, sizes in LLAMA3_8B_LORA_LAYERS]
    RESULTS["timings"]["lora_gemv_llama3_8b_batch1"] = rows
    # per decoder layer (its four LoRA layers): the part of a step A3 is about
    totals = {key: round(sum(r[key] for r in rows), 2) for key in rows[0] if key.endswith("_us")}
    RESULTS["info"]["lora_gemv_decoder_layer_us"] = totals
    print({"decoder_layer_us": totals}, flush=True)


def _lora_gemv_layer(name: str, k: int, sizes: tuple[int, ...], g: torch.Generator) -> dict[str, Any]:
    import torch.nn.functional as F

    from engine.lora.gemv import lora_gemv_linear
    from engine.model.quantization.float_gemv import plan_float_gemv
    from loadtest.gpu_timing import copies_past_l2
    from ops import reference
    from ops.triton.fp8_gemv import fp8_gemv
    from ops.triton.lora import lora_expand, lora_shrink
    from ops.triton.lora_gemv import gemv_lora, gemv_lora_expand

    rank, num_slots = 16, 8
    n, dim = sum(sizes), rank * len(sizes)
    offsets = [sum(sizes[:i]) for i in range(len(sizes))]
    launch = plan_float_gemv(k, n, lora=True)
    base_launch = plan_float_gemv(k, n)  # None: cuBLAS, as today
    assert launch is not None, name
    # The plan's keys split by kernel: the GEMV's tile (every variant), the separate shrink's chunk, and
    # the LoRA options each kernel takes (gemv_lora: all but fuse_shrink; the epilogue GEMV: early_b).
    gemv_keys = {key: v for key, v in launch.items() if key in ("block_n", "block_k", "split_k", "prefetch")}
    one_keys = {key: v for key, v in launch.items() if key != "fuse_shrink"}
    epilogue_keys = {**gemv_keys, "early_b": bool(launch.get("early_b", False))}
    ws = [
        torch.randn(n, k, device=DEV, generator=g).mul_(0.02).to(BF16)
        for _ in range(copies_past_l2(n * k * 2))
    ]  # [N, K] each: distinct copies cycled through, so no call finds its weight in L2
    a = torch.randn(num_slots, dim, k, device=DEV, generator=g).mul_(0.02).to(BF16)  # [slots, S*R, K]
    b = torch.zeros(num_slots, n, dim, device=DEV, dtype=BF16)  # block-diagonal, as the slots hold it
    for i, (start, rows) in enumerate(zip(offsets, sizes, strict=True)):
        block = torch.randn(num_slots, rows, rank, device=DEV, generator=g).mul_(0.1)
        b[:, start : start + rows, i * rank : (i + 1) * rank] = block.to(BF16)
    x = torch.randn(1, k, device=DEV, generator=g).to(BF16)  # [1, K]
    ones = torch.ones(n, device=DEV)
    label = f"{name} {k}->{n} rank 16"
    for slot in (3, -1):
        slots = torch.tensor([slot], device=DEV, dtype=torch.int32)
        t_ref = reference.lora_shrink(x, a, slots)
        ref = reference.lora_expand(t_ref, b, slots, F.linear(x.float(), ws[0].float()), offsets)
        fused = gemv_lora_expand(x, ws[0], ones, lora_shrink(x, a, slots), b, slots, offsets, **epilogue_keys)
        check_close(f"gemv + LoRA expand epilogue, {label} slot {slot} == reference", fused, ref)
        for i in range(2):  # twice: the first launch must put its counters back
            one = gemv_lora(x, ws[0], ones, a, b, slots, offsets, **one_keys)
            check_close(
                f"gemv + LoRA in one launch (launch {i + 1}), {label} slot {slot} == reference", one, ref
            )
        planned_out = lora_gemv_linear(x, ws[0], ones, None, lora_shrink, a, b, slots, offsets, launch)
        check_close(f"the planned path ({launch}), {label} slot {slot} == reference", planned_out, ref)
        if slot < 0:
            same = torch.equal(fused, fp8_gemv(x, ws[0], ones, **gemv_keys))
            check(f"gemv + LoRA expand epilogue, {label} slot -1: exactly the plain GEMV", same)
    slots = torch.tensor([3], device=DEV, dtype=torch.int32)

    def base(w: torch.Tensor) -> torch.Tensor:
        return fp8_gemv(x, w, ones, **base_launch) if base_launch else F.linear(x, w)

    def unfused(w: torch.Tensor) -> torch.Tensor:
        return lora_expand(lora_shrink(x, a, slots), b, slots, base(w), offsets)

    def epilogue(w: torch.Tensor) -> torch.Tensor:
        return gemv_lora_expand(x, w, ones, lora_shrink(x, a, slots), b, slots, offsets, **epilogue_keys)

    def one_launch(w: torch.Tensor) -> torch.Tensor:
        return gemv_lora(x, w, ones, a, b, slots, offsets, **one_keys)

    def planned(w: torch.Tensor) -> torch.Tensor:  # what the engine runs for this layer
        return lora_gemv_linear(x, w, ones, None, lora_shrink, a, b, slots, offsets, launch)

    row: dict[str, Any] = {"layer": f"{name} {k}x{n}"}
    for key, fn in (
        ("base_us", base),
        ("base_shrink_expand_us", unfused),
        ("shrink_fused_gemv_us", epilogue),
    ):
        row[key] = round(1000 * bench_ms([lambda w=w, fn=fn: fn(w) for w in ws]), 2)
    row["one_launch_us"] = round(1000 * bench_ms([lambda w=w: one_launch(w) for w in ws]), 2)
    row["planned_us"] = round(1000 * bench_ms([lambda w=w: planned(w) for w in ws]), 2)
    row["launch"] = launch
    print(row, flush=True)
    return row


# ------------------------------------------------------------------------------------------ d2. W4A16 GEMM
def wna16_layer(k: int, n: int, group_size: int, bits: int, seed: int) -> torch.nn.Module:
    """A linear layer in the kernel layout, as GPTQ/AWQ layers hold it on CUDA (random codes)."""
    from engine.model.quantization.wna16 import register_kernel_layout

    g = torch.Generator(device=DEV).manual_seed(seed)
    groups = k // group_size
    codes = torch.randint(0, 1 << bits, (n, k), device=DEV, generator=g, dtype=torch.uint8)  # [out, in]
    zeros = torch.randint(0, 1 << bits, (n, groups), device=DEV, generator=g).float()  # [out, G]
    scales = (torch.rand(n, groups, device=DEV, generator=g) * 0.01 + 0.002).half().float()  # [out, G]
    layer = torch.nn.Module()
    register_kernel_layout(layer, codes, zeros, scales, None, bits)
    return layer


def wna16_kernel() -> None:
    """apply_wna16 (the dispatch GPTQ/AWQ layers use: fused GEMM or dequantize + cuBLAS by batch) vs
    apply_wna16_reference (dequantize in torch, F.linear), and its time vs a bf16 matmul."""
    from engine.model.quantization.wna16 import _plan, apply_wna16, apply_wna16_reference
    from loadtest.gpu_timing import copies_past_l2

    rows = []
    for k, n in ((HIDDEN, HIDDEN), (HIDDEN, INTERMEDIATE)):
        # distinct copies, cycled through when timed, so that no call finds its weight in L2
        layers = [wna16_layer(k, n, 128, 4, seed=k + n + i) for i in range(copies_past_l2(k * n // 2))]
        layer = layers[0]
        dense = [
            torch.randn(k, n, device=DEV, dtype=BF16) * 0.02 for _ in range(copies_past_l2(k * n * 2))
        ]  # [in, out] each
        for m in (1, 8, 64):
            x = torch.randn(m, k, device=DEV, dtype=BF16)  # [M, K]
            out = apply_wna16(layer, x, None)
            ref = apply_wna16_reference(layer, x, None)
            plan = _plan(m, k, n, 128, x.get_device())
            check_close(
                f"w4a16 g128 bf16 [{m} x {k}] x [{k} x {n}] == dequantize + matmul", out, ref, plan=plan.path
            )
            row = {
                "shape": f"{m}x{k}x{n}",
                "plan": f"{plan.path} m{plan.block_m} n{plan.block_n} k{plan.block_k} split{plan.split_k}",
                "w4a16_ms": bench_ms([lambda x=x, q=q: apply_wna16(q, x, None) for q in layers]),
                "bf16_matmul_ms": bench_ms([lambda x=x, w=w: x @ w for w in dense]),
            }
            row["speedup_vs_bf16"] = round(row["bf16_matmul_ms"] / row["w4a16_ms"], 2)
            rows.append(row)
            print(row, flush=True)
        del layers, dense
    RESULTS["timings"]["w4a16_llama3_8b"] = rows
    # time only (no bound); bench_quant.py's Q5 is the figure with its bandwidth fraction
    RESULTS["info"]["w4a16_speedup_vs_bf16"] = {r["shape"]: r["speedup_vs_bf16"] for r in rows}


# ------------------------------------------------------------------------------------------ e2. fp8 paged attention
def fp8_paged_attention_kernel() -> None:
    """Decode at the Llama-3-8B attention shape (32 q / 8 kv heads, head_dim 128), batch 8, context
    2048, block 16: the Triton kernel on an e4m3 cache (per-head scales 0.02-0.16) vs the torch
    reference reading the same fp8 cache; timed against the bf16 cache."""
    from loadtest.gpu_kernel_check import make_paged
    from ops import reference
    from ops.triton.paged_attention import paged_attention

    batch = make_paged([1] * 8, [2048] * 8, 32, 8, 128, 16, dtype=BF16, seed=3)
    fp8 = dict(batch)
    # per-KV-head scales ([8] float32 on the device, 8x apart across the heads), each head's cache
    # quantized with its own
    device = batch["k_cache"].device
    k_scale = torch.linspace(0.02, 0.16, 8, device=device)
    v_scale = torch.linspace(0.16, 0.02, 8, device=device)
    for name, scale in (("k_cache", k_scale), ("v_cache", v_scale)):
        fp8[name] = (batch[name].float() / scale[:, None]).clamp(-448, 448).to(torch.float8_e4m3fn)
    fp8["k_scale"], fp8["v_scale"] = k_scale, v_scale
    out = paged_attention(**fp8)
    ref = reference.paged_attention(**fp8)
    check_close("paged attention e4m3 cache, 32q/8kv heads d128, batch 8 ctx 2048 == reference", out, ref)
    # and how far the fp8 cache moves the output from the bf16 one (information, not a bound)
    RESULTS["info"]["fp8_vs_bf16_cache_attention_rel_err"] = rel_err(out, reference.paged_attention(**batch))
    row = {"batch": 8, "context": 2048, "fp8_ms": bench_ms(lambda: paged_attention(**fp8))}
    row["bf16_ms"] = bench_ms(lambda: paged_attention(**batch))
    RESULTS["timings"]["paged_attention_fp8_llama3_8b"] = [row]
    print(row, flush=True)
