"""FP8 experts of Mixtral / Qwen2-MoE / Qwen3-MoE (engine.model.quantization.fp8_moe): `quant_method:
"fp8"` checkpoints per tensor (as Mixtral-8x7B FP8), per channel and per block (as Qwen3-30B-A3B-FP8's
weight_scale_inv, here [16, 32] blocks, the last of each expert's down input a partial one, and [128, 128]
on a wider model), compressed-tensors float-quantized, and online `quantization="fp8"`. Each loads to
exactly the dequantized weights (the experts stacked, every expert's tensors compared) and runs like
transformers on them (greedy tokens and logprobs). Checkpoints written by tests/engine/quantization/
checkpoints.py (write_fp8: vLLM's Fp8Config / DeepSeek-V3's block layout; write_compressed_tensors:
compressed-tensors' float-quantized layout). Also: static input scales (one per GEMM, the largest over
the experts, as vLLM), ignored experts, and what is refused."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from engine.config import EngineConfig
from engine.model.layers.fused_moe import FusedMoE
from engine.model.quantization.detect import resolve_quantization
from engine.model.quantization.fp8 import Fp8Config
from engine.model.quantization.fp8_moe import Fp8FusedMoEMethod
from ops import reference
from ops.moe_quant import Fp8ExpertScales
from tests.engine.quantization.checkpoints import (
    fp8_online_reference,
    write_compressed_tensors,
    write_fp8,
    write_fp8_online_reference,
)
from tests.engine.quantization.parity import assert_parity
from tests.engine.quantization.weights import assert_weights_match_reference, load_quantized
from tests.tiny_models import build_model

_CACHE: dict[tuple, tuple[Path, Path]] = {}
BLOCK = (16, 32)  # divides the tiny models' expert intermediate (48) and dense outputs; 48 % 32 != 0


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    _CACHE.clear()
    return tmp_path_factory.mktemp("moe-fp8")


def _checkpoint(
    src: Path, root: Path, scheme: str, skip: tuple[str, ...] = (), static: bool = False
) -> tuple[Path, Path]:
    key = (str(src), scheme, skip, static)
    if key not in _CACHE:
        out = root / str(len(_CACHE))
        if scheme.startswith("ct-"):
            _CACHE[key] = write_compressed_tensors(src, out, scheme.removeprefix("ct-"), skip)
        else:
            _CACHE[key] = write_fp8(src, out, scheme, BLOCK, skip, static)
    return _CACHE[key]


def _experts(model: torch.nn.Module) -> list[FusedMoE]:
    return [m for m in model.modules() if isinstance(m, FusedMoE)]


@pytest.mark.parametrize(
    ("family", "scheme", "quantized_layers"),
    [
        ("mixtral", "tensor", 2 * 2 + 2),  # per-tensor scales: each expert's gate / up scalar over its rows
        ("qwen2_moe", "channel", 2 * 4 + 2),  # + the shared expert (a dense MLP)
        ("qwen3_moe", "block", 2 * 2 + 2 + 1),  # layer 0 dense (mlp_only_layers)
        ("mixtral", "ct-fp8-channel", 2 * 2 + 2),
    ],
)
def test_fp8_moe_loads_exactly_the_dequantized_weights(
    tiny_model_dirs: dict[str, Path], root: Path, family: str, scheme: str, quantized_layers: int
) -> None:
    quantized, ref = _checkpoint(tiny_model_dirs[family], root, scheme)
    method, _, config = resolve_quantization(quantized, None)
    assert method == ("compressed-tensors" if scheme.startswith("ct-") else "fp8")
    model = load_quantized(quantized, config)
    assert assert_weights_match_reference(model, ref) == quantized_layers
    for layer in _experts(model):
        assert isinstance(layer.quant_method, Fp8FusedMoEMethod)
        assert layer.w13_weight.dtype == layer.w2_weight.dtype == torch.float8_e4m3fn
        assert layer.w13_scale.shape == ((4, 96 // 16, 2) if scheme == "block" else (4, 96, 1))
        assert layer.w2_scale.shape == ((4, 64 // 16, 2) if scheme == "block" else (4, 64, 1))
    assert model.model.layers[1].mlp.gate.weight.dtype == torch.float32  # the router stays float


@pytest.mark.parametrize(
    ("family", "scheme", "setting"),
    [
        ("mixtral", "tensor", "default"),
        ("qwen2_moe", "channel", "preemption"),
        ("qwen3_moe", "block", "chunked_prefill"),
        ("qwen3_moe", "ct-fp8-channel", "default"),
    ],
)
def test_fp8_moe_greedy_parity_with_transformers(
    tiny_model_dirs: dict[str, Path], root: Path, family: str, scheme: str, setting: str
) -> None:
    quantized, ref = _checkpoint(tiny_model_dirs[family], root, scheme)
    assert_parity(quantized, ref, setting, "compressed-tensors" if scheme.startswith("ct-") else "fp8")


def test_online_fp8_quantizes_every_expert_per_channel(tiny_model_dirs: dict[str, Path], tmp_path: Path) -> None:
    model_dir = tiny_model_dirs["qwen2_moe"]
    model = load_quantized(model_dir, Fp8Config(from_checkpoint=False))
    layer = _experts(model)[1]
    original = load_file(str(model_dir / "model.safetensors"))["model.layers.1.mlp.experts.2.down_proj.weight"]
    got = layer.w2_weight[2].float() * layer.w2_scale[2]  # [H, I] times [H, 1]
    assert torch.equal(got, fp8_online_reference(original))  # amax / 448 per output channel
    reference_dir = write_fp8_online_reference(model_dir, tmp_path)
    assert assert_weights_match_reference(model, reference_dir) == 2 * 4 + 2
    assert_parity(model_dir, reference_dir, "default", "fp8", quantization="fp8")
