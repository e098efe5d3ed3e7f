"""Adapters weir cannot serve are refused at load, each with an error naming the adapter and the
field at fault; a good one maps PEFT's q/k/v and gate/up onto weir's fused layers, scaling folded
into B (lora_alpha / r, or / sqrt(r) with rsLoRA) by the time B is in a slot."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from engine.errors import LoRAAdapterError
from engine.lora.adapter import load_adapter
from engine.lora.layers import lora_targets
from engine.lora.request import LoRARequest
from engine.model.models.llama import LlamaForCausalLM
from engine.model_config import ModelConfig

PREFIX = "base_model.model.model.layers.0"
SUPPORTED = "supported: down_proj, gate_proj, k_proj, o_proj, q_proj, up_proj, v_proj"


@pytest.fixture(scope="module")
def targets(tiny_llama_dir: Path) -> tuple[dict, dict]:
    """The tiny Llama's projections (hidden 64, 4 heads of 16, 2 KV heads, intermediate 128)."""
    return lora_targets(LlamaForCausalLM(ModelConfig.from_pretrained(tiny_llama_dir, device="cpu")))


def _write(path: Path, config: dict | None = None, tensors: dict | None = None) -> LoRARequest:
    path.mkdir(parents=True)
    base = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "k_proj", "up_proj"]}
    (path / "adapter_config.json").write_text(json.dumps({**base, **(config or {})}))
    if tensors is None:
        gen = torch.Generator().manual_seed(0)
        tensors = {
            f"{PREFIX}.self_attn.q_proj.lora_A.weight": torch.randn(4, 64, generator=gen),
            f"{PREFIX}.self_attn.q_proj.lora_B.weight": torch.randn(64, 4, generator=gen),
            f"{PREFIX}.self_attn.k_proj.lora_A.weight": torch.randn(4, 64, generator=gen),
            f"{PREFIX}.self_attn.k_proj.lora_B.weight": torch.randn(32, 4, generator=gen),
            f"{PREFIX}.mlp.up_proj.lora_A.weight": torch.randn(4, 64, generator=gen),
            f"{PREFIX}.mlp.up_proj.lora_B.weight": torch.randn(128, 4, generator=gen),
        }
    if tensors:
        save_file(tensors, str(path / "adapter_model.safetensors"))
    return LoRARequest("bad", 1, str(path))


def _load(targets: tuple[dict, dict], request: LoRARequest, max_rank: int = 16):  # noqa: ANN202
    return load_adapter(request, targets[0], targets[1], max_rank, torch.float32)


def test_a_good_adapter_maps_onto_the_fused_layers(targets: tuple[dict, dict], tmp_path: Path) -> None:
    request = _write(tmp_path / "good", {"use_rslora": True})
    adapter = _load(targets, request)
    assert sorted(adapter.layers) == ["model.layers.0.mlp.gate_up_proj", "model.layers.0.self_attn.qkv_proj"]
    qkv = adapter.layers["model.layers.0.self_attn.qkv_proj"]
    assert [a is not None for a in qkv.a] == [True, True, False]  # q, k; no v
    with safe_tensors(request) as f:
        b_k = f.get_tensor(f"{PREFIX}.self_attn.k_proj.lora_B.weight")
    torch.testing.assert_close(qkv.b[1] * qkv.scale[1], b_k * 8 / math.sqrt(4))  # rsLoRA: alpha / sqrt(r)
    gate_up = adapter.layers["model.layers.0.mlp.gate_up_proj"]
    assert gate_up.a[0] is None and gate_up.b[1].shape == (128, 4)


@pytest.mark.parametrize("file_dtype", [torch.bfloat16, torch.float32])
def test_a_bf16_slot_holds_b_scaled_then_rounded_once(
    tiny_llama_dir: Path, targets: tuple[dict, dict], tmp_path: Path, file_dtype: torch.dtype
) -> None:
    """A bf16 model: a bf16 file's B is scaled as the slot is written, an fp32 file's at load; either
    way the slot holds (B.float() * alpha / sqrt(r)).to(bfloat16) bit for bit, zero-padded."""
    from engine.lora.layers import LoRABatch, LoRALinear

    gen = torch.Generator().manual_seed(3)
    tensors = {
        f"{PREFIX}.self_attn.k_proj.lora_A.weight": torch.randn(4, 64, generator=gen).to(file_dtype),
        f"{PREFIX}.self_attn.k_proj.lora_B.weight": torch.randn(32, 4, generator=gen).to(file_dtype),
    }
    request = _write(
        tmp_path / "a", {"use_rslora": True, "lora_alpha": 7, "target_modules": ["k_proj"]}, tensors
    )
    adapter = load_adapter(request, targets[0], targets[1], 16, torch.bfloat16)
    qkv = adapter.layers["model.layers.0.self_attn.qkv_proj"]
    assert qkv.scale[1] == (3.5 if file_dtype == torch.bfloat16 else 1.0)
    model = LlamaForCausalLM(ModelConfig.from_pretrained(tiny_llama_dir, device="cpu"))
    layer = LoRALinear(
        model.get_submodule("model.layers.0.self_attn.qkv_proj"),
        LoRABatch(1, torch.device("cpu")),
        1,
        16,
        None,
        None,
    )
    image = torch.full((layer.slot_numel,), float("nan"), dtype=torch.bfloat16)
    layer.bind(image.view(1, -1), 0)
    layer.write_slot_image(image, qkv)
    b_k = tensors[f"{PREFIX}.self_attn.k_proj.lora_B.weight"]
    b_slot = layer.b_stacked[0, 64:96]  # k's rows (q has 64); its columns 16..31 (slice 1 of max rank 16)
    assert torch.equal(b_slot[:, 16:20], (b_k.float() * 3.5).to(torch.bfloat16))
    assert torch.equal(b_slot[:, 20:32], torch.zeros(32, 12, dtype=torch.bfloat16))  # rank padding
    assert torch.equal(
        layer.a_stacked[0, 16:20], tensors[f"{PREFIX}.self_attn.k_proj.lora_A.weight"].to(torch.bfloat16)
    )
    assert not layer.a_stacked[0, :16].isnan().any()  # q: no weights, zeroed


def safe_tensors(request: LoRARequest):  # noqa: ANN201
    from safetensors import safe_open

    return safe_open(str(Path(request.lora_path) / "adapter_model.safetensors"), framework="pt")


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"r": 32}, "r: rank 32 is above max_lora_rank 16 (raise --max-lora-rank)"),
        ({"use_dora": True}, "use_dora: DoRA adapters are not supported"),
        (
            {"modules_to_save": ["lm_head"]},
            "modules_to_save: ['lm_head'] would replace whole base-model modules per adapter; not supported",
        ),
        (
            {"target_modules": ["q_proj", "embed_tokens"]},
            f"target_modules: 'embed_tokens' is not supported ({SUPPORTED})",
        ),
        (
            {"target_modules": r".*(q_proj|lm_head)"},
            f"target_modules: lm_head is not supported ({SUPPORTED})",
        ),
        ({"bias": "all"}, "bias: 'all': adapters that train biases are not supported"),
        ({"peft_type": "IA3"}, "peft_type: 'IA3' adapters are not supported (only LORA)"),
        # JSON's NaN / Infinity: every output token of the adapter became 0
        ({"lora_alpha": float("nan")}, "lora_alpha: must be a finite number; got nan"),
        ({"lora_alpha": float("inf")}, "lora_alpha: must be a finite number; got inf"),
    ],
)
def test_bad_configs_are_refused(
    targets: tuple[dict, dict], tmp_path: Path, config: dict, message: str
) -> None:
    with pytest.raises(LoRAAdapterError) as info:
        _load(targets, _write(tmp_path / "a", config))
    assert str(info.value) == f"LoRA adapter 'bad': {message}"
    assert isinstance(info.value, ValueError) and info.value.param == "lora_request"


def test_bad_weights_are_refused(targets: tuple[dict, dict], tmp_path: Path) -> None:
    key = f"{PREFIX}.self_attn.q_proj.lora_A.weight"
    wrong_shape = {key: torch.zeros(4, 32), key.replace("lora_A", "lora_B"): torch.zeros(64, 4)}
    with pytest.raises(
        LoRAAdapterError,
        match=rf"^LoRA adapter 'bad': {key}: shape \(4, 32\) does not match the base model's \(4, 64\)$",
    ):
        _load(targets, _write(tmp_path / "shape", tensors=wrong_shape))
    lm_head = {"base_model.model.lm_head.lora_A.weight": torch.zeros(4, 64)}
    with pytest.raises(
        LoRAAdapterError,
        match=rf"base_model.model.lm_head.lora_A.weight: module 'lm_head' is not a projection weir applies LoRA to \({SUPPORTED}\)",
    ):
        _load(targets, _write(tmp_path / "head", tensors=lm_head))
    with pytest.raises(LoRAAdapterError, match=r"lora_B.weight: missing \(lora_A and lora_B come in pairs\)"):
        _load(targets, _write(tmp_path / "half", tensors={key: torch.zeros(4, 64)}))


def test_missing_and_pickled_files_are_refused(targets: tuple[dict, dict], tmp_path: Path) -> None:
    with pytest.raises(
        LoRAAdapterError, match=r"^LoRA adapter 'x': lora_path: '/nonexistent/x' is not a directory$"
    ):
        _load(targets, LoRARequest("x", 1, "/nonexistent/x"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(
        LoRAAdapterError, match=r"adapter_config.json: missing in '.*empty' \(not a PEFT adapter"
    ):
        _load(targets, LoRARequest("x", 1, str(tmp_path / "empty")))
    request = _write(tmp_path / "pickled", tensors={})
    (tmp_path / "pickled" / "adapter_model.bin").write_bytes(b"not unpickled")
    with pytest.raises(LoRAAdapterError) as info:
        _load(targets, request)
    assert str(info.value) == (
        "LoRA adapter 'bad': adapter_model.bin: pickled weights are never loaded (unpickling runs code); "
        "convert them to adapter_model.safetensors, e.g. PeftModel.from_pretrained(base, dir)"
        ".save_pretrained(out_dir, safe_serialization=True)"
    )
    (tmp_path / "pickled" / "adapter_model.bin").unlink()
    with pytest.raises(LoRAAdapterError, match=r"adapter_model.safetensors: missing in"):
        _load(targets, request)


def test_unreadable_and_non_finite_weights_are_refused(targets: tuple[dict, dict], tmp_path: Path) -> None:
    """A corrupt or truncated safetensors file raised safetensors' own error (no ValueError: the load
    route answered 500, --lora-modules crashed with a traceback); integer and NaN weights were served."""
    request = _write(tmp_path / "corrupt")
    weights = Path(request.lora_path) / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(LoRAAdapterError) as info:
        _load(targets, request)
    assert str(info.value) == (
        "LoRA adapter 'bad': adapter_model.safetensors: unreadable: Error while deserializing header: "
        "invalid header length"
    )
    key = f"{PREFIX}.self_attn.q_proj.lora_B.weight"
    a = torch.ones(4, 64)
    with pytest.raises(LoRAAdapterError, match=rf"^LoRA adapter 'bad': {key}: holds NaN or infinite values$"):
        _load(
            targets,
            _write(tmp_path / "nan", tensors={key.replace("B", "A"): a, key: torch.full((64, 4), torch.nan)}),
        )
    with pytest.raises(
        LoRAAdapterError,
        match=rf"^LoRA adapter 'bad': {key.replace('B', 'A')}: dtype int8 is not a floating-point dtype$",
    ):
        ints = {key.replace("B", "A"): a.to(torch.int8), key: torch.ones(64, 4, dtype=torch.int8)}
        _load(targets, _write(tmp_path / "int", tensors=ints))
