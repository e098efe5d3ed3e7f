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
All of it runs on CPU (pyproject's test extra installs the package)."""

from __future__ import annotations

import json
from pathlib import Path

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
    from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme
    from compressed_tensors.quantization.utils.helpers import calculate_qparams

    strategy = (
        {"strategy": "channel"} if group_size == -1 else {"strategy": "group", "group_size": group_size}
    )
    args = QuantizationArgs(num_bits=bits, type="int", symmetric=symmetric, actorder=actorder, **strategy)
    scheme = QuantizationScheme(targets=["Linear"], weights=args)
    state = load_file(str(next(src.glob("*.safetensors"))))
    quantized, reference = dict(state), dict(state)
    for name in [n for n in state if n.endswith(".weight") and any(s in n for s in LINEAR_SUFFIXES)]:
        module = name.removesuffix(".weight")
        w = state[name].float()  # [out, in]
        groups = w.unflatten(1, (-1, w.shape[1] if group_size == -1 else group_size))  # [out, G, gs]
        scale, zero_point = calculate_qparams(groups.amin(dim=2), groups.amax(dim=2), args)  # [out, G]
        scale = scale.bfloat16()
        packed = PackedQuantizationCompressor.compress(
            {"weight": w, "weight_scale": scale, "weight_zero_point": zero_point}, scheme
        )
        unpacked = PackedQuantizationCompressor.decompress({**packed, "weight_scale": scale.float()}, scheme)
        del quantized[name]
        quantized |= {f"{module}.{key}": value for key, value in packed.items()}
        reference[name] = unpacked["weight"]
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
    tag = f"ct-lib-w{bits}-g{group_size}-{'sym' if symmetric else 'asym'}-{actorder}"
    return _write(src, root / tag, quantized, quant), _write(src, root / f"{tag}-ref", reference, None)
