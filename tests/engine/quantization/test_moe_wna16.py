"""Integer experts (W4A16 / W8A16) of Mixtral / Qwen2-MoE / Qwen3-MoE (engine.model.quantization.
wna16_moe): GPTQ (sym, group 128, desc_act false; asym gptq_v2 8-bit), AWQ GEMM and compressed-tensors
pack-quantized checkpoints, the hub's per-expert layout. Each loads to exactly the dequantized weights
(every expert's tensors, stacked) and runs like transformers on them. Checkpoints: GPTQ and AWQ by
tests/engine/quantization/checkpoints.py (write_gptq, write_awq: GPTQModel's and AutoAWQ's layouts),
compressed-tensors by the compressed-tensors library itself (ct_library.py) and by weir's packer.
Models 128 wide (experts' intermediate 128) so group 128 divides every input. Act order (GPTQ desc_act,
compressed-tensors actorder "group") loads into group order (wna16_moe.fold_act_order) and runs like
transformers; over tensor-parallel ranks it is refused."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from engine.config import EngineConfig
from engine.model.layers.fused_moe import FusedMoE
from engine.model.quantization.detect import resolve_quantization
from engine.model.quantization.wna16_moe import WNA16FusedMoEMethod
from ops import reference
from tests.engine.quantization.checkpoints import write_awq, write_compressed_tensors, write_gptq
from tests.engine.quantization.ct_library import write_ct_library_checkpoint
from tests.engine.quantization.parity import assert_parity
from tests.engine.quantization.weights import assert_weights_match_reference, load_quantized
from tests.tiny_models import build_model

_CACHE: dict[tuple, tuple[Path, Path]] = {}
# experts 128 wide: "intermediate_size" is Mixtral's expert size, moe_intermediate_size Qwen's
WIDE = {
    "mixtral": {"intermediate_size": 128},
    "qwen3_moe": {"moe_intermediate_size": 128},
    "qwen2_moe": {"moe_intermediate_size": 128, "shared_expert_intermediate_size": 128},
}


@pytest.fixture(scope="module")
def wide_moe(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer_dir: Path) -> dict[str, Path]:
    _CACHE.clear()
    root = tmp_path_factory.mktemp("wide-moe")
    return {
        family: build_model(family, root / family, tiny_tokenizer_dir, config_overrides=wide, hidden_size=128)
        for family, wide in WIDE.items()
    }


def _checkpoint(src: Path, scheme: tuple) -> tuple[Path, Path]:
    key = (str(src), scheme)
    if key not in _CACHE:
        root = src.parent / f"q{len(_CACHE)}"
        kind, *args = scheme
        writer = {"gptq": write_gptq, "awq": write_awq, "ct": write_compressed_tensors}.get(kind)
        if kind == "ct-lib":
            _CACHE[key] = write_ct_library_checkpoint(src, root, *args)
        else:
            _CACHE[key] = writer(src, root, *args)
    return _CACHE[key]


GPTQ_4 = ("gptq", 4, 128, False, True, "gptq")  # bits, group, desc_act, sym, checkpoint_format
GPTQ_8 = ("gptq", 8, 32, False, False, "gptq_v2")
GPTQ_4_ACT = ("gptq", 4, 32, True, True, "gptq")  # act order: four groups of 32 over each input
AWQ = ("awq", 128)
CT_W4 = ("ct", "w4a16-g32")  # weir's packer, symmetric
CT_LIB_ASYM = ("ct-lib", 4, 128, False)  # the library's packer, zero points
CT_LIB_GROUP = ("ct-lib", 4, 32, False, "group")  # actorder "group": weight_g_idx per expert projection


@pytest.mark.parametrize(
    ("family", "scheme", "method", "quantized_layers"),
    [
        ("mixtral", GPTQ_4, "gptq", 2 * 3),
        ("mixtral", GPTQ_8, "gptq", 2 * 3),
        ("qwen3_moe", GPTQ_4_ACT, "gptq", 2 * 2 + 2 + 1),
        ("qwen3_moe", AWQ, "awq", 2 * 2 + 2 + 1),
        ("qwen2_moe", CT_W4, "compressed-tensors", 2 * 5),
        ("qwen2_moe", CT_LIB_ASYM, "compressed-tensors", 2 * 5),
        ("qwen2_moe", CT_LIB_GROUP, "compressed-tensors", 2 * 5),
    ],
)
def test_int_moe_loads_exactly_the_dequantized_weights(
    wide_moe: dict[str, Path], family: str, scheme: tuple, method: str, quantized_layers: int
) -> None:
    quantized, ref = _checkpoint(wide_moe[family], scheme)
    resolved_method, _, config = resolve_quantization(quantized, None)
    assert resolved_method == method
    model = load_quantized(quantized, config)
    assert assert_weights_match_reference(model, ref) == quantized_layers
    experts = [m for m in model.modules() if isinstance(m, FusedMoE)]
    assert experts and all(isinstance(m.quant_method, WNA16FusedMoEMethod) for m in experts)
    bits = 8 if scheme == GPTQ_8 else 4
    assert experts[-1].w13_codes.shape == (4, 256, 128 * bits // 32)  # [E, 2I, H / pf] int32 words
    for layer in experts:  # stored K-major (store_k_major): a row of words or scales along N is contiguous
        for tensor in (layer.w13_codes, layer.w2_codes, layer.w13_scales, layer.w2_zeros):
            assert tensor.transpose(1, 2).is_contiguous() and tensor.stride(1) == 1, tensor.stride()
    if scheme in (
        GPTQ_4_ACT,
        CT_LIB_GROUP,
    ):  # each expert's own order for gate/up's input and the intermediate
        for layer in experts:
            assert layer.w13_perm.shape == (4, 128) and layer.w2_perm.shape == (4, 128)
            assert len({tuple(p.tolist()) for p in layer.w13_perm}) == 4
            assert not torch.equal(layer.w2_perm[0], torch.arange(128, dtype=torch.int32))
    else:
        assert not hasattr(experts[-1], "w13_perm")


@pytest.mark.parametrize(
    ("family", "scheme", "method", "setting"),
    [
        ("mixtral", GPTQ_4, "gptq", "default"),
        ("qwen3_moe", GPTQ_4_ACT, "gptq", "default"),
        ("qwen3_moe", GPTQ_4_ACT, "gptq", "preemption"),
        ("qwen3_moe", AWQ, "awq", "chunked_prefill"),
        ("qwen2_moe", CT_LIB_ASYM, "compressed-tensors", "default"),
        ("qwen2_moe", CT_LIB_GROUP, "compressed-tensors", "chunked_prefill"),
    ],
)
def test_int_moe_greedy_parity_with_transformers(
    wide_moe: dict[str, Path], family: str, scheme: tuple, method: str, setting: str
) -> None:
    assert_parity(*_checkpoint(wide_moe[family], scheme), setting, method)


def test_tensor_parallel_ranks_hold_their_int_expert_slices(wide_moe: dict[str, Path]) -> None:
    """Over 2 ranks each expert's gate/up rows and down columns (with their groups: 64 columns, two
    groups of 32 a rank) split as the float experts' do; the ranks' partial sums add up to the whole."""
    from engine.model.build_context import BuildContext
    from engine.model.models.moe import MoeForCausalLM
    from engine.model.weight_loader import load_weights
    from engine.model_config import ModelConfig

    quantized, _ = _checkpoint(wide_moe["mixtral"], GPTQ_8)
    _, _, quant = resolve_quantization(quantized, None)
    config = ModelConfig.from_pretrained(quantized, dtype="float32", device="cpu")
    layers = []
    for rank, size in ((0, 1), (0, 2), (1, 2)):
        model = MoeForCausalLM(config, BuildContext(quant_config=quant, tp_rank=rank, tp_size=size))
        load_weights(model, quantized)
        layers.append(model.model.layers[1].mlp.experts)
    whole, *ranks = layers

    def down(layer: FusedMoE) -> torch.Tensor:
        return reference.dequantize_int_experts(
            layer.w2_codes, layer.w2_zeros, layer.w2_scales, 8, torch.float32
        )

    for rank, layer in enumerate(ranks):
        assert torch.equal(down(layer), down(whole)[:, :, rank * 64 : (rank + 1) * 64])
    x = torch.randn(9, 128, generator=torch.Generator().manual_seed(0))
    weights, ids = torch.softmax(torch.randn(9, 4, generator=torch.Generator().manual_seed(2)), -1).topk(2)
    torch.testing.assert_close(ranks[0](x, weights, ids) + ranks[1](x, weights, ids), whole(x, weights, ids))


def test_squeezellm_is_refused_for_moe(tiny_model_dirs: dict[str, Path], tmp_path: Path) -> None:
    src = tiny_model_dirs["qwen3_moe"]
    squeeze = tmp_path / "squeezellm"
    shutil.copytree(src, squeeze)
    (squeeze / "quant_config.json").write_text(json.dumps({"wbits": 4}))
    with pytest.raises(ValueError) as err:
        EngineConfig(model=str(squeeze), device="cpu").resolve()
    assert str(err.value) == (
        f"quantization 'squeezellm' ({squeeze / 'quant_config.json'}) is not supported for Qwen3MoeForCausalLM: "
        "MoE experts are not supported with squeezellm; serve an unquantized, FP8, GPTQ, AWQ or "
        "compressed-tensors checkpoint"
    )


def test_act_order_experts_are_refused_over_tensor_parallel_ranks(wide_moe: dict[str, Path]) -> None:
    """One act order over the intermediate would cross the ranks' slices: refused as the model is built,
    naming the layer and both ways out."""
    from engine.model.build_context import BuildContext
    from engine.model.models.moe import MoeForCausalLM
    from engine.model_config import ModelConfig

    quantized, _ = _checkpoint(wide_moe["qwen3_moe"], GPTQ_4_ACT)
    _, _, quant = resolve_quantization(quantized, None)
    config = ModelConfig.from_pretrained(quantized, dtype="float32", device="cpu")
    with pytest.raises(ValueError) as err:
        MoeForCausalLM(config, BuildContext(quant_config=quant, tp_rank=0, tp_size=2))
    assert str(err.value) == (
        "GPTQ MoE layer model.layers.1.mlp.experts: act order (desc_act) experts cannot be split over "
        "tensor_parallel_size 2; serve it with tensor_parallel_size 1 or re-quantize with desc_act=False"
    )
