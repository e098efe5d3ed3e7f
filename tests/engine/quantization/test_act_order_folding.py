"""An act-order down_proj's input gather folded into gate_up_proj's rows at load
(engine/model/quantization/act_order_folding.py): the MLP's output stays bit for bit what the gather
gave, in every gate_up layout the fold knows; other layouts and LoRA engines keep the gather. Token
parity with transformers through the engine, folded, is tests/engine/quantization/test_gptq.py's
act-order parity (default, chunked prefill, preemption)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from engine import LLM
from engine.model.layers.linear import MergedColumnParallelLinear
from engine.model.quantization.act_order_folding import fold_down_proj_orders, reorder_gate_up_rows
from engine.model.quantization.detect import resolve_quantization
from engine.model.quantization.wna16 import apply_wna16_reference, register_kernel_layout
from tests.engine.quantization.checkpoints import write_gptq
from tests.engine.quantization.weights import load_quantized

ACT_ORDER = (4, 32, True, False, "gptq_v2")  # test_gptq.py's act-order variant
PLAIN = (4, 128, False, True, "gptq")


@pytest.fixture(scope="module")
def checkpoints(wide_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("act_order_folding")
    return {
        "act_order": write_gptq(wide_llama_dir, root / "a", *ACT_ORDER)[0],
        "plain": write_gptq(wide_llama_dir, root / "p", *PLAIN)[0],
    }


def test_every_mlp_keeps_its_output_bit_for_bit(checkpoints: dict[str, Path]) -> None:
    _, _, config = resolve_quantization(checkpoints["act_order"], None)
    model = load_quantized(checkpoints["act_order"], config)
    layers = model.model.layers
    assert all(layer.mlp.down_proj.perm is not None for layer in layers)
    x = torch.randn(5, layers[0].mlp.gate_up_proj.input_size, generator=torch.Generator().manual_seed(0))
    before = [layer.mlp(x) for layer in layers]
    assert fold_down_proj_orders(model) == len(layers)
    assert all(layer.mlp.down_proj.perm is None for layer in layers)
    assert all(torch.equal(layer.mlp(x), expected) for layer, expected in zip(layers, before, strict=True))
    # q/k/v keep theirs (their input is the residual stream)
    assert layers[0].self_attn.qkv_proj.perm is not None


def test_nothing_to_fold_without_act_order(checkpoints: dict[str, Path]) -> None:
    _, _, config = resolve_quantization(checkpoints["plain"], None)
    model = load_quantized(checkpoints["plain"], config)
    codes = model.model.layers[0].mlp.gate_up_proj.codes.clone()
    assert fold_down_proj_orders(model) == 0
    assert torch.equal(model.model.layers[0].mlp.gate_up_proj.codes, codes)


def test_the_kernel_layout_and_an_unquantized_gate_up_reorder_their_outputs() -> None:
    gen = torch.Generator().manual_seed(1)
    half, in_features, groups = 16, 64, 2
    perm = torch.randperm(half, generator=gen)
    rows = torch.cat([perm, perm + half])
    x = torch.randn(3, in_features, generator=gen)

    kernel_layer = nn.Module()
    kernel_layer.output_partition_sizes = [half, half]
    codes = torch.randint(0, 16, (2 * half, in_features), generator=gen, dtype=torch.uint8)
    zeros = torch.randint(0, 16, (2 * half, groups), generator=gen).float()
    scales = torch.rand(2 * half, groups, generator=gen) * 0.1
    register_kernel_layout(kernel_layer, codes, zeros, scales, None, 4)
    expected = apply_wna16_reference(kernel_layer, x, None)[:, rows]
    assert reorder_gate_up_rows(kernel_layer, perm)
    assert torch.equal(apply_wna16_reference(kernel_layer, x, None), expected)

    plain = MergedColumnParallelLinear(in_features, [half, half], bias=True, params_dtype=torch.float32)
    with torch.no_grad():
        plain.weight.copy_(torch.randn(2 * half, in_features, generator=gen))
        plain.bias.copy_(torch.randn(2 * half, generator=gen))
    expected = plain(x)[:, rows]
    assert reorder_gate_up_rows(plain, perm)
    assert torch.equal(plain(x), expected)


def test_a_layout_it_does_not_know_keeps_the_gather() -> None:
    class OtherMethod:  # e.g. FP8 blocks, whose rows cannot move one by one
        pass

    mlp = nn.Module()
    mlp.gate_up_proj = nn.Module()
    mlp.gate_up_proj.output_partition_sizes = [4, 4]
    mlp.gate_up_proj.quant_method = OtherMethod()
    mlp.down_proj = nn.Module()
    mlp.down_proj.register_buffer("perm", torch.tensor([2, 0, 3, 1]))
    assert fold_down_proj_orders(mlp) == 0
    assert mlp.down_proj.perm.tolist() == [2, 0, 3, 1]


@pytest.mark.parametrize("enable_lora", [False, True])
def test_the_engine_folds_unless_lora_is_on(checkpoints: dict[str, Path], enable_lora: bool) -> None:
    llm = LLM(str(checkpoints["act_order"]), device="cpu", dtype="float32", enable_lora=enable_lora)
    model = llm.llm_engine.executor.runner.model
    perms = [layer.mlp.down_proj.perm for layer in model.model.layers]
    assert all((p is not None) == enable_lora for p in perms)
