"""When a LoRA layer takes the one-token GEMV with the expand in its epilogue (engine.lora.gemv): only
an unquantized layer on the Triton kernels, with a planned launch, in a step with adapters, at one
token, inside the CUDA-graph warm-up/capture; and then with the unfused path's output, layer by layer
and through the whole tiny Llama. Kernels under TRITON_INTERPRET=1 without a GPU; the plan is forced
(`lora_gemv_forced`) since no tiny shape, CPU device or fp32 weight has one of its own."""

from __future__ import annotations

# isort: off
# First: it sets TRITON_INTERPRET before anything below can import triton.
from tests.ops.triton_interpreter import DEVICE, in_process, only_in_subprocess, rerun_in_fresh_process

# isort: on

import contextlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch

LAUNCH = {"block_n": 16, "block_k": 64, "split_k": 2}


@only_in_subprocess
def test_in_fresh_interpreter_process() -> None:
    rerun_in_fresh_process(__file__)


def _hooked(layer, triton_kernels: bool = True, seed: int = 0):  # noqa: ANN001, ANN202
    """`layer` with random weights and a LoRA hook of 3 slots at max rank 8, every slot random."""
    import ops.triton as impl
    from engine.lora.layers import LoRABatch, LoRALinear
    from ops import reference

    gen = torch.Generator().manual_seed(seed)
    layer.to(DEVICE)
    for p in layer.parameters():
        p.data.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    layer.quant_method.process_weights_after_loading(layer)
    batch = LoRABatch(4, torch.device(DEVICE))
    kernels = (
        (impl.lora_shrink, impl.lora_expand)
        if triton_kernels
        else (reference.lora_shrink, reference.lora_expand)
    )
    lora = LoRALinear(layer, batch, 3, 8, *kernels, triton_kernels=triton_kernels)
    slots = torch.zeros(3, lora.slot_numel, device=DEVICE)
    lora.bind(slots, 0)
    lora.a_stacked.copy_(torch.randn(lora.a_stacked.shape, generator=gen) * 0.1)
    b = torch.randn(lora.b_stacked.shape, generator=gen)
    bounds = [*lora.slice_offsets, b.shape[1]]
    keep = torch.zeros(b.shape[1], b.shape[2], dtype=torch.bool)  # block-diagonal, as the slot images are
    for i, (start, stop) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)):
        keep[start:stop, i * 8 : (i + 1) * 8] = True
    b[:, ~keep] = 0.0
    lora.b_stacked.copy_(b)
    layer.lora = lora
    return layer, lora


def _layers():  # noqa: ANN202
    from engine.model.layers.linear import ColumnParallelLinear, QKVParallelLinear, RowParallelLinear

    return {
        "column": ColumnParallelLinear(96, 40, bias=True),
        "qkv": QKVParallelLinear(64, 16, 4, 1),  # q 64, k 16, v 16: a 16-column tile per sub-matrix boundary
        "row": RowParallelLinear(80, 24),
    }


SHAPES_8B = [(4096, 6144), (4096, 4096), (4096, 28672), (14336, 4096)]  # qkv, o, gate_up, down


@in_process
@pytest.mark.parametrize("kind", ["column", "qkv", "row"])
@pytest.mark.parametrize("fuse_shrink", [False, True])
def test_the_fused_gemv_serves_one_token_of_a_lora_step_inside_graph_capture_only(
    kind: str, fuse_shrink: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    import engine.lora.layers as lora_layers
    from engine.lora.gemv import lora_gemv_forced
    from engine.model.quantization.float_gemv import decode_gemv_allowed

    with lora_gemv_forced({**LAUNCH, "fuse_shrink": fuse_shrink}):
        layer, lora = _hooked(_layers()[kind])
    assert lora.gemv_launch == {**LAUNCH, "fuse_shrink": fuse_shrink}
    calls = []
    real = lora_layers.lora_gemv_linear
    monkeypatch.setattr(lora_layers, "lora_gemv_linear", lambda *a: calls.append(a[0].shape) or real(*a))
    gen = torch.Generator().manual_seed(1)
    one = torch.randn(1, layer.weight.shape[1], generator=gen).to(DEVICE)
    two = torch.randn(2, layer.weight.shape[1], generator=gen).to(DEVICE)
    lora.batch.token_slots[:2] = torch.tensor([2, 1], dtype=torch.int32)

    def unfused(x: torch.Tensor) -> torch.Tensor:
        return lora(x, layer.quant_method.apply(layer, x, layer.bias))

    eager = layer(one)  # outside graph capture: the method, then shrink and expand
    with decode_gemv_allowed():
        assert lora.fused_gemv_launch(one) == lora.gemv_launch
        assert lora.fused_gemv_launch(two) is None
        fused = layer(one)
        layer(two)  # two tokens: the pair
        lora.batch.active = False  # a step without adapters: no LoRA term at all
        assert lora.fused_gemv_launch(one) is None
        base = layer(one)
        lora.batch.active = True
    assert lora.fused_gemv_launch(one) is None
    assert calls == [torch.Size([1, layer.weight.shape[1]])]
    torch.testing.assert_close(fused, unfused(one), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(eager, unfused(one), rtol=0, atol=0)
    assert (fused - base).abs().max().item() > 1e-2  # the adapter's term is there
    lora.batch.token_slots[0] = -1  # slot -1 in a step with adapters: the base output
    with decode_gemv_allowed():
        torch.testing.assert_close(layer(one), base, rtol=1e-5, atol=1e-5)


@in_process
def test_no_fused_gemv_without_a_plan_for_quantized_layers_or_on_the_torch_kernels() -> None:
    from engine.lora.gemv import lora_gemv_forced
    from engine.model.layers.linear import ColumnParallelLinear
    from engine.model.quantization.float_gemv import plan_float_gemv
    from engine.model.quantization.fp8 import Fp8Config

    _, plain = _hooked(_layers()["column"])  # no forced launch: a tiny CPU layer has no plan
    assert plain.gemv_launch is None
    with lora_gemv_forced(LAUNCH):
        _, on_torch = _hooked(_layers()["column"], triton_kernels=False)
        fp8_layer = ColumnParallelLinear(96, 40, quant_config=Fp8Config(from_checkpoint=False))
        _, fp8 = _hooked(fp8_layer)
    assert on_torch.gemv_launch is None and fp8.gemv_launch is None and fp8.gemv_scale is None
    # Llama-3-8B's gate_up keeps cuBLAS without LoRA (a tie in the sweep; down measured faster on the
    # GEMV); with LoRA both take the GEMV
    assert plan_float_gemv(4096, 28672) is None and plan_float_gemv(14336, 4096)["block_n"] == 4
    assert plan_float_gemv(4096, 28672, lora=True)["block_n"] == 16
    assert plan_float_gemv(14336, 4096, lora=True)["prefetch"] is True
    # One launch (the shrink inside the GEMV) where the H200 sweep measured it faster: all but gate_up.
    assert [bool(plan_float_gemv(k, n, lora=True).get("fuse_shrink")) for k, n in SHAPES_8B] == [
        True,
        True,
        False,
        True,
    ]
    assert "fuse_shrink" not in plan_float_gemv(4096, 4096)  # the plain GEMV never takes it


@in_process
@pytest.mark.parametrize("fuse_shrink", [False, True])
def test_one_token_through_the_tiny_llama_with_the_fused_gemv_matches_the_kernel_pair(
    fuse_shrink: bool, tiny_llama_dir: Path, tmp_path: Path
) -> None:
    """A one-token forward on an adapter with every LoRA layer through the fused GEMV (plans forced,
    as inside a graph capture) gives the logits of the shrink/expand pair."""
    from engine.config import EngineConfig
    from engine.lora.gemv import lora_gemv_forced
    from engine.lora.request import LoRARequest
    from engine.model.quantization.float_gemv import decode_gemv_allowed
    from engine.worker.model_runner import ModelRunner
    from tests.ops.test_lora_kernels import _write_adapter

    config = json.loads((tiny_llama_dir / "config.json").read_text())
    _write_adapter(tmp_path / "a", config, 8)
    logits = {}
    for fused in (False, True):
        engine_config = EngineConfig(
            model=str(tiny_llama_dir), device=DEVICE, dtype="float32", num_kv_blocks=8, enforce_eager=True,
            enable_lora=True, max_loras=2,
        )  # fmt: skip
        runner = ModelRunner(engine_config.resolve())
        forced = (
            lora_gemv_forced({**LAUNCH, "fuse_shrink": fuse_shrink}) if fused else contextlib.nullcontext()
        )
        with forced:
            runner.load_model(use_triton=True)
        planned = [layer.gemv_launch for layer in runner.lora.layers.values()]
        assert all(planned) if fused else not any(planned)
        runner.initialize_kv_cache(8)
        adapter = runner.lora.add(LoRARequest("a", 1, str(tmp_path / "a")))
        step = runner._build_inputs([[17]], [0], [1], [[0]], np.array([0]))
        with torch.inference_mode(), decode_gemv_allowed():
            runner.lora.prepare_step([adapter], [1], 1)
            hidden = runner._forward(step.input_ids, step.positions, step.metadata)
            logits[fused] = runner.compute_logits(hidden[step.logits_indices])
    assert (logits[True] - logits[False]).abs().max().item() < 1e-4


@in_process
def test_launch_options_reach_the_kernels() -> None:
    """A planned launch's `shrink_chunk` goes to the separate shrink (not fused) or to the workers
    (fused); `early_b` and `reduce_t` change no bit; `reduce_t` without the fused shrink is refused."""
    from engine.lora.gemv import lora_gemv_linear
    from ops.triton.lora import lora_shrink

    layer, lora = _hooked(_layers()["qkv"])
    x = torch.randn(1, layer.weight.shape[1], generator=torch.Generator().manual_seed(2)).to(DEVICE)
    slots = torch.tensor([1], dtype=torch.int32, device=DEVICE)
    ones = torch.ones(layer.weight.shape[0], device=DEVICE)
    splits = []

    def shrink(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        t = lora_shrink(*args, **kwargs)
        splits.append((kwargs, t.shape[0]))
        return t

    def run(**launch):  # noqa: ANN003, ANN202
        args = (
            x,
            layer.weight,
            ones,
            None,
            shrink,
            lora.a_stacked,
            lora.b_stacked,
            slots,
            lora.slice_offsets,
        )
        return lora_gemv_linear(*args, {"block_n": 16, "block_k": 64, **launch})

    two = run()
    assert torch.equal(run(early_b=True), two)
    chunked = run(shrink_chunk=32)  # in 64: two splits of 32 rounded up to one of 64
    assert splits == [({}, 1), ({}, 1), ({"chunk": 32}, 1)]
    torch.testing.assert_close(chunked, two, rtol=0, atol=0)
    one = run(fuse_shrink=True, shrink_chunk=32)  # two workers
    assert torch.equal(run(fuse_shrink=True, shrink_chunk=32, reduce_t=True, early_b=True), one)
    assert len(splits) == 3  # the fused launches call no shrink
    torch.testing.assert_close(one, two, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"lora_gemv_linear: reduce_t needs fuse_shrink"):
        run(reduce_t=True)
