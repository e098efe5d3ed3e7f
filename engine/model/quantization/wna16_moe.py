"""Integer experts of a mixture-of-experts layer (weight-only W4A16 / W8A16): GPTQ (`desc_act` false),
AWQ (GEMM) and compressed-tensors pack-quantized checkpoints, the hub's per-expert layout (Qwen's
`mlp.experts.<e>.{gate,up,down}_proj.*`, Mixtral's `block_sparse_moe.experts.<e>.{w1,w3,w2}.*`).

Each expert projection's tensors are read in its format (the layouts of engine.model.quantization.gptq,
awq and compressed_tensors), turned into one layout as they load, and stacked per layer (this rank's
gate/up rows, down columns):
- `w13_qweight` / `w2_qweight` int32 [E, N, K / pf]: codes packed along the input K (pf = 32 // bits a
  word, the first in the lowest bits: compressed-tensors' packing);
- `w13_scales` / `w2_scales` and `w13_zeros` / `w2_zeros` float32 [E, N, G]: each group's scale and
  zero point (GPTQ's stored zero - 1 added back, AWQ's as stored, compressed-tensors' 2**(bits - 1) when
  symmetric); w = (code - zero) * scale, as the dense formats' reference (common.dequantize).
The fused MoE op (ops.moe_quant.IntExpertScales) dequantizes them: on CPU the reference, on CUDA the
Triton kernels (ops/triton/moe_wna16_gemv.py at decode batches, the grouped GEMM's W_BITS variant past
them). After loading (`store_k_major`) every one of them is stored K-major, [E, K / pf, N] and [E, G, N],
and kept as a view of its logical [E, N, ...] shape: a row of words (or of scales) along N is then
contiguous, so a GEMV's tile reads whole sectors where the checkpoint's order gave it 64-byte pieces
strided by K / pf words.

Act order (GPTQ desc_act, compressed-tensors actorder "group"): each expert's g_idx is read too, and
after loading (`fold_act_order`) its input columns are sorted into group order
(engine.model.quantization.act_order.group_order, which also checks each g_idx's range): down's
columns and, to match, the intermediate rows of gate and up, so the intermediate comes out in down's
order at no cost; gate and up's own columns (they share x, hence one order, which is checked), so
their GEMM gathers x's columns through `w13_perm` (ops.moe_quant.IntExpertScales). Uneven groups and
tensor parallelism (an order that crosses ranks) are refused.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from engine.model.checkpoint_slice import materialize
from engine.model.parameter import WeightShapeError
from engine.model.quantization.act_order import group_order
from engine.model.quantization.base import FusedMoEMethodBase
from engine.model.quantization.packing import AWQ_PACK_ORDER, pack_cols, pack_factor, unpack_cols, unpack_rows
from ops.moe_quant import IntExpertScales

# (tensor, out features N, in features K, group size) -> [N, K] codes, or [N, G] zeros / scales
Convert = Callable[[torch.Tensor, int, int, int], torch.Tensor]


@dataclass(frozen=True, slots=True)
class ExpertFormat:
    """How one format stores an expert projection: checkpoint suffix -> (what it holds, its converter).
    What: "codes", "scales", "zeros", or "check" (validated, not kept)."""

    name: str  # for messages: "GPTQ", "AWQ", "compressed-tensors"
    bits: int
    group_size: int  # -1: one group over the whole input
    tensors: dict[str, tuple[str, Convert]]
    symmetric_zero: bool = False  # no zero-point tensor: zeros are 2**(bits - 1)
    act_order: bool = False  # a "g_idx" tensor: each input column's group (GPTQ desc_act, CT actorder group)
    act_order_name: str = "act order (desc_act)"  # for messages: the option, and the way out without it
    without_act_order: str = "re-quantize with desc_act=False"


def _expect(t: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    if tuple(t.shape) != shape:
        raise WeightShapeError(shape, tuple(t.shape))
    return t


def _int32(t: torch.Tensor, what: str) -> torch.Tensor:
    if t.dtype != torch.int32:
        raise ValueError(f"{what} must be int32; got {t.dtype}")
    return t


def gptq_format(bits: int, group_size: int, checkpoint_format: str, act_order: bool = False) -> ExpertFormat:
    """GPTQ: qweight [K / pf, N] packed along K; qzeros [G, N / pf] (zero - 1 in format "gptq");
    scales [G, N]; g_idx [K] (in order unless `act_order`, desc_act: then kept, each column's group)."""
    mask, offset = (1 << bits) - 1, 1.0 if checkpoint_format == "gptq" else 0.0
    pf = pack_factor(bits)

    def codes(t: torch.Tensor, n: int, k: int, gs: int) -> torch.Tensor:
        return unpack_rows(_expect(_int32(t, "qweight"), (k // pf, n)), bits).t()

    def zeros(t: torch.Tensor, n: int, k: int, gs: int) -> torch.Tensor:
        return (
            (unpack_cols(_expect(_int32(t, "qzeros"), (k // gs, n // pf)), bits) & mask).float() + offset
        ).t()

    def scales(t: torch.Tensor, n: int, k: int, gs: int) -> torch.Tensor:
        return _expect(t, (k // gs, n)).float().t()

    def g_idx(t: torch.Tensor, n: int, k: int, gs: int) -> torch.Tensor:
        if act_order:
            return _column_groups(t, n, k, gs)
        if not torch.equal(_expect(t, (k,)).long(), torch.arange(k) // gs):
            raise ValueError("g_idx is not in input order (act order) but the checkpoint says desc_act=False")
        return t

    tensors = {"qweight": ("codes", codes), "qzeros": ("zeros", zeros), "scales": ("scales", scales)}
    g_idx_kind = "g_idx" if act_order else "check"
    return ExpertFormat(
        "GPTQ", bits, group_size, {**tensors, "g_idx": (g_idx_kind, g_idx)}, act_order=act_order
    )


def awq_format(group_size: int) -> ExpertFormat:
    """AWQ GEMM: qweight [K, N / 8] and qzeros [G, N / 8] packed along N in AWQ's order; scales [G, N]."""

    def codes(t: torch.Tensor, n: int, k: int, gs: int) -> torch.Tensor:
        return unpack_cols(_expect(_int32(t, "qweight"), (k, n // 8)), 4, AWQ_PACK_ORDER).t()

    def zeros(t: torch.Tensor, n: int, k: int, gs: int) -> torch.Tensor:
        return unpack_cols(_expect(_int32(t, "qzeros"), (k // gs, n // 8)), 4, AWQ_PACK_ORDER).float().t()

    def scales(t: torch.Tensor, n: int, k: int, gs: int) -> torch.Tensor:
        return _expect(t, (k // gs, n)).float().t()

    return ExpertFormat(
        "AWQ",
        4,
        group_size,
        {"qweight": ("codes", codes), "qzeros": ("zeros", zeros), "scales": ("scales", scales)},
    )


def _column_groups(t: torch.Tensor, n: int, k: int, gs: int) -> torch.Tensor:
    """An act-order g_idx [K]: each input column's group (its range is act_order.group_order's check,
    in fold_act_order)."""
    del n, gs
    return _expect(t, (k,)).long()


def compressed_tensors_format(
    bits: int, group_size: int, symmetric: bool, act_order: bool = False
) -> ExpertFormat:
    """pack-quantized: weight_packed [N, K / pf] along K; weight_scale [N, G]; weight_shape [2];
    asymmetric: weight_zero_point [N / pf, G] packed along N; actorder "group": weight_g_idx [K]."""
    pf = pack_factor(bits)

    def codes(t: torch.Tensor, n: int, k: int, gs: int) -> torch.Tensor:
        return unpack_cols(_expect(_int32(t, "weight_packed"), (n, k // pf)), bits)

    def scales(t: torch.Tensor, n: int, k: int, gs: int) -> torch.Tensor:
        return _expect(t, (n, k // gs)).float()

    def zeros(t: torch.Tensor, n: int, k: int, gs: int) -> torch.Tensor:
        return unpack_rows(_expect(_int32(t, "weight_zero_point"), (n // pf, k // gs)), bits).float()

    def shape(t: torch.Tensor, n: int, k: int, gs: int) -> torch.Tensor:
        if [int(v) for v in t.reshape(-1).tolist()] != [n, k]:
            raise ValueError(f"weight_shape is {t.tolist()}; the expert projection is [{n}, {k}]")
        return t

    tensors: dict[str, tuple[str, Convert]] = {
        "weight_packed": ("codes", codes),
        "weight_scale": ("scales", scales),
        "weight_shape": ("check", shape),
    }
    if not symmetric:
        tensors["weight_zero_point"] = ("zeros", zeros)
    if act_order:
        tensors["weight_g_idx"] = ("g_idx", _column_groups)
    return ExpertFormat(
        "compressed-tensors", bits, group_size, tensors, symmetric_zero=symmetric, act_order=act_order,
        act_order_name="actorder 'group'", without_act_order="re-quantize with actorder 'weight'",
    )  # fmt: skip


class WNA16FusedMoEMethod(FusedMoEMethodBase):
    def __init__(self, fmt: ExpertFormat) -> None:
        self.fmt = fmt

    def create_weights(self, layer: nn.Module, params_dtype: torch.dtype) -> None:
        del params_dtype
        fmt = self.fmt
        experts, hidden, size = layer.num_experts, layer.hidden_size, layer.intermediate_size
        shard = layer.intermediate_per_partition
        pf = pack_factor(fmt.bits)
        if fmt.act_order and layer.tp_size > 1:  # one order over the intermediate would cross the ranks
            raise ValueError(
                f"{fmt.name} MoE layer {layer.prefix}: {fmt.act_order_name} experts cannot be split over "
                f"tensor_parallel_size {layer.tp_size}; serve it with tensor_parallel_size 1 or "
                f"{fmt.without_act_order}"
            )
        # (part, rows, this rank's input K, the whole input K)
        for part, rows, k, k_full in (("w13", 2 * shard, hidden, hidden), ("w2", hidden, shard, size)):
            gs = fmt.group_size if fmt.group_size != -1 else k_full
            if k_full % gs or k % gs or k % pf:
                what = "input" if part == "w13" else "down projection's input per rank"
                raise ValueError(
                    f"{fmt.name} MoE layer {layer.prefix}: each expert's {what} ({k}) is not a multiple of "
                    f"group_size {fmt.group_size} and of {pf} (codes per int32)"
                )
            groups = k // gs  # per channel over a sharded input: the one group, on every rank
            for kind, (suffix, convert) in _by_kind(fmt).items():
                dummy = None
                if kind == "codes":
                    tensor = torch.empty(experts, rows, k // pf, dtype=torch.int32)
                elif kind == "check":
                    tensor = torch.zeros(1, dtype=torch.int32)  # validated as it loads, then dropped
                elif kind == "g_idx":  # each projection's [K] groups: w13 [E, 2 (gate, up), H], w2 [E, I]
                    shape = (experts, 2, k) if part == "w13" else (experts, k)
                    tensor = torch.empty(shape, dtype=torch.int32)
                    dummy = functools.partial(_groups_in_order, shape, gs)  # random weights: no act order
                else:
                    tensor = torch.empty(experts, rows, groups, dtype=torch.float32)
                loader = _converting_loader(layer, part, kind, convert, suffix, gs, fmt.bits)
                attr = f"{part}_{'check_' + suffix if kind == 'check' else kind}"
                layer.add_expert_param(attr, tensor, part, suffix, loader=loader, dummy_init=dummy)
            if fmt.symmetric_zero:
                layer.register_buffer(
                    f"{part}_zeros", torch.full((experts, rows, groups), float(1 << (fmt.bits - 1)))
                )

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        for attr in [n for n, _ in layer.named_parameters(recurse=False) if "_check_" in n]:
            delattr(layer, attr)
        if self.fmt.act_order:
            fold_act_order(layer, self.fmt)
        store_k_major(layer)

    def apply(
        self, layer: nn.Module, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor
    ) -> torch.Tensor:
        scales = IntExpertScales(
            self.fmt.bits, layer.w13_scales, layer.w13_zeros, layer.w2_scales, layer.w2_zeros,
            getattr(layer, "w13_perm", None),
        )  # fmt: skip
        return layer.kernels.fused_moe(x, layer.w13_codes, layer.w2_codes, topk_weights, topk_ids, scales)


def k_major(t: torch.Tensor) -> torch.Tensor:
    """The same [E, N, X] values stored [E, X, N] (contiguous along N), seen as [E, N, X]."""
    return t.transpose(1, 2).contiguous().transpose(1, 2)


def store_k_major(layer: nn.Module) -> None:
    """Codes, scales and zeros stored K-major (module docstring); their shapes and values are unchanged."""
    for attr in ("w13_codes", "w2_codes", "w13_scales", "w13_zeros", "w2_scales", "w2_zeros"):
        tensor = getattr(layer, attr)
        tensor.data = k_major(tensor.data)


def _groups_in_order(shape: tuple[int, ...], group_size: int) -> torch.Tensor:
    """A g_idx without act order: column k in group k // group_size, for every expert (and projection)."""
    return (torch.arange(shape[-1], dtype=torch.int32) // group_size).expand(shape).clone()


def fold_act_order(layer: nn.Module, fmt: ExpertFormat) -> None:
    """Each expert's columns sorted into group order (module docstring), in place; then `w13_perm`
    [E, H] int32 (the x column each of w13's columns reads) and `w2_perm` [E, I] int32 (the intermediate
    channel each stored one is), and the g_idx parameters are dropped."""
    bits = fmt.bits
    w13_g_idx, w2_g_idx = layer.w13_g_idx.data, layer.w2_g_idx.data  # [E, 2, H], [E, I]
    shard = layer.intermediate_per_partition  # the whole intermediate (act order runs on one rank)
    perms, intermediate = [], []
    for expert in range(layer.num_experts):
        where = f"{layer.checkpoint_prefix}.{expert}"
        gate_order, up_order = w13_g_idx[expert]
        if not torch.equal(gate_order, up_order):
            raise ValueError(
                f"{where}: the gate and up projections' g_idx differ; they share their input, so weir "
                f"needs one act order for both ({fmt.without_act_order})"
            )
        codes13 = unpack_cols(layer.w13_codes.data[expert], bits)  # [2I, H]
        codes13, perm13, uneven13 = group_order(
            codes13, gate_order, layer.w13_scales.shape[2], f"{where} gate/up"
        )
        codes2 = unpack_cols(layer.w2_codes.data[expert], bits)  # [H, I]
        codes2, perm2, uneven2 = group_order(
            codes2, w2_g_idx[expert], layer.w2_scales.shape[2], f"{where} down"
        )
        if uneven13 is not None or uneven2 is not None:
            raise ValueError(
                f"{where}: act order with groups of unequal size (not as GPTQ writes them) is not supported "
                "for MoE experts"
            )
        if perm2 is not None:  # the intermediate in down's group order: gate's and up's rows permuted alike
            rows = torch.cat([perm2, perm2 + shard])  # [2I]
            codes13 = codes13[rows]
            for attr in ("w13_scales", "w13_zeros"):
                getattr(layer, attr).data[expert] = getattr(layer, attr).data[expert][rows]
        layer.w13_codes.data[expert] = pack_cols(codes13, bits)
        layer.w2_codes.data[expert] = pack_cols(codes2, bits)
        device = codes13.device  # (an order already in groups gives no permutation: the identity)
        perms.append(perm13 if perm13 is not None else torch.arange(codes13.shape[1], device=device))
        intermediate.append(perm2 if perm2 is not None else torch.arange(shard, device=device))
    del layer.w13_g_idx, layer.w2_g_idx
    layer.register_buffer("w13_perm", torch.stack(perms).to(torch.int32))  # [E, H]
    # [E, I]: which intermediate channel each stored one is (nothing reads it at run time; for checks)
    layer.register_buffer("w2_perm", torch.stack(intermediate).to(torch.int32))


def _by_kind(fmt: ExpertFormat) -> dict[str, tuple[str, Convert]]:
    return {kind: (suffix, convert) for suffix, (kind, convert) in fmt.tensors.items()}


def _converting_loader(
    layer: nn.Module, part: str, kind: str, convert: Convert, suffix: str, gs: int, bits: int
) -> Callable[..., None]:
    """One expert projection's tensor: converted whole ([N, K] codes or [N, G] zeros / scales), then this
    rank's gate/up rows or down columns copied into the stacked parameter (codes packed along K)."""

    def load(param: torch.Tensor, loaded_weight: Any, shard_id: Any = None) -> None:
        expert, projection = shard_id
        size, hidden, shard = layer.intermediate_size, layer.hidden_size, layer.intermediate_per_partition
        n, k = (hidden, size) if projection == "down" else (size, hidden)
        names = dict(zip(("gate", "up", "down"), layer.expert_names, strict=True))
        name = f"{layer.checkpoint_prefix}.{expert}.{names[projection]}.{suffix}"
        try:
            full = convert(materialize(loaded_weight), n, k, gs)
        except WeightShapeError:
            raise
        except ValueError as e:
            raise ValueError(f"{name}: {e}") from None
        if kind == "check":
            return
        if kind == "g_idx":  # act order runs unsharded (create_weights): the whole [K] order
            target = (
                param.data[expert] if projection == "down" else param.data[expert, int(projection == "up")]
            )
            target.copy_(full)
            return
        if projection == "down":  # this rank's input columns (codes), or their groups
            if kind == "codes":
                piece = pack_cols(full.narrow(1, layer.tp_rank * shard, shard), bits)
            else:
                groups = param.shape[2]
                piece = full if full.shape[1] == 1 else full.narrow(1, layer.tp_rank * groups, groups)
            param.data[expert].copy_(piece)
            return
        piece = full.narrow(0, layer.tp_rank * shard, shard)  # this rank's gate or up rows
        if kind == "codes":
            piece = pack_cols(piece, bits)
        param.data[expert].narrow(0, 0 if projection == "gate" else shard, shard).copy_(piece)

    return load
