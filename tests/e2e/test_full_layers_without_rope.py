"""Command R7B (`Cohere2ForCausalLM`) and EXAONE 4.0 (`Exaone4ForCausalLM`) with windows rotate q/k only on
their sliding layers, and Granite 4.0 without `position_embedding_type` "rope" on none: those layers have no
position embedding (weir gives them an identity rotary table). The tiny families' parity matrix
(tests/e2e/test_parity.py) has them; here, rotating every layer changes the tokens, so the parity rests on it.
Granite 4.0's Mamba layers are refused naming them."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine import LLM, SamplingParams
from tests.e2e.test_parity import _prompts, hf_greedy
from tests.tiny_models import copy_with_config


@pytest.mark.parametrize("family", ["cohere2", "exaone4", "granite4_dense"])
def test_rope_on_the_full_layer_changes_the_tokens(
    tiny_model_dirs: dict[str, Path], family: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    model_dir = tiny_model_dirs[family]  # layer 0 sliding (rotates), layer 1 full (no position embedding)
    prompts = _prompts()[:4]
    expected, _ = hf_greedy(model_dir, _prompts())
    params = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)
    monkeypatch.setattr("engine.model_config.ModelConfig.layer_has_rope", lambda self, layer_idx: True)
    outs = LLM(str(model_dir), device="cpu", dtype="float32").generate(prompts, params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] != expected[:4]


def test_granite4_mamba_layers_are_refused(tiny_model_dirs: dict[str, Path], tmp_path: Path) -> None:
    model_dir = copy_with_config(
        tiny_model_dirs["granite4_dense"], tmp_path / "granite4_hybrid", layer_types=["mamba", "attention"]
    )
    with pytest.raises(
        ValueError, match=r"unsupported layer_types \['mamba', 'attention'\] in .* weir serves Granite 4.0"
    ):
        LLM(str(model_dir), device="cpu", dtype="float32")
