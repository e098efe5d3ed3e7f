"""A sliding layer whose window covers all of `max_model_len` needs no window in the kernels
(ModelConfig.layer_window gives None there), but it is still a sliding layer: Gemma 3's keep their own
rope (rope_local_base_freq, no scaling), not the global layers' scaled one. Served with max_model_len at
most the window, the tiny Gemma 3 must still give transformers' tokens."""

from __future__ import annotations

from pathlib import Path

from engine import LLM, SamplingParams
from engine.model_config import ModelConfig
from tests.e2e.test_parity import _prompts, hf_greedy
from tests.tiny_models import build_model


def test_gemma3_sliding_layers_keep_their_rope_when_the_window_covers_the_context(
    tiny_tokenizer_dir: Path, tmp_path: Path
) -> None:
    model_dir = build_model(
        "gemma3", tmp_path / "gemma3_w128", tiny_tokenizer_dir, config_overrides={"sliding_window": 128}
    )
    config = ModelConfig.from_pretrained(model_dir, max_model_len=128, device="cpu")
    assert config.layer_window(0) is None and config.layer_types[0] == "sliding_attention"
    assert config.layer_rope(0) == (10_000.0, None)  # the sliding layers' own, not the global (1e6, linear 2)
    assert config.layer_rope(1)[0] == 1_000_000.0
    prompts = _prompts()
    expected, _ = hf_greedy(model_dir, prompts)
    llm = LLM(str(model_dir), device="cpu", dtype="float32", max_model_len=128)
    outs = llm.generate(
        prompts, SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True), use_tqdm=False
    )
    assert [o.outputs[0].token_ids for o in outs] == expected
