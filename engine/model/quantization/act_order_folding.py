"""An act-order down_proj's input order folded into gate_up_proj's output rows, at load.

A GPTQ (desc_act) or compressed-tensors (actorder "group") layer with full groups runs with its input
columns sorted by group (engine.model.quantization.act_order.group_order) and gathers x's columns on
every call (`perm`, an index_select launch). For the MLP's down_proj, x = silu(gate) * up is elementwise
in gate_up_proj's output channels: with gate_up_proj's gate rows and up rows both reordered by down's
`perm`, it produces x already gathered, and down_proj drops its gather. The values are the same ones
in the same order, so the outputs are bit for bit those of the gather.

The other act-order layers keep theirs: q/k/v's and gate_up's input is the residual stream (read by
every layer) and o_proj's the attention heads' output (a reorder across heads would mix them).
Not with LoRA (an adapter's gate_up B rows and down A columns would need the same reorder; the runner
does not fold then) and only for gate_up layouts whose rows can be reordered: unquantized, or the
weight-only integer layouts (the Triton kernels' and the reference's). Others keep down's gather.
"""

from __future__ import annotations

import torch
from torch import nn

from engine.model.quantization.unquantized import UnquantizedLinearMethod


def fold_down_proj_orders(model: nn.Module) -> int:
    """Fold each MLP's (a module with gate_up_proj and down_proj) down_proj `perm` into its
    gate_up_proj where that layer's layout allows. -> how many were folded."""
    folded = 0
    for module in model.modules():
        gate_up = getattr(module, "gate_up_proj", None)
        down = getattr(module, "down_proj", None)
        perm = getattr(down, "perm", None) if down is not None else None
        if gate_up is None or perm is None:
            continue
        if reorder_gate_up_rows(gate_up, perm):
            down.perm = None
            folded += 1
    return folded


def reorder_gate_up_rows(layer: nn.Module, perm: torch.Tensor) -> bool:
    """Reorder a [gate; up] layer's output channels so that each half's channel j is its former
    channel perm[j]. -> False (nothing changed) where its layout is not one this knows."""
    sizes = getattr(layer, "output_partition_sizes", None)
    if sizes is None or len(sizes) != 2 or sizes[0] != sizes[1] or sizes[0] != perm.numel():
        return False
    half = sizes[0]
    rows = torch.cat([perm, perm + half]).to(torch.int64)  # [2 * half]: new row -> old row
    bits = getattr(layer, "wna16_bits", None)
    if bits:  # the Triton kernels' layout: qweight [in / pf, out], scales / zeros [G, out]
        names, dim = ("qweight", "scales", "zeros"), 1
    elif bits == 0 and hasattr(layer, "codes"):  # the reference's: codes [out, in], zeros / scales [out, G]
        names, dim = ("codes", "zeros", "scales"), 0
    elif isinstance(getattr(layer, "quant_method", None), UnquantizedLinearMethod):
        names, dim = ("weight",), 0
    else:
        return False
    for name in names:
        _reorder(layer, name, rows, dim)
    if getattr(layer, "bias", None) is not None:
        _reorder(layer, "bias", rows, 0)
    return True


def _reorder(layer: nn.Module, name: str, rows: torch.Tensor, dim: int) -> None:
    tensor = getattr(layer, name)
    reordered = tensor.data.index_select(dim, rows.to(tensor.device)).contiguous()
    if isinstance(tensor, nn.Parameter):
        tensor.data = reordered
    else:
        setattr(layer, name, reordered)  # a registered buffer: replaced in place of the old
