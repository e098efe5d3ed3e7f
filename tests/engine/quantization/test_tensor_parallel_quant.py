"""Quantized checkpoints split over tensor-parallel ranks: each rank's model, built alone, dequantizes to
exactly its slice of the reference weights (GPTQ with and without groups, AWQ, FP8 per tensor, per
channel and in blocks, compressed-tensors with zero points per group and per channel, written by the
compressed-tensors library: its zero points split like its scales); what cannot be split (GPTQ or
compressed-tensors act order on a row-parallel layer, groups or blocks larger than a rank's input
slice) is refused naming the layer. The forward over these shards is the
unquantized one's (tests/e2e/test_tensor_parallel.py): only the weights differ."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from engine.model.build_context import BuildContext
from engine.model.models.llama import LlamaForCausalLM
from engine.model.quantization.common import dequantize
from engine.model.quantization.detect import resolve_quantization
from engine.model.weight_loader import load_weights
from engine.model_config import ModelConfig
from tests.engine.quantization.checkpoints import write_awq, write_fp8, write_gptq
from tests.engine.quantization.ct_library import write_ct_library_checkpoint

TP = 2
COLUMN = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}
ROW = ("o_proj", "down_proj")


def _load_rank(model_dir: Path, rank: int) -> LlamaForCausalLM:
    _, _, quant_config = resolve_quantization(model_dir, None)
    config = ModelConfig.from_pretrained(str(model_dir), dtype="float32", device="cpu")
    ctx = BuildContext(dtype=torch.float32, quant_config=quant_config, tp_rank=rank, tp_size=TP)
    model = LlamaForCausalLM(config, ctx)
    load_weights(model, model_dir)
    return model


def _effective_weight(module: torch.nn.Module) -> torch.Tensor:  # [out, in] float32
    if hasattr(module, "codes"):  # GPTQ, AWQ, compressed-tensors pack-quantized
        got = dequantize(module.codes, module.zeros, module.scales, module.g_idx, torch.float32)
        assert module.perm is None
        return got
    scale = module.weight_scale
    return module.weight.float() * (scale[:, None] if scale.dim() == 1 else scale)


def _assert_rank_slices(quantized: Path, reference: Path) -> None:
    ref = load_file(str(reference / "model.safetensors"))
    for rank in range(TP):
        model = _load_rank(quantized, rank)
        checked = 0
        for name, module in model.named_modules():
            head, _, last = name.rpartition(".")
            if last in COLUMN:
                parts = [ref[f"{head}.{p}.weight"] for p in COLUMN[last]]  # each [out, in]
                expected = torch.cat([p.chunk(TP, dim=0)[rank] for p in parts])
            elif last in ROW:
                expected = ref[f"{head}.{last}.weight"].chunk(TP, dim=1)[rank]
            else:
                continue
            assert torch.equal(_effective_weight(module), expected), (rank, name)
            checked += 1
        assert checked == 2 * 4


@pytest.mark.parametrize(
    "fmt",
    [
        "gptq-g32",
        "gptq-per-channel",
        "awq-g64",
        "fp8-tensor",
        "fp8-channel",
        "fp8-block32",
        "ct-asym-g32",
        "ct-asym-channel",
    ],
)
def test_each_rank_dequantizes_to_its_slice(wide_llama_dir: Path, tmp_path: Path, fmt: str) -> None:
    if fmt == "gptq-g32":
        quantized, reference = write_gptq(wide_llama_dir, tmp_path, 4, 32, False, True, "gptq")
    elif fmt == "gptq-per-channel":
        quantized, reference = write_gptq(wide_llama_dir, tmp_path, 4, -1, False, False, "gptq")
    elif fmt == "awq-g64":
        quantized, reference = write_awq(wide_llama_dir, tmp_path, 64)
    elif fmt.startswith("ct-asym"):
        group_size = 32 if fmt == "ct-asym-g32" else -1
        quantized, reference = write_ct_library_checkpoint(wide_llama_dir, tmp_path, 4, group_size, False)
    elif fmt == "fp8-block32":
        quantized, reference = write_fp8(wide_llama_dir, tmp_path, "block", block=(32, 32))
    else:
        quantized, reference = write_fp8(wide_llama_dir, tmp_path, fmt.removeprefix("fp8-"))
    _assert_rank_slices(quantized, reference)


def test_what_cannot_be_split_is_refused(wide_llama_dir: Path, tmp_path: Path) -> None:
    quantized, _ = write_gptq(wide_llama_dir, tmp_path / "act", 4, 32, True, True, "gptq")
    with pytest.raises(
        ValueError,
        match=r"layers\.0\.\S+: act order \(desc_act\) checkpoints cannot be split over tensor_parallel_size 2",
    ):
        _load_rank(quantized, 1)
    quantized, _ = write_ct_library_checkpoint(wide_llama_dir, tmp_path / "ct-act", 4, 32, False, "group")
    with pytest.raises(
        ValueError,
        match=r"compressed-tensors layer model\.layers\.0\.\S+: act order \(actorder 'group'\) checkpoints "
        r"cannot be split over tensor_parallel_size 2 .*re-quantize with actorder 'weight'",
    ):
        _load_rank(quantized, 1)
    # o_proj's input per rank is 64: a 128-wide group would straddle the ranks.
    quantized, _ = write_gptq(wide_llama_dir, tmp_path / "g128", 4, 128, False, True, "gptq")
    with pytest.raises(ValueError, match=r"GPTQ layer model.layers.0.self_attn.o_proj: input size 64"):
        _load_rank(quantized, 0)
    quantized, _ = write_fp8(wide_llama_dir, tmp_path / "b64", "block", block=(64, 64))
    with pytest.raises(ValueError, match=r"FP8 layer .*qkv_proj: output sizes \[64, 32, 32\]"):
        _load_rank(quantized, 0)
