"""GPTQ checkpoints (reference: GPTQModel, gptqmodel/nn_modules/qlinear/__init__.py,
BaseQuantLinear.dequantize_weight and pack_block; AutoGPTQ's checkpoint_format "gptq" stores zero - 1)
load to exactly the dequantized weights and run token for token like transformers on them. The
checkpoints are written by tests/engine/quantization/checkpoints.py (its docstring says why not by
GPTQModel itself)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from engine.model.quantization.detect import resolve_quantization
from tests.engine.quantization.checkpoints import write_gptq
from tests.engine.quantization.parity import assert_parity
from tests.engine.quantization.weights import assert_weights_match_reference, load_quantized

# (bits, group_size, desc_act, sym, checkpoint_format): every value of every option appears.
PLAIN = (4, 128, False, True, "gptq")
ACT_ORDER = (4, 32, True, False, "gptq_v2")
VARIANTS = [
    PLAIN,
    ACT_ORDER,
    (4, 64, False, False, "gptq"),
    (4, -1, True, True, "gptq_v2"),
    (8, -1, False, False, "gptq_v2"),
    (8, 32, False, False, "gptq"),
    (8, 64, True, True, "gptq"),
    (8, 128, True, False, "gptq_v2"),
]

_CACHE: dict[tuple, tuple[Path, Path]] = {}


@pytest.fixture(scope="module")
def gptq_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    _CACHE.clear()
    return tmp_path_factory.mktemp("gptq")


def _checkpoint(src: Path, root: Path, variant: tuple, skip: tuple[str, ...] = ()) -> tuple[Path, Path]:
    key = (*variant, skip)
    if key not in _CACHE:
        _CACHE[key] = write_gptq(src, root, *variant, skip=skip)
    return _CACHE[key]


def _ids(v: tuple) -> str:
    return "-".join(map(str, v))


@pytest.mark.parametrize("variant", VARIANTS, ids=_ids)
def test_gptq_loads_exactly_the_dequantized_weights(
    wide_llama_dir: Path, gptq_root: Path, variant: tuple
) -> None:
    quantized, reference = _checkpoint(wide_llama_dir, gptq_root, variant)
    method, _, config = resolve_quantization(quantized, None)
    assert method == "gptq"
    model = load_quantized(quantized, config)
    assert assert_weights_match_reference(model, reference) == 2 * 4  # qkv, o, gate_up, down per layer
    # act order becomes a load-time column permutation; groups are then contiguous everywhere
    act_order = variant[2] and variant[1] != -1
    down_proj = model.model.layers[0].mlp.down_proj  # in 256: more than one group
    assert (down_proj.perm is not None) == act_order
    assert down_proj.g_idx is None


@pytest.mark.parametrize(
    ("variant", "setting"),
    [(PLAIN, "default"), (ACT_ORDER, "default"), (ACT_ORDER, "chunked_prefill"), (ACT_ORDER, "preemption")],
    ids=lambda x: _ids(x) if isinstance(x, tuple) else x,
)
def test_gptq_greedy_parity_with_transformers(
    wide_llama_dir: Path, gptq_root: Path, variant: tuple, setting: str
) -> None:
    quantized, reference = _checkpoint(wide_llama_dir, gptq_root, variant)
    assert_parity(quantized, reference, setting, "gptq")


def test_gptq_unquantized_modules_stay_in_model_dtype(wide_llama_dir: Path, gptq_root: Path) -> None:
    quantized, reference = _checkpoint(wide_llama_dir, gptq_root, PLAIN, skip=("mlp.down_proj",))
    _, _, config = resolve_quantization(quantized, None)
    model = load_quantized(quantized, config)
    assert assert_weights_match_reference(model, reference) == 2 * 3
    layer = model.model.layers[0]
    assert layer.mlp.down_proj.weight.dtype == torch.float32
    assert layer.mlp.gate_up_proj.codes.dtype == torch.uint8
    assert model.lm_head.weight.dtype == torch.float32


def test_gptq_corrupt_g_idx_is_refused_naming_the_layer(
    wide_llama_dir: Path, gptq_root: Path, tmp_path: Path
) -> None:
    import shutil

    from safetensors.torch import load_file, save_file

    quantized, _ = _checkpoint(wide_llama_dir, gptq_root, PLAIN)
    bad = tmp_path / "bad"
    shutil.copytree(quantized, bad)
    tensors = load_file(str(bad / "model.safetensors"))
    tensors["model.layers.1.mlp.down_proj.g_idx"][5] = 7  # one group only (group_size 128 over 256: 2)
    save_file(tensors, str(bad / "model.safetensors"))
    _, _, config = resolve_quantization(bad, None)
    with pytest.raises(
        ValueError,
        match=r"GPTQ layer model\.layers\.1\.mlp\.down_proj: g_idx holds groups in \[0, 7\], outside the 2 groups",
    ):
        load_quantized(bad, config)


@pytest.mark.parametrize("full_groups", [True, False])
def test_gptq_act_order_layer_matches_dequantize_then_matmul(full_groups: bool) -> None:
    """Full act-order groups become a load-time column permutation; uneven ones (not what GPTQ
    writes, but a valid g_idx) keep a per-call gather. Both compute x w^T with w from the spec."""
    from engine.model.layers.linear import RowParallelLinear
    from engine.model.quantization.gptq import GPTQConfig
    from engine.model.quantization.packing import pack_cols, pack_rows
    from tests.engine.quantization.checkpoints import dequantized, quantize_groups

    gen = torch.Generator().manual_seed(3)
    in_features, out_features, group_size = 128, 32, 32
    g_idx = torch.randperm(in_features, generator=gen) // group_size
    if not full_groups:
        g_idx = torch.randint(0, in_features // group_size, (in_features,), generator=gen)
    w = torch.randn(out_features, in_features, generator=gen) * 0.05
    codes, zeros, scales = quantize_groups(w, 4, g_idx, in_features // group_size, sym=False)
    layer = RowParallelLinear(
        in_features, out_features, quant_config=GPTQConfig(4, group_size, True, False, "gptq_v2"), prefix="p"
    )
    layer.weight_loader(layer.qweight, pack_rows(codes.t(), 4))
    layer.qzeros.weight_loader(layer.qzeros, pack_cols(zeros, 4))
    layer.weight_loader(layer.scales, scales)
    layer.g_idx.weight_loader(layer.g_idx, g_idx.to(torch.int32))
    layer.quant_method.process_weights_after_loading(layer)
    assert (layer.perm is not None) == full_groups
    assert (layer.g_idx is not None) == (not full_groups)
    x = torch.randn(5, in_features, generator=gen)
    expected = x @ dequantized(codes, zeros, scales, g_idx).t()
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
