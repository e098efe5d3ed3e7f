"""compressed-tensors checkpoints written by the compressed-tensors library itself (PyPI
`compressed-tensors`, github.com/vllm-project/compressed-tensors), not by weir's packers:
- scales and zero points: quantization/utils/helpers.py `calculate_qparams` (min-max per group);
- packing: compressors/pack_quantized/base.py `PackedQuantizationCompressor.compress`
  (weight_packed, weight_shape, and weight_zero_point packed along the output dim by
  helpers.py `pack_to_int32`);
- the reference weights: the same class's `decompress` (unpack_from_int32, then
  quantization/lifecycle/forward.py `dequantize`), given the scales in float32 so that
  (q - zp) * scale is computed exactly, as weir does;
- config.json's quantization_config: quantization/quant_config.py `QuantizationConfig`, dumped the
  way compressors/model_compressors/model_compressor.py `ModelCompressor.update_config` writes it.
All of it runs on CPU (pyproject's test extra installs the package).

actorder "group" (weight_g_idx) was removed from compressed-tensors in 0.20, so the library no longer
quantizes by a g_idx: the module is quantized, packed and decompressed by it with its input columns
permuted (contiguous groups, as llm-compressor's GPTQ quantizes in activation order), and only the
permutation back to the checkpoint's column order is done here: the codes unpacked and repacked with
the library's helpers.py unpack_from_int32 / pack_to_int32, weight_g_idx = g_idx[invperm] as
llm-compressor's gptq_quantize wrote it, the reference's columns put back."""

from __future__ import annotations

import json
import re
import zlib
from pathlib import Path

import torch
from safetensors.torch import load_file

from tests.engine.quantization.checkpoints import LINEAR_SUFFIXES, _write


def write_ct_library_checkpoint(
    src: Path, root: Path, bits: int, group_size: int, symmetric: bool, actorder: str | None = None
) -> tuple[Path, Path]:
    """(a pack-quantized checkpoint of `src`'s linear layers, its dequantized float32 reference);
    group_size -1: one scale (and zero point) per output channel. Scales are stored bf16, as
    llm-compressor saves them for a bf16 model."""
    import compressed_tensors
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32, unpack_from_int32
    from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme
    from compressed_tensors.quantization.utils.helpers import calculate_qparams

    by_group = actorder == "group"
    strategy = (
        {"strategy": "channel"} if group_size == -1 else {"strategy": "group", "group_size": group_size}
    )
    args = QuantizationArgs(
        num_bits=bits, type="int", symmetric=symmetric, actorder=None if by_group else actorder, **strategy
    )
    scheme = QuantizationScheme(targets=["Linear"], weights=args)
    state = load_file(str(next(src.glob("*.safetensors"))))
    quantized, reference = dict(state), dict(state)
    for name in [n for n in state if n.endswith(".weight") and any(s in n for s in LINEAR_SUFFIXES)]:
        module = name.removesuffix(".weight")
        w = state[name].float()  # [out, in]
        if by_group:  # one order per input: fused q/k/v and gate/up share theirs
            order_key = re.sub(r"(k_proj|v_proj)$", "q_proj", module).replace("up_proj", "gate_proj")
            gen = torch.Generator().manual_seed(zlib.crc32(order_key.encode()))
            perm = torch.randperm(w.shape[1], generator=gen)  # [in]
            w = w[:, perm]  # [out, in] in activation order: contiguous groups
        groups = w.unflatten(1, (-1, w.shape[1] if group_size == -1 else group_size))  # [out, G, gs]
        scale, zero_point = calculate_qparams(groups.amin(dim=2), groups.amax(dim=2), args)  # [out, G]
        scale = scale.bfloat16()
        packed = PackedQuantizationCompressor.compress(
            {"weight": w, "weight_scale": scale, "weight_zero_point": zero_point}, scheme
        )
        unpacked = PackedQuantizationCompressor.decompress({**packed, "weight_scale": scale.float()}, scheme)
        weight = unpacked["weight"]  # [out, in]
        if by_group:  # back to the checkpoint's column order
            inverse = torch.argsort(perm)
            codes = unpack_from_int32(packed["weight_packed"], bits, w.shape)  # [out, in] int8
            packed["weight_packed"] = pack_to_int32(codes[:, inverse].contiguous(), bits)
            packed["weight_g_idx"] = (torch.arange(w.shape[1]) // group_size)[inverse].to(torch.int32)
            weight = weight[:, inverse]
        del quantized[name]
        quantized |= {f"{module}.{key}": value for key, value in packed.items()}
        reference[name] = weight
    config = QuantizationConfig(
        config_groups={"group_0": scheme},
        format="pack-quantized",
        quantization_status="compressed",
        ignore=["lm_head"],
    )
    quant = {
        "version": compressed_tensors.__version__,
        "quant_method": "compressed-tensors",
        "sparsity_config": {},
        "transform_config": {},
        **json.loads(config.model_dump_json(exclude={"quant_method"})),
    }
    if by_group:
        quant["config_groups"]["group_0"]["weights"]["actorder"] = "group"
    tag = f"ct-lib-w{bits}-g{group_size}-{'sym' if symmetric else 'asym'}-{actorder}"
    return _write(src, root / tag, quantized, quant), _write(src, root / f"{tag}-ref", reference, None)
