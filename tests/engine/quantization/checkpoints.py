"""Tiny quantized checkpoints written by the tests themselves, from a tiny random Llama: each linear
layer quantized to GPTQ or AWQ with the packers of engine.model.quantization.packing, plus the
reference checkpoint (same model, every quantized weight replaced by its dequantized value, float32)
that transformers runs for parity.

Not GPTQModel/AutoAWQ themselves: gptqmodel (PyPI 7.7.0) is a source-only package that needs
torch >= 2.14 and builds C++/CUDA extensions, auto-gptq/autoawq need CUDA builds, and weir's torch
is pinned; so the layouts follow the reference implementations named in engine.model.quantization
(gptq.py, awq.py) and tests/engine/quantization/test_packing.py pins them with hand-made words.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from engine.model.quantization.packing import AWQ_PACK_ORDER, pack_cols, pack_rows
from tests.tiny_models import build_model

LINEAR_SUFFIXES = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
    "mlp.c_fc",  # StarCoder2's plain MLP
    "mlp.c_proj",
    "self_attn.dense",  # Phi's output projection and plain MLP
    "mlp.fc1",
    "mlp.fc2",
    ".attn.q_proj",  # GPT-J's: transformer.h.N.attn.{q,k,v,out}_proj, mlp.fc_in / fc_out
    ".attn.k_proj",
    ".attn.v_proj",
    ".attn.out_proj",
    "mlp.fc_in",
    "mlp.fc_out",
    # Phi-3's checkpoints store these fused: quantized as one module each, as its tools write them
    "self_attn.qkv_proj",
    "mlp.gate_up_proj",
    # mixture of experts: every expert's projections (Qwen's names, Mixtral's w1/w3/w2) and Qwen2-MoE's
    # shared expert; the routers (mlp.gate, block_sparse_moe.gate, shared_expert_gate) stay float
    ".gate_proj",
    ".up_proj",
    ".down_proj",
    ".w1.",
    ".w2.",
    ".w3.",
)


def build_wide_llama(path: Path, tokenizer_dir: Path, seed: int = 0, hidden: int = 128) -> Path:
    """A tiny Llama whose every linear input (hidden, 2 * hidden) divides by every group size (32..128);
    hidden 256 makes every q/k/v output a multiple of 128 (FP8 blocks)."""
    # Same config and initialisation as the other tiny models, wider and with a 512-token vocabulary.
    return build_model(
        "llama", path, tokenizer_dir, seed, vocab_size=512, hidden_size=hidden, intermediate_size=2 * hidden
    )


def quantize_groups(
    w: torch.Tensor, bits: int, g_idx: torch.Tensor, groups: int, sym: bool, min_zero: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """GPTQ's min-max quantizer (RTN per group): w [out, in] -> codes [out, in], zeros [G, out] ints,
    scales [G, out] fp16. `min_zero` 1 keeps zero - 1 representable (checkpoint_format "gptq")."""
    maxq = (1 << bits) - 1
    out_features, _ = w.shape
    codes = torch.empty_like(w, dtype=torch.int64)
    zeros = torch.empty(groups, out_features, dtype=torch.int64)
    scales = torch.empty(groups, out_features, dtype=torch.float16)
    for g in range(groups):
        cols = (g_idx == g).nonzero().flatten()
        wg = w[:, cols]  # [out, n]
        lo = wg.min(dim=1).values.clamp(max=0)
        hi = wg.max(dim=1).values.clamp(min=0)
        if sym:
            hi = torch.maximum(lo.abs(), hi)
            lo = -hi
        scale = ((hi - lo) / maxq).clamp(min=1e-6).half()  # stored fp16: quantize against it
        s = scale.float()
        zero = torch.full_like(s, (maxq + 1) // 2) if sym else torch.round(-lo / s).clamp(min_zero, maxq)
        codes[:, cols] = torch.clamp(torch.round(wg / s[:, None]) + zero[:, None], 0, maxq).long()
        zeros[g] = zero.long()
        scales[g] = scale
    return codes, zeros, scales


def dequantized(
    codes: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor, g_idx: torch.Tensor
) -> torch.Tensor:
    """[out, in] float32: what every format's reference computes, (code - zero) * scale."""
    return (codes.float() - zeros.t()[:, g_idx].float()) * scales.t()[:, g_idx].float()


def _write(src: Path, dst: Path, tensors: dict[str, torch.Tensor], quant: dict | None) -> Path:
    shutil.copytree(src, dst)
    for f in dst.glob("*.safetensors"):
        f.unlink()
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(dst / "model.safetensors"))
    if quant is not None:
        cfg = json.loads((dst / "config.json").read_text())
        cfg["quantization_config"] = quant
        (dst / "config.json").write_text(json.dumps(cfg, indent=2))
    return dst


def write_gptq(
    src: Path,
    root: Path,
    bits: int,
    group_size: int,
    desc_act: bool,
    sym: bool,
    checkpoint_format: str,
    skip: tuple[str, ...] = (),
) -> tuple[Path, Path]:
    """(the GPTQ checkpoint, its dequantized float32 reference) written under `root`."""
    state = load_file(str(next(src.glob("*.safetensors"))))
    quantized, reference = dict(state), dict(state)
    for name in [n for n in state if n.endswith(".weight") and any(s in n for s in LINEAR_SUFFIXES)]:
        if any(s in name for s in skip):
            continue
        w = state[name].float()  # [out, in]
        in_features = w.shape[1]
        gs = in_features if group_size == -1 else group_size
        groups = in_features // gs
        g_idx = torch.arange(in_features) // gs
        if desc_act:  # act order: groups are consecutive in a permuted input order, one per input
            # (q/k/v, and gate/up, share their input, hence GPTQ's Hessian order)
            key = name.replace("k_proj", "q_proj").replace("v_proj", "q_proj").replace("up_proj", "gate_proj")
            gen = torch.Generator().manual_seed(sum(map(ord, key)) * 31 + bits)
            perm = torch.randperm(in_features, generator=gen)
            g_idx = torch.empty_like(g_idx)
            g_idx[perm] = torch.arange(in_features) // gs
        min_zero = 1 if checkpoint_format == "gptq" and not sym else 0
        codes, zeros, scales = quantize_groups(w, bits, g_idx, groups, sym, min_zero)
        stored_zeros = zeros - 1 if checkpoint_format == "gptq" else zeros
        base = name.removesuffix(".weight")
        del quantized[name]
        quantized[f"{base}.qweight"] = pack_rows(codes.t(), bits)  # [in / pf, out]
        quantized[f"{base}.qzeros"] = pack_cols(stored_zeros, bits)  # [G, out / pf]
        quantized[f"{base}.scales"] = scales  # [G, out] fp16
        quantized[f"{base}.g_idx"] = g_idx.to(torch.int32)
        reference[name] = dequantized(codes, zeros, scales, g_idx)
    quant = {
        "quant_method": "gptq",
        "bits": bits,
        "group_size": group_size,
        "desc_act": desc_act,
        "sym": sym,
        "checkpoint_format": checkpoint_format,
        "damp_percent": 0.01,
        "true_sequential": True,
    }
    if skip:
        quant["modules_to_not_convert"] = list(skip)
    tag = f"gptq-{bits}-{group_size}-{int(desc_act)}-{int(sym)}-{checkpoint_format}-{len(skip)}"
    return _write(src, root / tag, quantized, quant), _write(src, root / f"{tag}-ref", reference, None)


def write_awq(src: Path, root: Path, group_size: int, skip: tuple[str, ...] = ()) -> tuple[Path, Path]:
    """(the AWQ GEMM checkpoint, its dequantized float32 reference) written under `root`."""
    state = load_file(str(next(src.glob("*.safetensors"))))
    quantized, reference = dict(state), dict(state)
    for name in [n for n in state if n.endswith(".weight") and any(s in n for s in LINEAR_SUFFIXES)]:
        if any(s in name for s in skip):
            continue
        w = state[name].float()
        in_features = w.shape[1]
        g_idx = torch.arange(in_features) // group_size
        codes, zeros, scales = quantize_groups(w, 4, g_idx, in_features // group_size, sym=False)
        base = name.removesuffix(".weight")
        del quantized[name]
        quantized[f"{base}.qweight"] = pack_cols(codes.t(), 4, AWQ_PACK_ORDER)  # [in, out / 8]
        quantized[f"{base}.qzeros"] = pack_cols(zeros, 4, AWQ_PACK_ORDER)  # [G, out / 8]
        quantized[f"{base}.scales"] = scales  # [G, out] fp16
        reference[name] = dequantized(codes, zeros, scales, g_idx)
    quant = {
        "quant_method": "awq",
        "bits": 4,
        "group_size": group_size,
        "zero_point": True,
        "version": "gemm",
    }
    if skip:
        quant["modules_to_not_convert"] = list(skip)
    tag = f"awq-{group_size}-{len(skip)}"
    return _write(src, root / tag, quantized, quant), _write(src, root / f"{tag}-ref", reference, None)


def write_squeezellm(src: Path, root: Path) -> tuple[Path, Path]:
    """(a dense SqueezeLLM checkpoint, its dequantized float32 reference). SqueezeLLM's tool fits each
    output channel's 16 values by sensitivity-weighted k-means; here they are the row's quantiles (any
    non-uniform table exercises the format), each weight coded as its nearest table entry.
    Layout: SqueezeLLM, squeezellm/quant.py, QuantLinear.pack (qweight [in / 8, out], 4-bit codes
    packed along the input, the first row in the lowest bits); lookup_table fp16 [out, 16];
    quant_config.json {"wbits": 4}."""
    state = load_file(str(next(src.glob("*.safetensors"))))
    quantized, reference = dict(state), dict(state)
    probs = torch.linspace(0.0, 1.0, 16)
    for name in [n for n in state if n.endswith(".weight") and any(s in n for s in LINEAR_SUFFIXES)]:
        w = state[name].float()  # [out, in]
        table = torch.quantile(w, probs, dim=1).t().contiguous().half()  # [out, 16], ascending per row
        codes = (w.unsqueeze(2) - table.float().unsqueeze(1)).abs().argmin(dim=2)  # [out, in]
        base = name.removesuffix(".weight")
        del quantized[name]
        quantized[f"{base}.qweight"] = pack_rows(codes.t(), 4)  # [in / 8, out]
        quantized[f"{base}.lookup_table"] = table
        reference[name] = torch.gather(table.float(), 1, codes)
    checkpoint = _write(src, root / "squeezellm", quantized, None)
    (checkpoint / "quant_config.json").write_text(json.dumps({"wbits": 4}))
    return checkpoint, _write(src, root / "squeezellm-ref", reference, None)


FP8_MAX = 448.0


def _to_fp8(w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return (w / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)


def fp8_online_reference(w: torch.Tensor) -> torch.Tensor:
    """What online fp8 should load for a float weight [out, in]: per-channel amax / 448 scales."""
    scale = w.float().abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / FP8_MAX  # [out, 1]
    return _to_fp8(w.float(), scale).float() * scale


def write_fp8(
    src: Path,
    root: Path,
    scheme: str,
    block: tuple[int, int] = (128, 128),
    skip: tuple[str, ...] = (),
    static: bool = False,
) -> tuple[Path, Path]:
    """(an fp8 checkpoint, its dequantized float32 reference); scheme "tensor" (scalar weight_scale
    per module), "channel" ([out, 1]) or "block" (weight_scale_inv [out / bn, in / bk]). static: a
    scalar input_scale per module (0.01 .. 0.05, differing between q, k and v) and activation_scheme
    "static"."""
    state = load_file(str(next(src.glob("*.safetensors"))))
    quantized, reference = dict(state), dict(state)
    for name in [n for n in state if n.endswith(".weight") and any(s in n for s in LINEAR_SUFFIXES)]:
        if any(s in name for s in skip):
            continue
        w = state[name].float()  # [out, in]
        base = name.removesuffix(".weight")
        if scheme == "block":
            bn, bk = block
            out_blocks, in_blocks = -(-w.shape[0] // bn), -(-w.shape[1] // bk)
            scale = torch.empty(out_blocks, in_blocks)
            for i in range(out_blocks):
                for j in range(in_blocks):
                    scale[i, j] = w[i * bn : (i + 1) * bn, j * bk : (j + 1) * bk].abs().max() / FP8_MAX
            full = scale.repeat_interleave(bn, 0)[: w.shape[0]].repeat_interleave(bk, 1)[:, : w.shape[1]]
            quantized[f"{base}.weight_scale_inv"] = scale
        elif scheme == "channel":
            full = w.abs().amax(dim=1, keepdim=True) / FP8_MAX  # [out, 1]
            quantized[f"{base}.weight_scale"] = full
        else:
            full = w.abs().max() / FP8_MAX  # []
            quantized[f"{base}.weight_scale"] = full
        quantized[name] = _to_fp8(w, full)
        reference[name] = quantized[name].float() * full
        if static:
            quantized[f"{base}.input_scale"] = torch.tensor(0.01 * (1 + sum(map(ord, base)) % 5))
    quant: dict = {"quant_method": "fp8", "activation_scheme": "static" if static else "dynamic"}
    if scheme == "block":
        quant["weight_block_size"] = list(block)
    if skip:
        quant["ignored_layers"] = list(skip)
    tag = f"fp8-{scheme}-{block[0]}-{len(skip)}-{int(static)}"
    return _write(src, root / tag, quantized, quant), _write(src, root / f"{tag}-ref", reference, None)


def write_fp8_online_reference(src: Path, root: Path) -> Path:
    """The float32 checkpoint online fp8 should behave as: every linear weight fp8-rounded per channel."""
    state = load_file(str(next(src.glob("*.safetensors"))))
    reference = dict(state)
    for name in [n for n in state if n.endswith(".weight") and any(s in n for s in LINEAR_SUFFIXES)]:
        reference[name] = fp8_online_reference(state[name])
    return _write(src, root / "fp8-online-ref", reference, None)


def write_compressed_tensors(
    src: Path, root: Path, scheme: str, ignore: tuple[str, ...] = ()
) -> tuple[Path, Path]:
    """(a compressed-tensors checkpoint as llm-compressor writes it, its dequantized float32 reference).
    scheme: "w4a16-g32" / "w8a16-channel" (pack-quantized: weight_packed int32 [out, in / pf] holding
    code + 2**(bits - 1) along the input, first column lowest; weight_scale bf16 [out, G]; weight_shape),
    "fp8-channel" / "fp8-block" (float-quantized: weight e4m3, weight_scale [out, 1] or per [64, 64]
    block). Layout: compressed-tensors, pack_quantized.py pack_to_int32 and quant_args.py."""
    import re

    state = load_file(str(next(src.glob("*.safetensors"))))
    quantized, reference = dict(state), dict(state)
    for name in [n for n in state if n.endswith(".weight") and any(s in n for s in LINEAR_SUFFIXES)]:
        module = name.removesuffix(".weight")
        if any(re.match(i[3:], module) if i.startswith("re:") else module.endswith(i) for i in ignore):
            continue
        w = state[name].float()  # [out, in]
        if scheme.startswith("fp8"):
            if scheme == "fp8-block":
                blocks = w.unflatten(0, (-1, 64)).unflatten(2, (-1, 64))  # [out / 64, 64, in / 64, 64]
                scale = blocks.abs().amax(dim=(1, 3)) / FP8_MAX  # [out / 64, in / 64]
                full = scale.repeat_interleave(64, 0).repeat_interleave(64, 1)
            else:
                scale = full = w.abs().amax(dim=1, keepdim=True) / FP8_MAX  # [out, 1]
            quantized[name] = _to_fp8(w, full)
            quantized[f"{module}.weight_scale"] = scale
            reference[name] = quantized[name].float() * full
            continue
        bits, group = (4, 32) if scheme == "w4a16-g32" else (8, w.shape[1])
        qmax = (1 << (bits - 1)) - 1
        scale = (w.unflatten(1, (-1, group)).abs().amax(dim=2) / qmax).clamp(min=1e-8).bfloat16()  # [out, G]
        full = scale.float().repeat_interleave(group, 1)  # [out, in]
        q = torch.clamp(torch.round(w / full), -qmax - 1, qmax)  # [out, in] signed
        del quantized[name]
        quantized[f"{module}.weight_packed"] = pack_cols(q.long() + (1 << (bits - 1)), bits)  # [out, in / pf]
        quantized[f"{module}.weight_scale"] = scale
        quantized[f"{module}.weight_shape"] = torch.tensor(list(w.shape), dtype=torch.int64)
        reference[name] = q * full
    if scheme.startswith("fp8"):
        weights = {"num_bits": 8, "type": "float", "symmetric": True, "dynamic": False}
        weights |= (
            {"strategy": "block", "block_structure": [64, 64]}
            if scheme == "fp8-block"
            else {"strategy": "channel"}
        )
        group = {"targets": ["Linear"], "weights": weights, "format": "float-quantized",
                 "input_activations": {"num_bits": 8, "type": "float", "strategy": "token", "dynamic": True}}  # fmt: skip
    else:
        weights = {"num_bits": 4, "type": "int", "strategy": "group", "group_size": 32} if scheme == "w4a16-g32" else {
            "num_bits": 8, "type": "int", "strategy": "channel"}  # fmt: skip
        group = {"targets": ["Linear"], "weights": {**weights, "symmetric": True, "dynamic": False},
                 "input_activations": None, "output_activations": None}  # fmt: skip
    quant = {
        "quant_method": "compressed-tensors",
        "format": "float-quantized" if scheme.startswith("fp8") else "pack-quantized",
        "quantization_status": "compressed",
        "config_groups": {"group_0": group},
        "ignore": ["lm_head", *ignore],
        "kv_cache_scheme": None,
    }
    tag = f"ct-{scheme}-{len(ignore)}"
    return _write(src, root / tag, quantized, quant), _write(src, root / f"{tag}-ref", reference, None)


# name -> (quant method, writer(src, root) -> (checkpoint, reference)): one checkpoint per format, as
# the per-family parity tests (test_phi3_quant.py, test_family_quant.py) write them
FORMATS = {
    "gptq-4-g32": ("gptq", lambda src, root: write_gptq(src, root, 4, 32, False, True, "gptq")),
    "gptq-4-g32-act-order": ("gptq", lambda src, root: write_gptq(src, root, 4, 32, True, False, "gptq")),
    "awq-g64": ("awq", lambda src, root: write_awq(src, root, 64)),
    "ct-w4a16-g32": ("compressed-tensors", lambda src, root: write_compressed_tensors(src, root, "w4a16-g32")),
    "ct-fp8-channel": ("compressed-tensors", lambda src, root: write_compressed_tensors(src, root, "fp8-channel")),
    "fp8-tensor": ("fp8", lambda src, root: write_fp8(src, root, "tensor")),
    "fp8-channel": ("fp8", lambda src, root: write_fp8(src, root, "channel")),
    "fp8-block-64": ("fp8", lambda src, root: write_fp8(src, root, "block", block=(64, 64))),
}  # fmt: skip
