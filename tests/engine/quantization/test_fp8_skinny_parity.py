"""FP8 weights through the tensor-core skinny GEMM at 3-16 tokens (engine/model/quantization/fp8.py, the path
Hopper GPUs take by default), inside a whole engine: greedy tokens equal transformers' on the dequantized
float32 weights, logprobs within 1e-4, by default (four sequences decode together: 4-token steps) and under
chunked prefill (7-token mixed steps). On CPU the layers get the launch a Hopper GPU would plan (here a small
one) and the kernel runs under TRITON_INTERPRET=1; float32 x multiplies exactly, as the GPU engine check's
float32 models do. (The GPU: loadtest/gpu_feature_check.py part d, FP8 checkpoints in fp16 / bf16.)"""

from __future__ import annotations

# isort: off
# First: it sets TRITON_INTERPRET before anything below can import triton.
from tests.ops.triton_interpreter import in_process, only_in_subprocess, rerun_in_fresh_process

# isort: on

from pathlib import Path

import pytest

from tests.engine.quantization.checkpoints import write_fp8
from tests.engine.quantization.parity import assert_parity

LAUNCH = {
    "block_n": 64,
    "block_k": 64,
    "split_k": 2,
    "num_warps": 4,
    "num_stages": 2,
}  # few programs: interpreted


@only_in_subprocess
def test_in_fresh_interpreter_process() -> None:
    rerun_in_fresh_process(__file__)


@in_process
@pytest.mark.parametrize("setting", ["default", "chunked_prefill"])
def test_fp8_parity_through_the_skinny_gemm(
    wide_llama_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, setting: str
) -> None:
    from engine.model.quantization import fp8
    from ops.triton import skinny_gemm as kernel

    load = fp8.Fp8LinearMethod.process_weights_after_loading

    def with_the_skinny_launch(self: fp8.Fp8LinearMethod, layer) -> None:  # noqa: ANN001
        load(self, layer)
        layer.fp8_skinny = dict(LAUNCH)  # what plan_fp8_skinny gives a Hopper layer, at a CPU-sized tile

    rows: list[int] = []
    real = kernel.skinny_gemm
    monkeypatch.setattr(fp8.Fp8LinearMethod, "process_weights_after_loading", with_the_skinny_launch)
    monkeypatch.setattr(kernel, "skinny_gemm", lambda x, *a, **k: rows.append(x.shape[0]) or real(x, *a, **k))
    quantized, reference = write_fp8(wide_llama_dir, tmp_path / "fp8", "channel", (64, 64), ())
    assert_parity(quantized, reference, setting, "fp8")
    assert rows and all(3 <= m <= 16 for m in rows)
    assert 4 in rows if setting == "default" else 7 in rows  # the 4-sequence decode / the 7-token budget
