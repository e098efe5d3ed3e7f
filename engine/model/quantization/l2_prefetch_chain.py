"""Which weights each decode GEMV asks L2 for: the next projection's (WEIR_L2_PREFETCH=1, ops/triton/l2_prefetch.py).

A decoder layer's projections run in a fixed order, qkv_proj, o_proj, gate_up_proj, down_proj, then the
next layer's qkv_proj. At load the runner walks them in that order (the modules' registration order) and
gives each projection but the last `l2_prefetch`: a flat uint8 view of the next projection's packed or
plain weight, its first `max_bytes` (the first rows, which the next GEMV's first programs read; of a
[gate; up] weight stored [out, in], half of it from each half's start, the rows the gated GEMV's first
programs read side by side). The decode GEMVs use it (the folded W4A16 GEMV, the bf16 and FP8
GEMVs of ops/triton/fp8_gemv.py); a projection that runs cuBLAS or another kernel ignores it. The view
shares the weight's storage: nothing is copied, and a weight replaced later (LoRA, reloads) is not
followed, which only costs the prefetch.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from ops.env_flags import env_flag

PROJECTIONS = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")


def _weight_bytes(module: nn.Module, max_bytes: int, halves: bool = False) -> torch.Tensor | None:
    """The start of the module's main weight (qweight, else weight) as uint8, or None: [<= max_bytes], or
    with `halves` (a [gate; up] weight stored [out, in], whose halves are row blocks a gated GEMV reads side
    by side) [2, <= max_bytes / 2], the start of each half."""
    weight = getattr(module, "qweight", None)
    packed = weight is not None
    if weight is None:
        weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor) or not weight.is_contiguous() or weight.data_ptr() % 16:
        return None
    flat = weight.detach().reshape(-1).view(torch.uint8)  # the same storage, byte by byte
    half = flat.numel() // 2
    if halves and not packed and weight.dim() == 2 and weight.shape[0] % 2 == 0 and half % 16 == 0:
        return flat.view(2, half)[:, : max_bytes // 32 * 16]
    return flat[: max_bytes // 16 * 16]


def link_l2_prefetch(model: nn.Module, max_bytes: int) -> int:
    """Set `l2_prefetch` on each projection followed by another. -> how many."""
    named = [(name.rsplit(".", 1)[-1], m) for name, m in model.named_modules()]
    chain = [(short, m) for short, m in named if short in PROJECTIONS]
    linked = 0
    for (_, current), (short, following) in zip(chain, chain[1:], strict=False):
        view = _weight_bytes(following, max_bytes, halves=short == "gate_up_proj")
        if view is not None and view.numel():
            current.l2_prefetch = view
            linked += 1
    return linked


def l2_prefetch_enabled(device: torch.device) -> bool:
    """WEIR_L2_PREFETCH=1 on a CUDA device of compute capability 9.0+ (the bulk prefetch's PTX), not
    under the Triton interpreter. A value other than 0 or 1 is refused on any device."""
    if not env_flag("WEIR_L2_PREFETCH") or device.type != "cuda" or os.environ.get("TRITON_INTERPRET") == "1":
        return False
    return torch.cuda.get_device_capability(device) >= (9, 0)


def l2_prefetch_bytes() -> int:
    """WEIR_L2_PREFETCH_MB (16): the most of one weight a GEMV asks L2 for, well under an H100 / H200's
    50 MB L2, which the GEMV itself streams through."""
    value = os.environ.get("WEIR_L2_PREFETCH_MB", "16")
    try:
        mb = float(value)
    except ValueError:
        mb = -1.0
    if not 0 < mb <= 64:
        raise ValueError(f"WEIR_L2_PREFETCH_MB must be a number in (0, 64]; got {value!r}")
    return int(mb * (1 << 20)) // 16 * 16
