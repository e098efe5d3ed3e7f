"""Which head sizes the Triton kernels take (plain Python: the engine asks before importing triton).

Powers of two >= 16 tile a head exactly; the other multiples of 8 from 16 to 256 (Phi-3's 96; 80, 112,
160, 192 elsewhere) run with the head padded to the next power of two (ops/triton/head_dim.py).
"""

from __future__ import annotations

SUPPORTED_HEAD_DIMS = "a multiple of 8 from 16 to 256, or a power of two >= 16"


def supports_head_dim(head_dim: int) -> bool:
    """Whether every Triton kernel on a model's path (paged attention, the KV writes, rotary) takes it
    (paged attention's dots need 16 lanes, so no smaller head)."""
    power_of_two = head_dim & (head_dim - 1) == 0
    return head_dim >= 16 and (power_of_two or (head_dim % 8 == 0 and head_dim <= 256))


def check_head_dim(op: str, head_dim: int) -> None:
    """Refuse a head size the kernels cannot tile, naming it and the sizes they take."""
    if not supports_head_dim(head_dim):
        raise ValueError(
            f"{op}: head_dim={head_dim} is not supported; the Triton kernels take {SUPPORTED_HEAD_DIMS}"
        )
