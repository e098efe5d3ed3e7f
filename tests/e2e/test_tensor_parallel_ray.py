"""The Ray backend: two CPU actors in a placement group on a local Ray instance the executor starts,
gloo between them, produce transformers' greedy tokens on Qwen3 (its LM head is the vocab-parallel
embedding, tied; per-head q/k norms); a bad adapter is the caller's error; a killed actor stops the
engine; shutdown kills the actors and stops Ray."""

from __future__ import annotations

from pathlib import Path

import pytest
import ray

from engine import LLM, LoRARequest, SamplingParams
from engine.errors import LoRAAdapterError
from tests.e2e.test_parity import _prompts, hf_greedy


def test_ray_backend_matches_transformers(tiny_model_dirs: dict[str, Path], tmp_path: Path) -> None:
    model_dir = tiny_model_dirs["qwen3"]
    prompts = _prompts()
    expected, _ = hf_greedy(model_dir, prompts)
    llm = LLM(
        str(model_dir),
        device="cpu",
        dtype="float32",
        tensor_parallel_size=2,
        distributed_executor_backend="ray",
        num_kv_blocks=64,
        max_num_batched_tokens=16,  # chunked prefill mixed with decodes
        enable_lora=True,
    )
    try:
        assert ray.is_initialized()
        params = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)
        outs = llm.generate(prompts, params, use_tqdm=False)
        assert [o.outputs[0].token_ids for o in outs] == expected
        # An adapter that cannot load is the caller's error, not the actors'.
        with pytest.raises(LoRAAdapterError, match="LoRA adapter 'missing'"):
            llm.llm_engine.add_lora(LoRARequest("missing", 1, str(tmp_path / "missing")))
        assert llm.llm_engine.executor.is_healthy
        # An actor that dies stops the engine at once (its peer is still waiting in a collective).
        executor = llm.llm_engine.executor
        ray.kill(executor._actors[1])  # type: ignore[attr-defined]
        out = llm.generate([[5, 6, 7]], params, use_tqdm=False)[0]
        assert out.outputs[0].finish_reason == "error"
        assert not executor.is_healthy
        assert "Ray actor died" in str(executor.failed)  # type: ignore[attr-defined]
    finally:
        llm.shutdown()
    assert not ray.is_initialized()
