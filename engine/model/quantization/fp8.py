"""FP8 weights: `quant_method: "fp8"` checkpoints and online `quantization="fp8"`.

Checkpoint tensors per linear layer (as vLLM's Fp8Config and transformers' FineGrainedFP8 read them):
- `weight` float8_e4m3fn [out, in];
- per tensor or per channel: `weight_scale` float32, a scalar per checkpoint module ([] or [1]) or
  one per output row ([out] or [out, 1]); w = weight * scale;
- block-wise (`weight_block_size` [bn, bk]): `weight_scale_inv` float32 [ceil(out / bn), ceil(in / bk)];
  w[o, i] = weight[o, i] * scale_inv[o // bn, i // bk] (DeepSeek-V3's convention: despite the name,
  the stored value multiplies).
Online: the checkpoint's linear weights (any float dtype) are quantized at load, per output channel:
scale = amax(|w[o]|) / 448, weight = round-to-fp8(w / scale).

Per-tensor scales are expanded to one per output row at load, so a fused layer (q, k, v each with
its own scalar) needs no requantization. `apply` dequantizes (w * scale in float32) and calls
F.linear, which is the reference and the path on CPU and on GPUs without FP8 tensor cores; on CUDA
devices of compute capability 8.9+ (Ada, Hopper, Blackwell) with bfloat16 activations and
per-channel scales, it runs torch._scaled_mm on FP8 activations quantized per token on the fly
(dynamic activation scales; W8A8) from 3 tokens up (17 on Hopper), a Triton W8A16 GEMV (ops/triton/fp8_gemv.py:
the weight converted in registers, x unquantized as in the reference) for decode batches of 1-2
tokens, and on Hopper the tensor-core skinny GEMM, W8A16 too (ops/triton/skinny_gemm.py), at 3-16
tokens: where quantizing x and a GEMM tiled for large M cost more than the bytes saved (1.48x bf16's
batch-1 latency on an H200 before the GEMV; at 8 tokens _scaled_mm took longer than bf16's cuBLAS on an H100). Block-wise weights always take the dequantizing path for now.
Static activation scales (`activation_scheme: "static"`, a scalar `input_scale` per module) quantize
each layer's input per tensor instead: on the FP8 GEMM, and on the dequantizing path as a
quantize-dequantize of x, so CPU computes what the GPU does.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from engine.model.parameter import WeightLoader, WeightShapeError, register_weight
from engine.model.quantization.base import FusedMoEMethodBase, LinearMethodBase, QuantizationConfig
from engine.model.quantization.common import experts_skipped, is_ignored, is_skipped
from engine.model.quantization.float_gemv import hopper_with_triton, skinny_gemm_linear
from engine.model.quantization.unquantized import UnquantizedFusedMoEMethod, UnquantizedLinearMethod
from ops import reference
from ops.env_flags import env_flag

if TYPE_CHECKING:
    from engine.model.layers.linear import LinearBase

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0  # torch.finfo(torch.float8_e4m3fn).max


@dataclass(frozen=True, slots=True)
class Fp8Config(QuantizationConfig):
    from_checkpoint: bool  # False: online, quantize the checkpoint's float weights at load
    weight_block_size: tuple[int, int] | None = None  # (bn, bk): block-wise weight_scale_inv
    skip_modules: tuple[str, ...] = ()  # ignored_layers / modules_to_not_convert
    # the block scales' tensor name: weight_scale_inv (DeepSeek-V3, transformers' FineGrainedFP8) or
    # weight_scale (compressed-tensors' block strategy); same meaning, w = weight * scale
    block_scale_name: str = "weight_scale_inv"
    # skip_modules is compressed-tensors' `ignore` (names and re: patterns), not a substring list
    ignore_is_ct: bool = False
    # activation_scheme "static": each layer's `input_scale` quantizes its input per tensor (the max
    # over a fused layer's checkpoint modules, as they share the input); else dynamic per token
    static_activations: bool = False
    name: str = "fp8"

    def get_linear_method(self, layer: LinearBase, prefix: str) -> LinearMethodBase:
        skipped = is_ignored if self.ignore_is_ct else is_skipped
        if skipped(prefix, self.skip_modules):
            return UnquantizedLinearMethod()
        return Fp8LinearMethod(self)

    def moe_refusal(self) -> str | None:
        return None  # engine.model.quantization.fp8_moe

    def get_moe_method(self, layer: nn.Module, prefix: str) -> FusedMoEMethodBase:
        from engine.model.quantization.fp8_moe import Fp8FusedMoEMethod  # noqa: PLC0415 (it imports this)

        skipped = is_ignored if self.ignore_is_ct else is_skipped
        if experts_skipped(layer.checkpoint_module_names(), prefix, lambda n: skipped(n, self.skip_modules)):
            return UnquantizedFusedMoEMethod()
        return Fp8FusedMoEMethod(self)


def fp8_matmul_supported(device: torch.device) -> bool:
    """FP8 tensor cores: CUDA compute capability 8.9 (Ada) and above; never on CPU."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


def quantize_per_channel(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[out, in] float -> ([out, in] float8_e4m3fn, [out] float32 scales): online FP8."""
    w = w.float()
    scale = w.abs().amax(dim=1).clamp(min=1e-12) / FP8_MAX  # [out]
    return (w / scale[:, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE), scale


def _shard_rows(layer: nn.Module, shard_id: Any) -> tuple[int, int]:
    """(first row, rows) of a fused layer's sub-matrix `shard_id` (q/k/v or 0/1), this rank."""
    sizes = layer.output_partition_sizes
    index = "qkv".index(shard_id) if isinstance(shard_id, str) else shard_id
    return sum(sizes[:index]), sizes[index]


class Fp8LinearMethod(LinearMethodBase):
    def __init__(self, config: Fp8Config) -> None:
        self.config = config

    def create_weights(
        self,
        layer: nn.Module,
        input_size_per_partition: int,
        output_partition_sizes: list[int],
        input_size: int,
        output_size: int,
        params_dtype: torch.dtype,
        weight_loader: WeightLoader,
    ) -> None:
        del output_size
        prefix = getattr(layer, "prefix", "")
        out = sum(output_partition_sizes)
        cfg = self.config

        weight_attrs = {"input_dim": 1, "output_dim": 0}
        if not cfg.from_checkpoint:  # online: the checkpoint's float weight, quantized after loading
            register_weight(
                layer,
                "weight",
                torch.empty(out, input_size_per_partition, dtype=params_dtype),
                {**weight_attrs, "weight_loader": weight_loader},
            )
            return
        register_weight(
            layer,
            "weight",
            torch.empty(out, input_size_per_partition, dtype=FP8_DTYPE),
            {**weight_attrs, "weight_loader": _fp8_only(weight_loader, f"{prefix}.weight")},
        )
        if cfg.static_activations:  # [1]: one scale for the layer's input, whole on every rank
            register_weight(
                layer,
                "input_scale",
                torch.zeros(1),
                {
                    "weight_loader": _max_scale_loader(f"{prefix}.input_scale"),
                    "dummy_init": lambda: torch.full((1,), 0.05),  # random weights: a valid scale
                },
            )
        if cfg.weight_block_size is not None:
            bn, bk = cfg.weight_block_size
            if any(size % bn for size in output_partition_sizes):
                raise ValueError(
                    f"FP8 layer {prefix}: output sizes {output_partition_sizes} are not multiples of "
                    f"weight_block_size[0] {bn}"
                )
            # [out / bn, ceil(in / bk)]: a column-parallel rank's block rows; a row-parallel rank's
            # block columns (its input slice must be whole blocks)
            scale_loader = weight_loader
            if input_size_per_partition != input_size:
                if input_size_per_partition % bk:
                    raise ValueError(
                        f"FP8 layer {prefix}: its input slice per rank ({input_size_per_partition}) is not a "
                        f"multiple of weight_block_size[1] {bk}; choose a tensor_parallel_size that keeps "
                        "whole blocks"
                    )
                scale_loader = _block_columns_loader(layer, input_size_per_partition // bk)
            register_weight(
                layer,
                cfg.block_scale_name,
                torch.empty(out // bn, -(-input_size_per_partition // bk), dtype=torch.float32),
                {"output_dim": 0, "packed_dim": 0, "pack_factor": bn, "weight_loader": scale_loader},
            )
            return
        # [out]: a per-tensor scale fills its sub-matrix's rows, a per-channel one is copied as is
        register_weight(
            layer,
            "weight_scale",
            torch.empty(out, dtype=torch.float32),
            {"output_dim": 0, "weight_loader": self._scale_loader(layer, weight_loader)},
        )

    @staticmethod
    def _scale_loader(layer: nn.Module, weight_loader: WeightLoader) -> WeightLoader:
        def load(param: torch.Tensor, loaded_weight: torch.Tensor, shard_id: Any = None) -> None:
            if loaded_weight.numel() != 1:  # per channel: [rows] or [rows, 1]
                weight_loader(param, loaded_weight.reshape(-1).float(), shard_id)
                return
            first, rows = (0, param.shape[0]) if shard_id is None else _shard_rows(layer, shard_id)
            param.data[first : first + rows] = loaded_weight.float().reshape(())

        return load

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        cfg = self.config
        if not cfg.from_checkpoint:
            weight, scale = quantize_per_channel(layer.weight.data)
            del layer.weight
            layer.register_parameter("weight", nn.Parameter(weight, requires_grad=False))
            layer.register_buffer("weight_scale", scale)
        elif cfg.weight_block_size is None:
            scale = layer.weight_scale.data
            del layer.weight_scale
            layer.register_buffer("weight_scale", scale)  # [out] float32
        else:
            bn, bk = cfg.weight_block_size
            out_features, in_features = layer.weight.shape
            blocks = getattr(layer, cfg.block_scale_name).data
            delattr(layer, cfg.block_scale_name)
            # [out, in] float32: the block scales expanded once, so apply is one multiply
            expanded = blocks.repeat_interleave(bn, 0)[:out_features].repeat_interleave(bk, 1)[
                :, :in_features
            ]
            layer.register_buffer("weight_scale", expanded.contiguous())
        input_scale = None
        if cfg.static_activations:
            input_scale = layer.input_scale.data.reshape(1)  # [1] float32
            if not (torch.isfinite(input_scale).all() and (input_scale > 0).all()):
                raise ValueError(
                    f"FP8 layer {layer.prefix}: input_scale must be positive; got {input_scale.item()}"
                )
            del layer.input_scale
        layer.register_buffer("input_scale", input_scale)  # None: dynamic per-token activation scales
        layer.fp8_scaled_mm = (
            fp8_matmul_supported(layer.weight.device)
            and layer.weight_scale.dim() == 1
            and all(n % 16 == 0 for n in layer.weight.shape)
        )
        layer.fp8_gemv = layer.fp8_scaled_mm and _triton_fp8_gemv_available()
        # 3-16 tokens with dynamic scales: the tensor-core skinny GEMM's launch (W8A16), or None (_scaled_mm)
        layer.fp8_skinny = (
            plan_fp8_skinny(layer.weight.shape[1], layer.weight.shape[0], layer.weight.device)
            if layer.fp8_gemv and input_scale is None and hopper_with_triton(layer.weight.device)
            else None
        )
        # Dynamic activation scales for _scaled_mm by the one-kernel quantizer (decided here, once).
        layer.fp8_quant_kernel = layer.fp8_gemv and input_scale is None and _fp8_quant_kernel_enabled()
        # cuBLASLt's FP8 accumulation without periodic promotion (WEIR_FP8_FAST_ACCUM, on by default: ops/env_flags.py)
        layer.fp8_fast_accum = layer.fp8_scaled_mm and env_flag("WEIR_FP8_FAST_ACCUM")

    def apply_silu_mul(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
        if not (isinstance(x, torch.Tensor) and _takes_gemv(layer, x)):
            return None
        l2_next = getattr(layer, "l2_prefetch", None)
        return fp8_gemv_linear(x, layer.weight, layer.weight_scale, None, layer.input_scale, True, l2_next)

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if not isinstance(x, torch.Tensor):  # quantized by the kernel that made it (fp8_activation)
            return _scaled_mm(
                x.q, x.scale, layer.weight, layer.weight_scale, bias, x.dtype, layer.fp8_fast_accum
            )
        if _takes_gemv(layer, x):
            l2_next = getattr(layer, "l2_prefetch", None)
            return fp8_gemv_linear(
                x, layer.weight, layer.weight_scale, bias, layer.input_scale, False, l2_next
            )
        # any float x (float32 multiplies exactly, for checks)
        if takes_fp8_skinny(layer, x.numel() // x.shape[-1]):
            return skinny_gemm_linear(x, layer.weight, bias, layer.fp8_skinny, layer.weight_scale)
        if layer.fp8_scaled_mm and x.dtype == torch.bfloat16:
            return _scaled_mm_linear(
                x, layer.weight, layer.weight_scale, bias, layer.input_scale, layer.fp8_quant_kernel,
                layer.fp8_fast_accum,
            )  # fmt: skip
        if layer.input_scale is not None:  # x as the FP8 GEMM sees it: quantized with the static scale
            s = layer.input_scale
            x = ((x.float() / s).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE).float() * s).to(x.dtype)
        scale = layer.weight_scale
        scale = scale[:, None] if scale.dim() == 1 else scale  # [out, 1] or [out, in]
        w = (layer.weight.float() * scale).to(x.dtype)  # [out, in]
        return F.linear(x, w, bias)


def _fp8_quant_kernel_enabled() -> bool:
    """Per-token activation quantization in one Triton kernel (ops/triton/fp8_quant.py) on CUDA;
    WEIR_FP8_QUANT_KERNEL=0 keeps the five torch launches (for comparison in a benchmark)."""
    return env_flag("WEIR_FP8_QUANT_KERNEL")


def _per_token_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    from ops.triton.fp8_quant import per_token_fp8  # noqa: PLC0415 (triton: only on CUDA)

    return per_token_fp8(x)


GEMV_MAX_TOKENS = 2  # from 4 tokens _scaled_mm is as fast or faster (sweep on an H200)


def _triton_fp8_gemv_available() -> bool:
    try:
        import ops.triton.fp8_gemv  # noqa: F401, PLC0415 (importing triton needs a GPU or the interpreter)
    except ImportError:
        return False
    return True


def _takes_gemv(layer: nn.Module, x: torch.Tensor) -> bool:
    """Whether x ([..., in], 16-bit) goes through the FP8 GEMV: at most GEMV_MAX_TOKENS rows, on a layer
    that runs it."""
    return layer.fp8_gemv and x.numel() <= GEMV_MAX_TOKENS * x.shape[-1]


def fp8_gemv_launch(
    in_features: int, out_features: int, num_sms: int, num_tokens: int = 1
) -> dict[str, int | bool]:
    """The GEMV's launch, from the sweep on an H200 (loadtest/sweep_gemv.py, loadtest/results/
    gemv-half2-gated-h200-2026-12-04/sweep-835ef63): 4-row weight tiles, no K split, and x's layout
    kept (block_k = 8 x 32 x num_warps, ops/triton/fp8_gemv.py): 512 columns on 2 warps where it widens
    (qkv, gate_up: 9.23 / 32.35 us) and 1,024 on 4 where it does not (o, down: 6.94 / 16.87 us; the
    256-column launch before: 10.70, 8.89, 32.41, 22.05); at 2 tokens 512 on 2 (8.84-47.92 us)."""
    del num_sms  # measured on 132 SMs; with no split the tiles alone fill the card
    # x's next tile requested ahead gained no layer here (folded-gemv-h200-2026-12-04/7-xahead-ab-6c25784)
    # WEIR_FP8_GEMV_PIPELINE (off: +1.3% on Q2's step, H100 at 55cf415): the one-token tile loads pipelined by Triton, 3 stages
    # no prefetch: the next tile in flight (the first before PDL's wait) made the FP8 step 11% slower (H100 at ba6732c),
    # and the first tile alone before the wait 6% slower (H100 at e507e83)
    staged = {"loop_stages": 3} if num_tokens == 1 and env_flag("WEIR_FP8_GEMV_PIPELINE") else {}
    if num_tokens == 1 and out_features <= in_features:
        return {"block_n": 4, "block_k": 1024, "split_k": 1, "num_warps": 4, **staged}
    return {"block_n": 4, "block_k": 512, "split_k": 1, "num_warps": 2, **staged}


@functools.cache
def _gemv_launch(in_features: int, out_features: int, device: int, num_tokens: int) -> dict[str, int | bool]:
    """fp8_gemv_launch once per shape (its switches read from the environment then, not every call); not
    mutated by its callers."""
    return fp8_gemv_launch(in_features, out_features, _num_sms(device), num_tokens)


_SMS: dict[int, int] = {}


def _num_sms(device: int) -> int:
    if device not in _SMS:
        _SMS[device] = torch.cuda.get_device_properties(device).multi_processor_count if device >= 0 else 132
    return _SMS[device]


# 3-16 tokens (L1's batch 8, a decode step's small batches): the tensor-core skinny GEMM on the FP8 weight
# (ops/triton/skinny_gemm.py: tiles converted to x's dtype in registers, W8A16 as the GEMV) instead of
# quantizing x and _scaled_mm. Sweep on an H100 at 4217c85 (loadtest/results/fp8-skinny-h100-2026-12-06-4217c85/,
# `sweep_gemv.py --kinds fp8,skinny`), us at 8 tokens, skinny vs _scaled_mm (W8A8, the x quantization not
# counted) vs bf16 cuBLAS: qkv 17.02 / 39.61 / 20.11, o 12.26 / 35.36 / 15.35, gate_up 50.61 / 69.38 / 78.70,
# down 30.37 / 60.14 / 42.62, much the same at 2 tokens. At 1-2 tokens the FP8 GEMV is faster still (qkv 11.19
# vs 14.74 at one token), so it keeps them. WEIR_FP8_SKINNY_GEMM=0 keeps _scaled_mm.
FP8_SKINNY_MIN_TOKENS, FP8_SKINNY_MAX_TOKENS = GEMV_MAX_TOKENS + 1, 16
# (in_features, out_features) -> the sweep's best launch at 8 tokens (Llama-3-8B's projections)
_FP8_SKINNY_LAUNCHES: dict[tuple[int, int], dict[str, int]] = {
    (4096, 6144): {"block_n": 128, "block_k": 128, "split_k": 4, "num_warps": 4, "num_stages": 3},  # qkv
    (4096, 4096): {"block_n": 64, "block_k": 256, "split_k": 4, "num_warps": 4, "num_stages": 3},  # o_proj
    (4096, 28672): {"block_n": 64, "block_k": 128, "split_k": 1, "num_warps": 4, "num_stages": 3},  # gate_up
    (14336, 4096): {"block_n": 64, "block_k": 256, "split_k": 4, "num_warps": 4, "num_stages": 3},  # down
}


def plan_fp8_skinny(in_features: int, out_features: int, device: torch.device) -> dict[str, int] | None:
    """The skinny GEMM's launch for an FP8 layer of this shape at 3-16 tokens (None: WEIR_FP8_SKINNY_GEMM=0).
    Shapes not in the sweep's table take 64-row tiles of 128 columns, K split in 4 where the tiles alone
    number under two per SM (the rule the four swept shapes' winners follow: split where N / 64 < 264)."""
    if not env_flag("WEIR_FP8_SKINNY_GEMM"):
        return None
    launch = _FP8_SKINNY_LAUNCHES.get((in_features, out_features))
    if launch is not None:
        return dict(launch)
    sms = _num_sms(device.index if device.index is not None else torch.cuda.current_device())
    split_k = 4 if -(-out_features // 64) < 2 * sms else 1
    return {"block_n": 64, "block_k": 128, "split_k": split_k, "num_warps": 4, "num_stages": 3}


def takes_fp8_skinny(layer: nn.Module, num_tokens: int) -> bool:
    """Whether an input of `num_tokens` rows goes through the FP8 skinny GEMM (x as it is, unquantized)."""
    return (
        getattr(layer, "fp8_skinny", None) is not None
        and FP8_SKINNY_MIN_TOKENS <= num_tokens <= FP8_SKINNY_MAX_TOKENS
    )


def fp8_gemv_linear(
    x: torch.Tensor,  # [..., in] with at most GEMV_MAX_TOKENS rows
    weight: torch.Tensor,  # [out, in] float8_e4m3fn
    weight_scale: torch.Tensor,  # [out] float32
    bias: torch.Tensor | None,
    input_scale: torch.Tensor | None = None,  # [1] float32: static; None: x as is (W8A16)
    gated: bool = False,  # weight is [gate; up]: silu(gate) * up, [..., out / 2] (no bias)
    l2_next: torch.Tensor | None = None,  # the next projection's weight bytes (l2_prefetch_chain)
) -> torch.Tensor:  # [..., out]
    from ops.triton.fp8_gemv import fp8_gemv  # noqa: PLC0415

    x2 = x.reshape(-1, x.shape[-1]).contiguous()  # [M, in]
    launch = _gemv_launch(x2.shape[1], weight.shape[0], x.get_device(), x2.shape[0])
    out = fp8_gemv(x2, weight, weight_scale, input_scale, **launch, gated=gated, l2_next=l2_next)
    if bias is not None:
        out = out + bias
    return out.view(*x.shape[:-1], out.shape[-1])


def _scaled_mm_linear(
    x: torch.Tensor,  # [..., in] bfloat16
    weight: torch.Tensor,  # [out, in] float8_e4m3fn
    weight_scale: torch.Tensor,  # [out] float32
    bias: torch.Tensor | None,
    input_scale: torch.Tensor | None = None,  # [1] float32: static; None: per token
    quant_kernel: bool = False,  # per-token scales by ops/triton/fp8_quant.py (CUDA; input_scale None)
    fast_accum: bool = False,  # _scaled_mm's
) -> torch.Tensor:  # [..., out] bfloat16
    """W8A8 on FP8 tensor cores: activations quantized per token (dynamic scales, no host sync, so
    CUDA graphs capture it) or with the checkpoint's static scale, one cuBLASLt GEMM with row-wise
    scales on both sides (a static scale repeated per row: cuBLASLt takes both sides row-wise)."""
    x2 = x.reshape(-1, x.shape[-1])  # [M, in]
    if quant_kernel:
        xq, x_scale = _per_token_fp8(x2)  # one launch, the same bits as the torch lines below
    else:
        if input_scale is None:
            xq, x_scale = reference.per_token_fp8(x2)  # [M, in], [M, 1]: the kernel's spec
        else:
            x_scale = input_scale.expand(x2.shape[0], 1).contiguous()  # [M, 1]
            # times the reciprocal: the kernel's arithmetic (one division a row, not one an element)
            xq = (x2.float() * x_scale.reciprocal()).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    out = _scaled_mm(xq, x_scale, weight, weight_scale, bias, torch.bfloat16, fast_accum)  # [M, out]
    return out.view(*x.shape[:-1], weight.shape[0])


def _scaled_mm(
    xq: torch.Tensor,  # [M, in] float8_e4m3fn
    x_scale: torch.Tensor,  # [M, 1] float32
    weight: torch.Tensor,  # [out, in] float8_e4m3fn
    weight_scale: torch.Tensor,  # [out] float32
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
    fast_accum: bool = False,
) -> torch.Tensor:  # [M, out]
    """The W8A8 GEMM on quantized activations: cuBLASLt with row-wise scales on both sides. `fast_accum`:
    Hopper's FP8 tensor-core sums kept in their reduced-precision accumulator over the whole K instead of
    promoted to float32 every few steps (faster; what vLLM's CUTLASS FP8 kernels do on sm_90; less exact
    over long K: loadtest/probe_fp8_gemm.py reports both)."""
    out = torch._scaled_mm(
        xq, weight.t(), scale_a=x_scale, scale_b=weight_scale.view(1, -1), out_dtype=out_dtype,
        use_fast_accum=fast_accum,
    )  # fmt: skip
    return out if bias is None else out + bias


def _block_columns_loader(layer: nn.Module, columns: int) -> WeightLoader:
    """A row-parallel rank's block columns of weight_scale_inv ([out / bn, in / bk])."""

    def load(param: torch.Tensor, loaded_weight: torch.Tensor, shard_id: Any = None) -> None:
        del shard_id
        expected = (param.shape[0], columns * layer.tp_size)
        if tuple(loaded_weight.shape) != expected:
            raise WeightShapeError(expected, tuple(loaded_weight.shape))
        param.data.copy_(loaded_weight.narrow(1, layer.tp_rank * columns, columns))

    return load


def _fp8_only(weight_loader: WeightLoader, name: str) -> WeightLoader:
    def load(param: torch.Tensor, loaded_weight: torch.Tensor, shard_id: Any = None) -> None:
        if loaded_weight.dtype != FP8_DTYPE:
            raise ValueError(
                f"{name}: an fp8 checkpoint's weight must be float8_e4m3fn; got {loaded_weight.dtype}"
            )
        weight_loader(param, loaded_weight, shard_id)

    return load


def _max_scale_loader(name: str) -> WeightLoader:
    """A fused layer's input scale: the largest of its checkpoint modules' (q/k/v, gate/up), which all
    see the same input, so none of them saturates."""

    def load(param: torch.Tensor, loaded_weight: torch.Tensor, shard_id: Any = None) -> None:
        del shard_id
        if loaded_weight.numel() != 1:
            raise ValueError(
                f"{name}: a static input scale is one number; got shape {tuple(loaded_weight.shape)}"
            )
        param.data.copy_(torch.maximum(param.data, loaded_weight.float().reshape(1)))

    return load
