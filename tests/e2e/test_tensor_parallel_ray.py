"""The Ray backend: two CPU actors in a placement group on a local Ray instance the executor starts,
gloo between them, produce transformers' greedy tokens; shutdown kills the actors and stops Ray."""

from __future__ import annotations

from pathlib import Path

import ray

from engine import LLM, SamplingParams
from tests.e2e.test_parity import _prompts, hf_greedy


def test_ray_backend_matches_transformers(tiny_model_dirs: dict[str, Path]) -> None:
    model_dir = tiny_model_dirs["llama"]
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
    )
    try:
        assert ray.is_initialized()
        params = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)
        outs = llm.generate(prompts, params, use_tqdm=False)
        assert [o.outputs[0].token_ids for o in outs] == expected
    finally:
        llm.shutdown()
    assert not ray.is_initialized()
