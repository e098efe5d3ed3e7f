"""WEIR_FOLD_NORM (engine/model/layers/folded_norm.py): at one-token steps the norms before qkv and gate_up go
to their FP8 GEMVs unapplied, the GEMV applying norm(x + residual) and storing the new residual. Inside a
whole engine: greedy tokens equal transformers' on the dequantized float32 weights, logprobs within 1e-4,
one sequence at a time (every decode step one token), with the folded launches seen and
no norm launched before qkv or gate_up at those steps. On CPU the layers get the GEMV a Hopper GPU would
run and the kernel runs under TRITON_INTERPRET=1 (float32: the norm's roundings to x's dtype are exact).
Then the fold's contract: applied once, materialized where the linear declines it, and who may fold."""

from __future__ import annotations

# isort: off
# First: it sets TRITON_INTERPRET before anything below can import triton.
from tests.ops.triton_interpreter import in_process, only_in_subprocess, rerun_in_fresh_process

# isort: on

import json
from pathlib import Path

import pytest
import torch

from tests.engine.quantization.checkpoints import write_fp8
from tests.engine.quantization.parity import assert_parity

LAUNCH = {"block_n": 64, "block_k": 64, "split_k": 1, "num_warps": 1}  # few programs: interpreted


@only_in_subprocess
def test_in_fresh_interpreter_process() -> None:
    rerun_in_fresh_process(__file__)


@in_process
@pytest.mark.parametrize("setting", ["default"])
def test_fp8_parity_with_the_norms_folded_into_the_gemvs(
    wide_llama_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, setting: str
) -> None:
    from engine.model.layers import norm as norm_module
    from engine.model.quantization import fp8
    from ops.triton import fp8_gemv as kernel

    load = fp8.Fp8LinearMethod.process_weights_after_loading

    def on_the_gemv(self: fp8.Fp8LinearMethod, layer) -> None:  # noqa: ANN001
        load(self, layer)
        layer.fp8_gemv = True  # as on a GPU with FP8 (one-token steps take the GEMV)

    folded: list[int] = []  # the K of each GEMV that applied a norm
    normed_rows: list[int] = []  # the rows of each norm launched
    real_gemv, real_norm = kernel.fp8_gemv, norm_module.RMSNorm.forward

    def gemv(x: torch.Tensor, *args: object, norm: object = None, **kwargs: object) -> torch.Tensor:
        if norm is not None:
            folded.append(x.shape[1])
        return real_gemv(x, *args, norm=norm, **kwargs)

    def norm_forward(self: norm_module.RMSNorm, x: torch.Tensor, *args: object, **kwargs: object):  # noqa: ANN202
        normed_rows.append(x.shape[0])
        return real_norm(self, x, *args, **kwargs)

    monkeypatch.setenv("WEIR_FOLD_NORM", "1")
    monkeypatch.setattr(fp8.Fp8LinearMethod, "process_weights_after_loading", on_the_gemv)
    monkeypatch.setattr(kernel, "fp8_gemv", gemv)
    monkeypatch.setattr(fp8, "fp8_gemv_launch", lambda *a: dict(LAUNCH))
    monkeypatch.setattr(norm_module.RMSNorm, "forward", norm_forward)
    quantized, reference = write_fp8(wide_llama_dir, tmp_path / "fp8", "channel", (64, 64), ())
    options = {"max_num_seqs": 1} if setting == "default" else {}
    assert_parity(quantized, reference, setting, "fp8", **options)
    config = json.loads((wide_llama_dir / "config.json").read_text())
    layers, hidden = config["num_hidden_layers"], config["hidden_size"]
    assert set(folded) == {hidden}  # qkv's and gate_up's input
    # A one-token step launches two norms (the first layer's input norm, which has no residual to add, and the
    # final one) and folds the other 2 x layers - 1, each into a GEMV.
    one_token_steps = normed_rows.count(1) // 2
    assert one_token_steps >= 10 and normed_rows.count(1) % 2 == 0
    assert len(folded) == (2 * layers - 1) * one_token_steps


@in_process
def test_a_folded_norm_is_applied_once_and_a_declining_linear_runs_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from engine.model.layers.folded_norm import FoldedNorm, folds_norm
    from engine.model.layers.linear import MergedColumnParallelLinear, QKVParallelLinear
    from engine.model.layers.norm import GemmaRMSNorm, RMSNorm
    from ops import reference

    gen = torch.Generator().manual_seed(0)
    norm = RMSNorm(16, 1e-6, torch.float32, prefix="model.layers.0.input_layernorm")
    norm.weight.data = torch.rand(16, generator=gen) + 0.5
    x, residual = torch.randn(1, 16, generator=gen), torch.randn(1, 16, generator=gen)
    qkv = QKVParallelLinear(16, 4, 2, 1, params_dtype=torch.float32)  # unquantized, eager: declines
    qkv.weight.data = torch.randn(16, 16, generator=gen)
    folded = FoldedNorm(x, residual, norm)
    with pytest.raises(
        RuntimeError, match="model.layers.0.input_layernorm: the folded norm was never applied"
    ):
        folded.new_residual()
    out = qkv(folded)
    expected_normed, expected_residual = reference.rms_norm(x, norm.weight, 1e-6, residual)
    torch.testing.assert_close(out, expected_normed @ qkv.weight.T)
    assert torch.equal(folded.new_residual(), expected_residual)
    with pytest.raises(RuntimeError, match="model.layers.0.input_layernorm: a folded norm is applied once"):
        folded.materialize()
    gate_up = MergedColumnParallelLinear(16, [8, 8], params_dtype=torch.float32)
    assert gate_up.silu_mul(FoldedNorm(x, residual, norm)) is None  # no gated path here: not consumed

    monkeypatch.setenv("WEIR_FOLD_NORM", "1")
    assert folds_norm(norm, qkv, 1)
    assert not folds_norm(norm, qkv, 2)  # one token only
    assert not folds_norm(GemmaRMSNorm(16), qkv, 1)  # Gemma's (1 + weight) norm rounds otherwise
    qkv.lora = torch.nn.Module()
    assert not folds_norm(norm, qkv, 1)  # an adapter's hook reads the normed rows
    qkv.lora = None
    monkeypatch.setenv("WEIR_FOLD_NORM", "0")
    assert not folds_norm(norm, qkv, 1)
