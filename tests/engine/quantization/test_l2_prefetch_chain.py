"""engine/model/quantization/l2_prefetch_chain.py: which weights each 4-bit projection's GEMV asks L2 for
(WEIR_L2_PREFETCH=1), and its settings."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from engine.config import EngineConfig
from engine.model.quantization.l2_prefetch_chain import (
    l2_prefetch_bytes,
    l2_prefetch_enabled,
    link_l2_prefetch,
)
from engine.worker.model_runner import ModelRunner


def _proj(four_bit: bool, rows: int) -> nn.Module:
    m = nn.Module()
    if four_bit:
        m.qweight = torch.arange(rows * 8, dtype=torch.int32).reshape(rows, 8)
        m.wna16_bits = 4
    else:
        m.weight = torch.ones(rows, 8, dtype=torch.bfloat16)
    return m


def _model(four_bit: list[bool]) -> nn.Module:
    """Layers of (self_attn: qkv_proj, o_proj; mlp: gate_up_proj, down_proj), registered in that order."""
    model, flags = nn.Module(), iter(four_bit)
    model.layers = nn.ModuleList()
    for i in range(len(four_bit) // 4):
        layer = nn.Module()
        layer.self_attn, layer.mlp = nn.Module(), nn.Module()
        layer.self_attn.qkv_proj = _proj(next(flags), 10 + i)
        layer.self_attn.o_proj = _proj(next(flags), 20 + i)
        layer.mlp.gate_up_proj = _proj(next(flags), 30 + i)
        layer.mlp.down_proj = _proj(next(flags), 40 + i)
        model.layers.append(layer)
    return model


def test_each_projection_points_at_the_next_ones_weight() -> None:
    """qkv -> o -> gate_up -> down -> the next layer's qkv, 4-bit (qweight) or not (weight); the last
    down gets nothing; the views share the weights' storage and stop at max_bytes (16-byte multiples)."""
    model = _model([True, True, True, True, True, False, True, True])
    assert link_l2_prefetch(model, max_bytes=200) == 7  # all but the last
    first, second = model.layers
    order = [first.self_attn.qkv_proj, first.self_attn.o_proj, first.mlp.gate_up_proj, first.mlp.down_proj,
             second.self_attn.qkv_proj, second.self_attn.o_proj, second.mlp.gate_up_proj, second.mlp.down_proj]  # fmt: skip
    for current, following in zip(order, order[1:], strict=False):
        view = current.l2_prefetch
        target = getattr(following, "qweight", None)
        target = following.weight if target is None else target
        assert view.dtype == torch.uint8 and view.dim() == 1
        assert view.data_ptr() == target.data_ptr()  # no copy
        assert view.numel() == min(192, target.numel() * target.element_size())
    assert not hasattr(second.mlp.down_proj, "l2_prefetch")  # the last: nothing after it here
    assert torch.equal(first.mlp.down_proj.l2_prefetch[:4], torch.tensor([0, 0, 0, 0], dtype=torch.uint8))
    assert torch.equal(
        first.self_attn.qkv_proj.l2_prefetch[4:8], torch.tensor([1, 0, 0, 0], dtype=torch.uint8)
    )


def test_settings_and_their_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WEIR_L2_PREFETCH", raising=False)
    monkeypatch.delenv("WEIR_L2_PREFETCH_MB", raising=False)
    assert l2_prefetch_bytes() == 16 << 20
    monkeypatch.setenv("WEIR_L2_PREFETCH_MB", "0.5")
    assert l2_prefetch_bytes() == 1 << 19
    for bad in ("0", "65", "lots"):
        monkeypatch.setenv("WEIR_L2_PREFETCH_MB", bad)
        with pytest.raises(
            ValueError, match=f"WEIR_L2_PREFETCH_MB must be a number in \\(0, 64\\]; got '{bad}'"
        ):
            l2_prefetch_bytes()
    monkeypatch.setenv("WEIR_L2_PREFETCH", "1")
    assert not l2_prefetch_enabled(torch.device("cpu"))  # the bulk prefetch is sm_90 PTX
    monkeypatch.setenv("WEIR_L2_PREFETCH", "on")
    with pytest.raises(ValueError, match=r"WEIR_L2_PREFETCH must be 0 or 1 \(unset: 0\); got 'on'"):
        l2_prefetch_enabled(torch.device("cpu"))


def test_the_runner_refuses_a_bad_setting_on_any_device(
    tiny_model_dirs: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WEIR_L2_PREFETCH_MB", "-3")
    config = EngineConfig(model=str(tiny_model_dirs["llama"]), device="cpu", dtype="float32", num_kv_blocks=8)
    runner = ModelRunner(config.resolve())
    with pytest.raises(ValueError, match="WEIR_L2_PREFETCH_MB must be a number in \\(0, 64\\]; got '-3'"):
        runner.load_model()


def test_a_plain_gate_up_is_asked_for_from_both_halves() -> None:
    """A [gate; up] weight stored [out, in] (bf16, FP8): the gated GEMV reads gate row i beside up row i,
    so o_proj asks for the start of each half, max_bytes / 2 each ([2, n] view, rows a half apart)."""
    model = _model([False] * 4)
    assert link_l2_prefetch(model, max_bytes=64) == 3
    layer = model.layers[0]
    view = layer.self_attn.o_proj.l2_prefetch
    weight = layer.mlp.gate_up_proj.weight  # [30, 8] bf16: 480 bytes, halves of 240
    assert view.shape == (2, 32) and view.stride() == (240, 1)
    assert view.data_ptr() == weight.data_ptr()
    assert layer.self_attn.qkv_proj.l2_prefetch.dim() == 1  # o_proj's weight: one range
