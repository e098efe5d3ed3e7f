"""The one-launch MoE routing kernel (ops/triton/moe_route.py) against its spec, ops.reference.moe_route
(transformers' softmax, top-k, renormalization), under TRITON_INTERPRET=1 without a GPU
(tests.ops.triton_interpreter): the same experts in the same order and weights within float32's last
bits, for Mixtral's, Qwen's and GraniteMoe's variants; among equal probabilities the lowest expert
indices (the set torch.topk takes on CUDA; torch on CPU may take others, so ties are checked on their
own); the engine's router takes it only on CUDA with WEIR_MOE_ROUTE_KERNEL on.
"""

from __future__ import annotations

# isort: off
# First: it sets TRITON_INTERPRET before anything below can import triton.
from tests.ops.triton_interpreter import DEVICE, in_process, only_in_subprocess, rerun_in_fresh_process

# isort: on

from pathlib import Path

import pytest
import torch

from ops import reference


@only_in_subprocess
def test_in_fresh_interpreter_process() -> None:
    rerun_in_fresh_process(__file__)


def _logits(num_tokens: int, num_experts: int, seed: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """[num_tokens, num_experts]: distinct float32 logits (no ties), in `dtype`."""
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(num_tokens, num_experts, generator=gen) * 2).to(dtype).to(DEVICE)


@in_process
@pytest.mark.parametrize(
    ("num_tokens", "num_experts", "top_k", "renormalize", "softmax_after_topk", "round_to"),
    [
        (1, 8, 2, True, False, None),  # Mixtral's decode step: top 2 of 8, renormalized, float32
        (5, 128, 8, True, False, torch.bfloat16),  # Qwen3-30B-A3B (norm_topk_prob), weights in bf16
        (37, 60, 4, False, False, torch.float16),  # Qwen2-MoE's 60 experts, not renormalized, fp16 model
        (16, 40, 8, False, True, None),  # GraniteMoe: the top 8 logits softmaxed among themselves
        (40, 256, 8, True, False, None),  # 256 experts: one token a program; several programs
        (3, 6, 6, True, False, None),  # top_k = num_experts
        (0, 8, 2, True, False, None),  # an empty batch
    ],
)
def test_kernel_matches_the_reference(
    num_tokens: int,
    num_experts: int,
    top_k: int,
    renormalize: bool,
    softmax_after_topk: bool,
    round_to: torch.dtype | None,
) -> None:
    from ops.triton.moe_route import moe_route

    logits = _logits(num_tokens, num_experts, seed=num_tokens + num_experts)
    expected = reference.moe_route(logits, top_k, renormalize, softmax_after_topk, round_to)
    weights, ids = moe_route(logits, top_k, renormalize, softmax_after_topk, round_to)
    assert ids.dtype == torch.int64 and weights.dtype == torch.float32
    assert weights.shape == ids.shape == (num_tokens, top_k)
    assert torch.equal(ids, expected[1]), (ids.tolist(), expected[1].tolist())
    # float32: the softmax's sum in another order moves a weight by an ulp at most; through bf16/fp16
    # that ulp may cross a rounding boundary, so one unit of the narrow type
    tol = {None: 1e-6, torch.bfloat16: 2**-8, torch.float16: 2**-11}[round_to]
    torch.testing.assert_close(weights, expected[0], rtol=tol, atol=1e-7)
    if renormalize or softmax_after_topk:
        torch.testing.assert_close(
            weights.sum(-1), torch.ones(num_tokens, device=DEVICE), rtol=0, atol=4 * tol
        )


@in_process
def test_bfloat16_logits_with_ties_take_the_lowest_indices() -> None:
    """Logits in bfloat16 tie often (equal logits give equal probabilities): the kernel's set of experts
    is the spec's wherever the k-th place is not tied, and where it is, the lowest indices among the
    tied (what torch.topk on CUDA takes), each weight still the probability it was taken at."""
    from ops.triton.moe_route import moe_route

    logits = _logits(512, 128, seed=3, dtype=torch.bfloat16)
    weights, ids = moe_route(logits, 8, renormalize=False)
    probs = torch.softmax(logits.float(), dim=-1)
    ranked = probs.sort(dim=-1, descending=True, stable=True)  # stable: equal values in index order
    boundary_tied = ranked.values[:, 7] == ranked.values[:, 8]
    assert 0 < int(boundary_tied.sum()) < 512  # the case this test is about does occur
    assert torch.equal(ids, ranked.indices[:, :8])  # descending, ties by lowest index
    torch.testing.assert_close(weights, probs.gather(1, ids), rtol=1e-6, atol=1e-8)
    expected_ids = reference.moe_route(logits, 8, renormalize=False)[1]
    same_set = ids.sort(-1).values == expected_ids.sort(-1).values  # [512, 8]
    assert bool(same_set[~boundary_tied].all())
    if DEVICE == "cuda":  # the claim the kernel's tie rule rests on: torch.topk on CUDA takes these too
        assert bool(same_set.all()), int((~same_set.all(-1)).sum())


@in_process
def test_bad_arguments_are_refused() -> None:
    from ops.triton.moe_route import moe_route

    logits = _logits(2, 8, seed=0)
    with pytest.raises(ValueError, match=r"top_k 9 of 8 experts"):
        moe_route(logits, 9, True)
    with pytest.raises(ValueError, match="contiguous along the experts"):
        moe_route(_logits(8, 2, seed=0).t(), 1, True)
    with pytest.raises(ValueError, match="round_to must be None, float32, bfloat16 or float16"):
        moe_route(logits, 2, True, round_to=torch.float64)


def test_the_router_takes_the_kernel_only_on_cuda_with_the_switch(monkeypatch: pytest.MonkeyPatch) -> None:
    from engine.model.layers.moe_router import route_kernel_applies

    cpu = torch.zeros(2, 8)
    monkeypatch.setenv("WEIR_MOE_ROUTE_KERNEL", "1")
    assert route_kernel_applies(cpu) is False  # the CPU keeps the spec
    monkeypatch.delenv("WEIR_MOE_ROUTE_KERNEL")
    assert route_kernel_applies(cpu) is False


@in_process
@pytest.mark.parametrize(
    ("renormalize", "weights_in_model_dtype", "softmax_after_topk", "dtype"),
    [
        (True, False, False, torch.bfloat16),
        (True, True, False, torch.bfloat16),
        (False, True, False, torch.bfloat16),
        (True, False, True, torch.bfloat16),
        (True, True, False, torch.float32),  # a float32 Qwen model: its weights "rounded" through float32
    ],
)
def test_the_router_with_the_kernel_routes_as_without(
    monkeypatch: pytest.MonkeyPatch,
    renormalize: bool,
    weights_in_model_dtype: bool,
    softmax_after_topk: bool,
    dtype: torch.dtype,
) -> None:
    """TopKRouter.route through the kernel (forced on here; on CUDA by default) passes its
    options through: Mixtral's, Qwen's (weights in the model dtype, bf16 or float32), Qwen2-MoE's
    without renormalization and GraniteMoe's route the same experts with the same weights as the torch
    lines."""
    from engine.model.layers import moe_router

    router = moe_router.TopKRouter(
        hidden_size=32, num_experts=16, top_k=4, renormalize=renormalize,
        weights_in_model_dtype=weights_in_model_dtype, params_dtype=dtype,
        softmax_after_topk=softmax_after_topk,
    ).to(DEVICE)  # fmt: skip
    gen = torch.Generator().manual_seed(5)
    router.weight.data.copy_(torch.randn(16, 32, generator=gen).to(dtype))
    # float32 logits have no ties; the bf16 router's may, so compare on inputs whose logits are distinct
    x = torch.randn(6, 32, generator=gen).to(dtype).to(DEVICE)
    assert all(len(set(row.tolist())) == 16 for row in router(x))
    round_to = dtype if weights_in_model_dtype else None
    expected = reference.moe_route(router(x), 4, renormalize, softmax_after_topk, round_to)
    assert all(
        torch.equal(a, b) for a, b in zip(router.route(x), expected, strict=True)
    )  # not CUDA: the spec
    monkeypatch.setattr(moe_router, "route_kernel_applies", lambda logits: True)
    weights, ids = router.route(x)
    assert torch.equal(ids, expected[1])
    torch.testing.assert_close(
        weights, expected[0], rtol=2**-8 if round_to == torch.bfloat16 else 1e-6, atol=1e-7
    )


@in_process
@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "qwen3_moe", "granite_moe"])
def test_a_float32_moe_model_decodes_alike_with_the_kernel(
    family: str, tmp_path: Path, tiny_tokenizer_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each MoE family's tiny model in float32 (the GPU engine check's setting), its routers on the
    kernel (forced here; on CUDA by default): the same greedy tokens as with the torch lines. The GPU
    check found the kernel refusing a float32 Qwen router's rounding through the model dtype."""
    from engine import LLM, SamplingParams
    from engine.model.layers import moe_router
    from tests.tiny_models import build_model

    path = build_model(family, tmp_path / family, tiny_tokenizer_dir)
    prompts = [[5, 6, 7, 8, 9], [10, 11, 12]]
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)

    def greedy() -> list[list[int]]:
        llm = LLM(str(path), device="cpu", dtype="float32", max_model_len=64, num_kv_blocks=16)
        try:
            return [list(o.outputs[0].token_ids) for o in llm.generate(prompts, params, use_tqdm=False)]
        finally:
            llm.shutdown()

    expected = greedy()
    routed_by_kernel = []
    monkeypatch.setattr(moe_router, "route_kernel_applies", lambda logits: not routed_by_kernel.append(1))
    assert greedy() == expected
    assert routed_by_kernel  # the routers took the kernel
