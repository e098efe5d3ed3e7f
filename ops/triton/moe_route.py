"""A mixture-of-experts router's softmax and top-k in one launch: the Triton twin of ops.reference.moe_route.

The torch route (the spec, and the CPU path) is softmax, topk, a sum and a division, a cast and back:
five or six small kernels a layer, each a few microseconds at a decode step even inside a CUDA graph,
the same order as the grouped GEMMs of a one-token batch (Qwen3-30B-A3B: 48 MoE layers a step). Here
each program takes TOKENS tokens' [TOKENS, E_P] logits (E_P: the experts rounded up to a power of two,
the padding experts reading -inf) and in registers:

1. softmax in float32 (max, exp, sum, divide: torch's formula; the sum's order differs, so a weight may
   differ from torch's in its last bit);
2. top_k by TOP_K rounds of "largest value, lowest index among equal ones", each taken expert then
   masked out. With logits in bfloat16 equal probabilities are common (~6% of tokens tie at the k-th
   place over 128 experts at random logits); the lowest-index rule picks the same set as torch.topk on
   CUDA (a radix select that takes the tied values in index order), while torch on CPU may take others;
3. the weights renormalized over the k (`RENORMALIZE`), or, with `SOFTMAX_AFTER_TOPK` (GraniteMoe), the
   k largest logits softmaxed among themselves, and rounded through the model dtype (`ROUND_TO`) where
   the model multiplies in it.

Outputs as the spec's: weights [num_tokens, top_k] float32, ids [num_tokens, top_k] int64, in descending
weight order. Fixed grid for a fixed token count: CUDA graphs capture it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

MAX_EXPERTS = 1024  # a [TOKENS, E_P] tile a program: beyond this the torch route (engine/model/layers/moe_router.py, route_kernel_applies)


@triton.jit
def _moe_route_kernel(
    logits_ptr,  # [num_tokens, num_experts]
    weights_ptr,  # [num_tokens, TOP_K] float32
    ids_ptr,  # [num_tokens, TOP_K] int64
    num_tokens,
    num_experts,
    stride_logits,
    TOP_K: tl.constexpr,
    K_P: tl.constexpr,  # TOP_K rounded up to a power of two
    E_P: tl.constexpr,
    TOKENS: tl.constexpr,
    RENORMALIZE: tl.constexpr,
    SOFTMAX_AFTER_TOPK: tl.constexpr,
    ROUND_TO: tl.constexpr,  # 0: keep float32; 1: through bfloat16; 2: through float16
):
    tokens = tl.program_id(0) * TOKENS + tl.arange(0, TOKENS)  # [TOKENS]
    experts = tl.arange(0, E_P)  # [E_P]
    token_ok = tokens < num_tokens
    mask = token_ok[:, None] & (experts[None, :] < num_experts)
    logits = tl.load(
        logits_ptr + tokens[:, None] * stride_logits + experts[None, :], mask=mask, other=float("-inf")
    ).to(tl.float32)  # [TOKENS, E_P]
    logits = tl.where(token_ok[:, None], logits, 0.0)  # rows past the batch: no -inf - -inf (stores masked)
    if SOFTMAX_AFTER_TOPK:
        scores = logits  # ranked by logit; the softmax runs over the k taken
    else:
        row_max = tl.max(logits, axis=1)  # [TOKENS]
        exps = tl.exp(logits - row_max[:, None])  # padding: exp(-inf) = 0
        scores = exps / tl.sum(exps, axis=1)[:, None]  # [TOKENS, E_P] the probabilities

    ks = tl.arange(0, K_P)  # [K_P]
    taken = tl.zeros((TOKENS, K_P), dtype=tl.float32)
    taken_ids = tl.zeros((TOKENS, K_P), dtype=tl.int32)
    remaining = tl.where(experts[None, :] < num_experts, scores, float("-inf"))
    for k in tl.static_range(TOP_K):
        best = tl.max(remaining, axis=1)  # [TOKENS]
        index = tl.min(tl.where(remaining == best[:, None], experts[None, :], E_P), axis=1)  # lowest tied
        taken = tl.where(ks[None, :] == k, best[:, None], taken)
        taken_ids = tl.where(ks[None, :] == k, index[:, None], taken_ids)
        remaining = tl.where(experts[None, :] == index[:, None], float("-inf"), remaining)

    k_ok = ks[None, :] < TOP_K
    if SOFTMAX_AFTER_TOPK:  # the first is the largest: softmax over the k taken logits
        exps = tl.where(
            k_ok, tl.exp(taken - tl.max(tl.where(k_ok, taken, float("-inf")), axis=1)[:, None]), 0.0
        )
        taken = exps / tl.sum(exps, axis=1)[:, None]
    elif RENORMALIZE:
        taken = taken / tl.sum(tl.where(k_ok, taken, 0.0), axis=1)[:, None]
    if ROUND_TO == 1:  # to the nearest bfloat16, ties to even, as torch's .to(): on the bits (the
        # interpreter's cast truncates); the weights are finite and in [0, 1], so no overflow nor NaN
        bits = taken.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        taken = bits.to(tl.float32, bitcast=True)
    elif ROUND_TO == 2:
        taken = taken.to(tl.float16).to(tl.float32)
    out = tokens[:, None] * TOP_K + ks[None, :]
    out_mask = token_ok[:, None] & k_ok
    tl.store(weights_ptr + out, taken, mask=out_mask)
    tl.store(ids_ptr + out, taken_ids.to(tl.int64), mask=out_mask)


# float32: a float32 model's Qwen router rounds through its own dtype, which is no rounding at all
_ROUND_CODES = {None: 0, torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


def moe_route(
    logits: torch.Tensor,  # [num_tokens, num_experts] in the model dtype
    top_k: int,
    renormalize: bool,
    softmax_after_topk: bool = False,
    round_to: torch.dtype | None = None,  # the weights rounded through this dtype (None: float32 as is)
) -> tuple[torch.Tensor, torch.Tensor]:  # weights [num_tokens, top_k] float32, ids [num_tokens, top_k] int64
    """ops.reference.moe_route in one launch (module docstring for the tie rule and the last-bit caveat)."""
    num_tokens, num_experts = logits.shape
    if not 1 <= top_k <= num_experts or num_experts > MAX_EXPERTS:
        raise ValueError(f"moe_route: top_k {top_k} of {num_experts} experts (at most {MAX_EXPERTS})")
    if logits.stride(1) != 1:
        raise ValueError("moe_route: logits must be contiguous along the experts")
    if round_to not in _ROUND_CODES:
        raise ValueError(f"moe_route: round_to must be None, float32, bfloat16 or float16; got {round_to}")
    weights = torch.empty(num_tokens, top_k, dtype=torch.float32, device=logits.device)
    ids = torch.empty(num_tokens, top_k, dtype=torch.int64, device=logits.device)
    if num_tokens == 0:
        return weights, ids
    e_p = triton.next_power_of_2(num_experts)
    tokens = max(1, min(16, 4096 // e_p))  # a [tokens, E_P] tile of at most 4096 values a program
    _moe_route_kernel[(triton.cdiv(num_tokens, tokens),)](
        logits, weights, ids, num_tokens, num_experts, logits.stride(0),
        TOP_K=top_k, K_P=triton.next_power_of_2(top_k), E_P=e_p, TOKENS=tokens,
        RENORMALIZE=renormalize, SOFTMAX_AFTER_TOPK=softmax_after_topk, ROUND_TO=_ROUND_CODES[round_to],
        num_warps=4,
    )  # fmt: skip
    return weights, ids
