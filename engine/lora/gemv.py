"""A LoRA layer at one token as the float GEMV with the expand in its epilogue (benchmark A3).

At batch 1 a LoRA layer was three launches: the base layer, the shrink (x A^T) and the expand
(y += t B^T); the last two move a few kilobytes each and are mostly launch ramp and drain (~5 us
each, 256 launches a Llama-3-8B step: an adapter made batch-1 decode 1.31x slower on an H200). Where
the base layer can be the Triton float GEMV (engine.model.quantization.float_gemv: unquantized
weights, one token, inside CUDA graphs), the LoRA hook runs the shrink and then that GEMV adding the
expand's term to its output columns (ops/triton/lora_gemv.py): the expand's launch is gone. With
LoRA the MLP's shapes take the GEMV too (`plan_float_gemv(..., lora=True)`): without LoRA it only
ties cuBLAS there, with it it also saves the expand.

The hook decides (engine.lora.layers.LoRALinear.forward_layer), so the quantization methods stay as
they are: quantized layers keep their own apply and the shrink/expand pair. A launch may carry
`fuse_shrink: True` to compute the shrink in the same launch too (`gemv_lora`: one launch a layer);
o_proj's and down_proj's planned launches do, where the H200 measured it faster (float_gemv.py's
`_LORA_LAUNCHES`). A launch may also carry the
ops.triton.lora_gemv options `shrink_chunk` (fused: input columns per worker; not fused: the shrink
launch's columns per split), `reduce_t` (fused only) and `early_b`; none planned yet
(loadtest/sweep_lora_gemv.py measures them).

The term joins the base output in float32 before the output is rounded once (the unfused pair rounds
the base output, then adds the term and rounds again): the same sum, rounded once less.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

from engine.model.quantization.float_gemv import float_gemv_supported, plan_float_gemv
from engine.model.quantization.unquantized import UnquantizedLinearMethod

_forced: dict[str, Any] | None = None


@contextlib.contextmanager
def lora_gemv_forced(launch: dict[str, Any]) -> Iterator[None]:
    """LoRA layers built inside this block plan `launch` whatever their shape, dtype and device (still
    only unquantized layers on the Triton kernels): for checks of the fused path on models too small to
    have a planned shape (the GPU check's tiny fp32 Llama; CPU tests under TRITON_INTERPRET)."""
    global _forced
    previous, _forced = _forced, dict(launch)
    try:
        yield
    finally:
        _forced = previous


def plan_lora_gemv(layer: nn.Module, triton_kernels: bool) -> dict[str, Any] | None:
    """The GEMV launch `layer` takes at one token with its LoRA term in the epilogue, or None (the
    layer's method, then the shrink and expand kernels): unquantized weights, the Triton kernels, and
    a planned shape on a device where the float GEMV was measured (or a forced launch)."""
    if not triton_kernels or not isinstance(getattr(layer, "quant_method", None), UnquantizedLinearMethod):
        return None
    if _forced is not None:
        return dict(_forced)
    weight = layer.weight  # [out, in]
    launch = plan_float_gemv(weight.shape[1], weight.shape[0], lora=True)
    if launch is None or not float_gemv_supported(weight):
        return None
    return dict(launch)


def lora_gemv_linear(
    x: torch.Tensor,  # [..., in], one token
    weight: torch.Tensor,  # [out, in]
    unit_scale: torch.Tensor,  # [out] float32 ones
    bias: torch.Tensor | None,  # [out]
    shrink: Any,  # ops.triton.lora.lora_shrink
    a_stacked: torch.Tensor,  # [max_loras, S * R, in]
    b_stacked: torch.Tensor,  # [max_loras, out, S * R]
    token_slots: torch.Tensor,  # [>= 1] int32: element 0 is the token's slot
    slice_offsets: Sequence[int],
    launch: dict[str, Any],
) -> torch.Tensor:  # [..., out]
    """x W^T (+ bias) + the token's LoRA term: the shrink, then the GEMV with the expand as its
    epilogue (or, with launch["fuse_shrink"], both in one launch)."""
    from ops.triton.lora_gemv import gemv_lora, gemv_lora_expand  # noqa: PLC0415 (triton: GPU or interpreter)

    launch = dict(launch)
    x2 = x.reshape(1, -1)  # [1, in]
    slots = token_slots[:1]
    if launch.pop("fuse_shrink", False):
        out = gemv_lora(x2, weight, unit_scale, a_stacked, b_stacked, slots, slice_offsets, **launch)
    else:
        if launch.pop("reduce_t", False):
            raise ValueError("lora_gemv_linear: reduce_t needs fuse_shrink (the separate shrink's partials)")
        # shrink_chunk: here the separate shrink's columns per split (its default when not given)
        chunk = launch.pop("shrink_chunk", None)
        t = shrink(x2, a_stacked, slots) if chunk is None else shrink(x2, a_stacked, slots, chunk=chunk)
        # t: [split, 1, S * R] float32
        out = gemv_lora_expand(x2, weight, unit_scale, t, b_stacked, slots, slice_offsets, **launch)
    if bias is not None:
        out = out + bias
    return out.view(*x.shape[:-1], weight.shape[0])
