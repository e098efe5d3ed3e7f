"""compressed-tensors checkpoints (quant_method "compressed-tensors", as llm-compressor writes them;
reference: compressed-tensors, src/compressed_tensors/compressors/quantized_compressors/
pack_quantized.py pack_to_int32 and quantization/quant_args.py; vLLM's CompressedTensorsConfig):
pack-quantized W4A16/W8A16 and float-quantized FP8 load to exactly the dequantized weights and run
like transformers on them; unsupported fields are refused naming their path. The checkpoints are
written by tests/engine/quantization/checkpoints.py (write_compressed_tensors): the compressed-tensors
package itself is not installed here (its compressors need the model in transformers' quantized
classes), so the layout follows its pack_to_int32 and the checkpoints the test writes pin it."""

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
        (lambda q: _group(q)["weights"].update(symmetric=False), "config_groups.group_0.weights.symmetric=False is not supported (symmetric weights (no zero points))"),
        (lambda q: _group(q)["weights"].update(actorder="group"), "config_groups.group_0.weights.actorder='group' is not supported (static weights in group order)"),
        (lambda q: _group(q)["weights"].update(group_size=16), "config_groups.group_0.weights.group_size=16 is not supported (32, 64 or 128)"),
        (lambda q: _group(q)["weights"].update(num_bits=2), "config_groups.group_0.weights.num_bits=2 is not supported (int 4 or 8 when pack-quantized)"),
        (lambda q: _group(q).update(input_activations={"num_bits": 8, "type": "int", "dynamic": True}), "config_groups.group_0.input_activations={'num_bits': 8, 'type': 'int', 'dynamic': True} is not supported (weight-only W4A16/W8A16 when pack-quantized)"),
        (lambda q: q["config_groups"].update(group_1=_group(q)), "config_groups=['group_0', 'group_1'] is not supported (one scheme for every Linear layer)"),
        (lambda q: q.update(format="marlin-24"), "format='marlin-24' is not supported (pack-quantized or float-quantized)"),
        (lambda q: q.update(sparsity_config={"format": "sparse-bitmask"}), "sparsity_config.format='sparse-bitmask' is not supported (sparse weights)"),
        (lambda q: q.update(kv_cache_scheme={"num_bits": 8, "type": "float", "strategy": "attn_head"}), "kv_cache_scheme.strategy='attn_head' is not supported (one scale per tensor)"),
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


def test_kv_cache_scheme_alone_loads_its_scales(tiny_llama_dir: Path, tmp_path: Path) -> None:
    """A checkpoint quantizing only the KV cache (kv_cache_scheme, no config_groups): float linears,
    and with an fp8 cache the k_scale / v_scale llm-compressor wrote."""
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
            "strategy": "tensor",
            "dynamic": False,
            "symmetric": True,
        },
    }
    (ckpt / "config.json").write_text(json.dumps(cfg))
    tensors = load_file(str(ckpt / "model.safetensors"))
    for i in range(2):
        tensors[f"model.layers.{i}.self_attn.k_scale"] = torch.tensor(0.125 * (i + 1))
        tensors[f"model.layers.{i}.self_attn.v_scale"] = torch.tensor(0.5)
    save_file(tensors, str(ckpt / "model.safetensors"))
    llm = LLM(str(ckpt), device="cpu", dtype="float32", kv_cache_dtype="fp8", num_kv_blocks=16)
    assert llm.llm_engine.config.quant.method == "compressed-tensors"
    layers = llm.llm_engine.executor.runner.model.model.layers  # type: ignore[attr-defined]
    assert [(layer.self_attn.attn.k_scale, layer.self_attn.attn.v_scale) for layer in layers] == [
        (0.125, 0.5),
        (0.25, 0.5),
    ]
    assert layers[0].mlp.down_proj.weight.dtype == torch.float32
    llm.shutdown()
