"""compressed-tensors checkpoints (quant_method "compressed-tensors", as llm-compressor writes them;
reference: compressed-tensors, src/compressed_tensors/compressors/quantized_compressors/
pack_quantized.py pack_to_int32 and quantization/quant_args.py; vLLM's CompressedTensorsConfig):
pack-quantized W4A16/W8A16 (symmetric or with zero points) and float-quantized FP8 load to exactly
the dequantized weights and run like transformers on them; unsupported fields are refused naming
their path. Two writers: tests/engine/quantization/checkpoints.py (write_compressed_tensors, weir's
own packer, for the symmetric and FP8 schemes and the refusals) and ct_library.py, where the
compressed-tensors package itself (github.com/vllm-project/compressed-tensors) quantizes, packs
(compressors/pack_quantized/base.py PackedQuantizationCompressor.compress) and decompresses
(PackedQuantizationCompressor.decompress: the reference weights) on CPU: the asymmetric
checkpoints, whose packed zero points only the library's own layout can pin."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from engine import LLM
from engine.model.quantization.compressed_tensors import CompressedTensorsWNA16Config
from engine.model.quantization.detect import resolve_quantization
from engine.model.quantization.fp8 import Fp8Config
from tests.engine.quantization.checkpoints import write_compressed_tensors
from tests.engine.quantization.ct_library import write_ct_library_checkpoint
from tests.engine.quantization.parity import assert_parity
from tests.engine.quantization.weights import assert_weights_match_reference, load_quantized

DOWN = ("re:.*mlp\\.down_proj$",)
_CACHE: dict[tuple, tuple[Path, Path]] = {}


@pytest.fixture(scope="module")
def ct_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    _CACHE.clear()
    return tmp_path_factory.mktemp("ct")


def _checkpoint(src: Path, root: Path, scheme: str, ignore: tuple[str, ...] = ()) -> tuple[Path, Path]:
    key = (str(src), scheme, ignore)
    if key not in _CACHE:
        _CACHE[key] = write_compressed_tensors(src, root / str(len(_CACHE)), scheme, ignore)
    return _CACHE[key]


@pytest.mark.parametrize(
    ("scheme", "ignore", "config", "quantized_layers"),
    [
        ("w4a16-g32", DOWN, CompressedTensorsWNA16Config(4, 32, ("lm_head", *DOWN)), 2 * 3),
        ("w8a16-channel", (), CompressedTensorsWNA16Config(8, -1, ("lm_head",)), 2 * 4),
        ("fp8-channel", (), Fp8Config(True, skip_modules=("lm_head",), ignore_is_ct=True), 2 * 4),
        (
            "fp8-block",
            (),
            Fp8Config(True, (64, 64), ("lm_head",), block_scale_name="weight_scale", ignore_is_ct=True),
            2 * 4,
        ),
    ],
)
def test_compressed_tensors_load_exactly_the_dequantized_weights(
    wide_llama_dir: Path, ct_root: Path, scheme: str, ignore: tuple, config: object, quantized_layers: int
) -> None:
    quantized, reference = _checkpoint(wide_llama_dir, ct_root, scheme, ignore)
    method, _, resolved = resolve_quantization(quantized, None)
    assert (method, resolved) == ("compressed-tensors", config)
    model = load_quantized(quantized, resolved)
    assert assert_weights_match_reference(model, reference) == quantized_layers


def test_compressed_tensors_greedy_parity_with_transformers(wide_llama_dir: Path, ct_root: Path) -> None:
    # W4A16 (its own packing and fixed zero point); float-quantized FP8 runs the fp8 method, whose
    # parity test_fp8.py checks, and loads to the exact weights above
    assert_parity(*_checkpoint(wide_llama_dir, ct_root, "w4a16-g32", DOWN), "default", "compressed-tensors")


# (bits, group_size, symmetric, actorder): zero points per group and per channel, at 4 and 8 bits;
# symmetric, actorder "weight" (calibration order only) and "group" (weight_g_idx) through the same
# library writer.
LIBRARY_SCHEMES = [(4, 32, False, None), (4, 128, False, None), (8, -1, False, None), (8, 64, False, None),
                   (4, 64, True, None), (4, 32, False, "weight"), (4, 32, False, "group"),
                   (8, 64, True, "group")]  # fmt: skip


def _library_checkpoint(src: Path, root: Path, bits: int, group: int, sym: bool, order: str | None) -> tuple[Path, Path]:  # fmt: skip
    key = ("library", str(src), bits, group, sym, order)
    if key not in _CACHE:
        _CACHE[key] = write_ct_library_checkpoint(src, root / str(len(_CACHE)), bits, group, sym, order)
    return _CACHE[key]


@pytest.mark.parametrize(("bits", "group_size", "symmetric", "actorder"), LIBRARY_SCHEMES)
def test_library_written_checkpoints_load_exactly_its_dequantized_weights(
    wide_llama_dir: Path, ct_root: Path, bits: int, group_size: int, symmetric: bool, actorder: str | None
) -> None:
    """Reference: compressed-tensors' PackedQuantizationCompressor.decompress (compressors/
    pack_quantized/base.py), which unpacks weight_packed and weight_zero_point (helpers.py
    unpack_from_int32) and computes (q - zp) * scale (quantization/lifecycle/forward.py dequantize);
    for actorder "group", on the columns in activation order (ct_library.py)."""
    quantized, reference = _library_checkpoint(wide_llama_dir, ct_root, bits, group_size, symmetric, actorder)
    method, _, resolved = resolve_quantization(quantized, None)
    assert (method, resolved) == (
        "compressed-tensors",
        CompressedTensorsWNA16Config(bits, group_size, ("lm_head",), symmetric, actorder == "group"),
    )
    model = load_quantized(quantized, resolved)
    assert assert_weights_match_reference(model, reference) == 2 * 4
    qkv = model.model.layers[0].self_attn.qkv_proj
    if not symmetric:  # the zero points are the checkpoint's, not the symmetric offset
        assert len(qkv.zeros.unique()) > 1
    # act order by group: the input columns permuted once at load, the groups contiguous
    assert (qkv.perm is not None, qkv.g_idx) == (actorder == "group", None)


@pytest.mark.parametrize("actorder", [None, "group"])
def test_asymmetric_greedy_parity_with_transformers(
    wide_llama_dir: Path, ct_root: Path, actorder: str | None
) -> None:
    checkpoint = _library_checkpoint(wide_llama_dir, ct_root, 4, 32, False, actorder)
    assert_parity(*checkpoint, "default", "compressed-tensors")


def _with_quant(src: Path, dst: Path, edit: object) -> Path:
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    edit(cfg["quantization_config"])  # type: ignore[operator]
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def _group(q: dict) -> dict:
    return q["config_groups"]["group_0"]


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda q: _group(q)["weights"].update(actorder="column"), "config_groups.group_0.weights.actorder='column' is not supported ('group', 'weight' or none)"),
        (lambda q: _group(q)["weights"].update(dynamic=True), "config_groups.group_0.weights.dynamic=True is not supported (static weights from the checkpoint)"),
        (lambda q: _group(q)["weights"].update(group_size=16), "config_groups.group_0.weights.group_size=16 is not supported (32, 64 or 128)"),
        (lambda q: _group(q)["weights"].update(num_bits=2), "config_groups.group_0.weights.num_bits=2 is not supported (int 4 or 8 when pack-quantized)"),
        (lambda q: _group(q).update(input_activations={"num_bits": 8, "type": "int", "dynamic": True}), "config_groups.group_0.input_activations={'num_bits': 8, 'type': 'int', 'dynamic': True} is not supported (weight-only W4A16/W8A16 when pack-quantized)"),
        (lambda q: q["config_groups"].update(group_1=_group(q)), "config_groups=['group_0', 'group_1'] is not supported (one scheme for every Linear layer)"),
        (lambda q: q.update(format="marlin-24"), "format='marlin-24' is not supported (pack-quantized or float-quantized)"),
        (lambda q: q.update(sparsity_config={"format": "sparse-bitmask"}), "sparsity_config.format='sparse-bitmask' is not supported (sparse weights)"),
        (lambda q: q.update(kv_cache_scheme={"num_bits": 8, "type": "float", "strategy": "channel"}), "kv_cache_scheme.strategy='channel' is not supported (one scale per tensor or per attention head)"),
    ],
)  # fmt: skip
def test_unsupported_fields_are_refused_by_path(
    wide_llama_dir: Path, ct_root: Path, tmp_path: Path, edit: object, message: str
) -> None:
    quantized, _ = _checkpoint(wide_llama_dir, ct_root, "w4a16-g32", DOWN)
    bad = _with_quant(quantized, tmp_path / "bad", edit)
    with pytest.raises(ValueError) as e:
        resolve_quantization(bad, None)
    assert str(e.value) == f"{bad / 'config.json'} quantization_config: {message}"


def test_static_fp8_activation_scales_per_tensor_only(
    wide_llama_dir: Path, ct_root: Path, tmp_path: Path
) -> None:
    quantized, _ = _checkpoint(wide_llama_dir, ct_root, "fp8-channel")
    static = {"dynamic": False, "strategy": "tensor"}
    ok = _with_quant(quantized, tmp_path / "static", lambda q: _group(q)["input_activations"].update(static))
    assert resolve_quantization(ok, None)[2] == Fp8Config(
        True, skip_modules=("lm_head",), ignore_is_ct=True, static_activations=True
    )
    token = {"dynamic": False, "strategy": "token"}
    bad = _with_quant(quantized, tmp_path / "token", lambda q: _group(q)["input_activations"].update(token))
    with pytest.raises(
        ValueError, match=r"input_activations\.strategy='token' is not supported \(static scales per tensor\)"
    ):
        resolve_quantization(bad, None)


@pytest.mark.parametrize("strategy", ["tensor", "attn_head"])
def test_kv_cache_scheme_alone_loads_its_scales(tiny_llama_dir: Path, tmp_path: Path, strategy: str) -> None:
    """A checkpoint quantizing only the KV cache (kv_cache_scheme, no config_groups): float linears,
    and with an fp8 cache the k_scale / v_scale llm-compressor wrote: one per tensor, or with
    `attn_head` one per KV head, shaped [num_kv_heads, 1, 1] as compressed-tensors initializes them."""
    from safetensors.torch import load_file, save_file

    ckpt = tmp_path / "kv"
    shutil.copytree(tiny_llama_dir, ckpt)
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["quantization_config"] = {
        "quant_method": "compressed-tensors",
        "format": "float-quantized",
        "config_groups": {},
        "kv_cache_scheme": {
            "num_bits": 8,
            "type": "float",
            "strategy": strategy,
            "dynamic": False,
            "symmetric": True,
        },
    }
    (ckpt / "config.json").write_text(json.dumps(cfg))
    tensors = load_file(str(ckpt / "model.safetensors"))
    heads = [1.0, 4.0] if strategy == "attn_head" else [1.0]  # KV head h's factor
    for i in range(2):
        k_scale = torch.tensor([0.125 * (i + 1) * f for f in heads])
        v_scale = torch.tensor([0.5 / f for f in heads])
        if strategy == "attn_head":
            k_scale, v_scale = k_scale.reshape(2, 1, 1), v_scale.reshape(2, 1, 1)
        else:
            k_scale, v_scale = k_scale.reshape(()), v_scale.reshape(())
        tensors[f"model.layers.{i}.self_attn.k_scale"] = k_scale
        tensors[f"model.layers.{i}.self_attn.v_scale"] = v_scale
    save_file(tensors, str(ckpt / "model.safetensors"))
    llm = LLM(str(ckpt), device="cpu", dtype="float32", kv_cache_dtype="fp8", num_kv_blocks=16)
    assert llm.llm_engine.config.quant.method == "compressed-tensors"
    layers = llm.llm_engine.executor.runner.model.model.layers  # type: ignore[attr-defined]
    got = [(layer.self_attn.attn.k_scale.tolist(), layer.self_attn.attn.v_scale.tolist()) for layer in layers]
    if strategy == "attn_head":
        assert got == [([0.125, 0.5], [0.5, 0.125]), ([0.25, 1.0], [0.5, 0.125])]
    else:
        assert got == [([0.125, 0.125], [0.5, 0.5]), ([0.25, 0.25], [0.5, 0.5])]
    assert layers[0].mlp.down_proj.weight.dtype == torch.float32
    llm.shutdown()


@pytest.mark.parametrize(
    ("scheme", "field", "value", "message"),
    [
        ("fp8-channel", "symmetric", False, "symmetric=False is not supported (symmetric FP8 weights (no zero points))"),
        ("fp8-channel", "actorder", "group", "actorder='group' is not supported (no act order by group for FP8 weights)"),
        ("w8a16-channel", "actorder", "group", "actorder='group' is not supported (act order by group needs strategy 'group')"),
    ],
)  # fmt: skip
def test_zero_points_and_act_order_elsewhere_are_refused(
    wide_llama_dir: Path, ct_root: Path, tmp_path: Path, scheme: str, field: str, value: object, message: str
) -> None:
    """Zero points and weight_g_idx are read for pack-quantized integers in groups only."""
    quantized, _ = _checkpoint(wide_llama_dir, ct_root, scheme)
    bad = _with_quant(quantized, tmp_path / "bad", lambda q: _group(q)["weights"].update({field: value}))
    with pytest.raises(ValueError) as e:
        resolve_quantization(bad, None)
    assert (
        str(e.value) == f"{bad / 'config.json'} quantization_config: config_groups.group_0.weights.{message}"
    )
