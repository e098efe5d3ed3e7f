"""Act order for the weight-only integer formats that store a group index per input column (GPTQ's
`g_idx` with desc_act, compressed-tensors' `weight_g_idx` with actorder "group"): column i of the
weight uses the scale and zero point of group g_idx[i], groups no longer contiguous.

- `g_idx_loader`: the parameter's loader, whole on every fused shard (q/k/v share their input, hence
  their order) or, for a row-parallel layer split over ranks, the rank's rows renumbered to the
  groups it holds; an order that scatters a rank's rows over other ranks' groups is refused.
- `group_order`: at load, full groups (as GPTQ calibration writes them) become a permutation of the
  input columns (`perm`, gathered from x per call) over contiguous groups, the layout the fused
  kernel reads; uneven groups keep g_idx (gathered per call by the reference).
"""

from __future__ import annotations

import torch
from torch import nn

from engine.model.parameter import WeightLoader, WeightShapeError
from engine.model.quantization.common import same_on_every_shard_loader


def g_idx_loader(
    layer: nn.Module, row_sharded: bool, groups: int, what: str, order: str, remedy: str
) -> WeightLoader:
    """The g_idx loader of `layer`: `row_sharded` when ranks split its input (`groups`: the scales'
    groups per rank, 0: one group for every rank). `what` names the layer, `order` the format's act
    order and `remedy` the other way out in the refusal."""
    if not row_sharded:
        return same_on_every_shard_loader(f"g_idx of {what}")

    def load(param: torch.Tensor, loaded_weight: torch.Tensor, shard_id: object = None) -> None:
        del shard_id
        rows = param.shape[0]
        if loaded_weight.shape != (rows * layer.tp_size,):
            raise WeightShapeError((rows * layer.tp_size,), tuple(loaded_weight.shape))
        local = loaded_weight.narrow(0, layer.tp_rank * rows, rows).to(torch.int32) - layer.tp_rank * groups
        # act order scatters a rank's rows over every group, whose scales it does not hold
        if local.numel() and (int(local.min()) < 0 or int(local.max()) >= max(groups, 1)):
            raise ValueError(
                f"{what}: {order} checkpoints cannot be split over tensor_parallel_size {layer.tp_size} "
                f"(a rank's input rows use other ranks' groups); serve it with tensor_parallel_size 1 "
                f"or {remedy}"
            )
        param.data.copy_(local)

    return load


def group_order(
    codes: torch.Tensor,  # [out, in] uint8, the checkpoint's column order
    g_idx: torch.Tensor,  # [in] int: group of each input column
    groups: int,
    layer_name: str,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """(codes [out, in] in `perm` order, perm [in] int64 or None, g_idx [in] int64 or None): None
    where the order is the checkpoint's / the groups are contiguous after the permutation."""
    g_idx = g_idx.to(torch.int64)
    if g_idx.numel() and (int(g_idx.min()) < 0 or int(g_idx.max()) >= groups):
        raise ValueError(
            f"{layer_name}: g_idx holds groups in [{int(g_idx.min())}, {int(g_idx.max())}], "
            f"outside the {groups} groups its scales have (corrupt or mismatched checkpoint)"
        )
    in_features = codes.shape[1]
    group_size = in_features // groups
    contiguous = torch.arange(in_features, device=g_idx.device) // group_size
    if torch.equal(g_idx, contiguous):
        return codes, None, None
    if bool((torch.bincount(g_idx, minlength=groups) == group_size).all()):
        # Full groups: sort the input columns by group once, here, so the groups are contiguous;
        # each call then gathers x's columns ([tokens, in]) instead of the scales and zeros ([out, in]).
        perm = torch.argsort(g_idx, stable=True)  # [in]
        return codes[:, perm], perm, None
    return codes, None, g_idx  # uneven groups: gathered per call
