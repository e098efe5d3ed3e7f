"""Which quantization a checkpoint uses, and the refusals at start: each names the file or option,
the field and the value."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from engine.config import EngineConfig
from engine.model.quantization.awq import AWQConfig
from engine.model.quantization.detect import resolve_quantization
from engine.model.quantization.fp8 import Fp8Config
from engine.model.quantization.gptq import GPTQConfig

GPTQ = {"quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": True, "sym": False}


def _dir(tmp_path: Path, src: Path, quant: dict | None = None, extra: dict[str, dict] | None = None) -> Path:
    """A copy of `src`'s config.json (no weights: detection never reads them) with `quant` in it."""
    out = tmp_path / "m"
    out.mkdir()
    cfg = json.loads((src / "config.json").read_text())
    if quant is not None:
        cfg["quantization_config"] = quant
    (out / "config.json").write_text(json.dumps(cfg))
    for name, body in (extra or {}).items():
        (out / name).write_text(json.dumps(body))
    return out


def test_config_json_quantization_config(tmp_path: Path, tiny_llama_dir: Path) -> None:
    d = _dir(tmp_path, tiny_llama_dir, {**GPTQ, "checkpoint_format": "gptq_v2", "damp_percent": 0.1})
    method, source, config = resolve_quantization(d, None)
    assert method == "gptq"
    assert source == f"{d / 'config.json'} quantization_config"
    assert config == GPTQConfig(bits=4, group_size=128, desc_act=True, sym=False, checkpoint_format="gptq_v2")


def test_legacy_files(tmp_path: Path, tiny_llama_dir: Path) -> None:
    d = _dir(tmp_path, tiny_llama_dir, extra={"quantize_config.json": {"bits": 8, "group_size": -1}})
    assert resolve_quantization(d, None)[2] == GPTQConfig(8, -1, False, True, "gptq")
    shutil.rmtree(d)
    awq = {"zero_point": True, "q_group_size": 64, "w_bit": 4, "version": "GEMM"}
    d = _dir(tmp_path, tiny_llama_dir, extra={"quant_config.json": awq})
    assert resolve_quantization(d, "awq") == ("awq", str(d / "quant_config.json"), AWQConfig(group_size=64))


def test_unquantized_checkpoint(tiny_llama_dir: Path) -> None:
    assert resolve_quantization(tiny_llama_dir, None) == ("none", "", None)
    resolved = EngineConfig(model=str(tiny_llama_dir), device="cpu").resolve()
    assert (resolved.quant.method, resolved.quant.linear) == ("none", None)


@pytest.mark.parametrize(
    ("quant", "message"),
    [
        ({**GPTQ, "bits": 3}, r"bits=3 is not supported \(weir supports 4, 8\)"),
        ({**GPTQ, "group_size": 256}, r"group_size=256 is not supported \(weir supports -1, 32, 64, 128\)"),
        ({**GPTQ, "checkpoint_format": "marlin"}, r"checkpoint_format='marlin' is not supported"),
        ({**GPTQ, "sym": "yes"}, r"sym='yes' is not supported \(weir supports True, False\)"),
        ({**GPTQ, "lm_head": True}, r"lm_head=True is not supported \(a quantized lm_head\)"),
        ({**GPTQ, "dynamic": {"-:.*down": {}}}, r"dynamic=\{'-:\.\*down': \{\}\} is not supported"),
        (
            {"quant_method": "awq", "bits": 4, "group_size": 32, "zero_point": True},
            r"group_size=32 is not supported",
        ),
        (
            {"quant_method": "awq", "bits": 4, "group_size": 128, "version": "gemv"},
            r"version='gemv' is not supported",
        ),
        ({"quant_method": "awq", "bits": 4, "group_size": 128, "zero_point": False}, r"zero_point=False"),
        (
            {"quant_method": "bitsandbytes"},
            r"quant_method 'bitsandbytes' is not supported; weir reads gptq, awq, fp8, squeezellm, compressed-tensors$",
        ),
    ],
)
def test_unsupported_is_refused_at_start(
    tmp_path: Path, tiny_llama_dir: Path, quant: dict, message: str
) -> None:
    d = _dir(tmp_path, tiny_llama_dir, quant)
    with pytest.raises(ValueError, match=rf"^{d / 'config.json'} quantization_config: {message}"):
        EngineConfig(model=str(d), device="cpu").resolve()


def test_option_must_agree_with_the_checkpoint(tmp_path: Path, tiny_llama_dir: Path) -> None:
    with pytest.raises(
        ValueError,
        match=r"^quantization must be one of gptq, awq, fp8, squeezellm, compressed-tensors; got 'int3'",
    ):
        EngineConfig(model=str(tiny_llama_dir), quantization="int3")
    with pytest.raises(ValueError, match=r"^quantization='gptq', but .* has no quantization config"):
        EngineConfig(model=str(tiny_llama_dir), device="cpu", quantization="gptq").resolve()
    d = _dir(tmp_path, tiny_llama_dir, GPTQ)
    with pytest.raises(ValueError, match=r"^quantization='awq', but the checkpoint is quantized with 'gptq'"):
        EngineConfig(model=str(d), device="cpu", quantization="awq").resolve()
    assert EngineConfig(model=str(d), device="cpu", quantization="gptq").resolve().quant.method == "gptq"
    # fp8 is the one method weir applies to an unquantized checkpoint (online, per channel)
    online = EngineConfig(model=str(tiny_llama_dir), device="cpu", quantization="fp8").resolve().quant
    assert (online.method, online.linear) == ("fp8", Fp8Config(from_checkpoint=False))
