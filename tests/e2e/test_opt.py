"""OPT (`OPTForCausalLM`) beyond the tiny families' parity matrix (tests/e2e/test_parity.py, which has it): the
hub's opt-125m layout (a base OPTModel's file: `decoder.` without `model.`) loads to the same tokens, a PEFT
adapter on its six projections gives PEFT's tokens, and the layouts weir does not serve are refused at start
naming their field."""

from __future__ import annotations

from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from engine import LLM, SamplingParams
from tests.e2e.test_parity import _prompts, hf_greedy
from tests.peft_adapters import assert_engine_matches_peft, random_peft_adapter
from tests.tiny_models import copy_with_config

PARAMS = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)


def test_hub_layout_without_the_model_prefix_loads(tiny_model_dirs: dict[str, Path], tmp_path: Path) -> None:
    src = tiny_model_dirs["opt"]
    dst = copy_with_config(src, tmp_path / "hub")
    tensors = load_file(str(src / "model.safetensors"))
    assert "model.decoder.layers.0.final_layer_norm.weight" in tensors  # the layer's; the decoder has its own
    assert "model.decoder.final_layer_norm.weight" in tensors
    hub = {k.removeprefix("model."): v for k, v in tensors.items()}
    save_file(hub, str(dst / "model.safetensors"), metadata={"format": "pt"})
    prompts = _prompts()[:3]
    expected, _ = hf_greedy(src, _prompts())
    outs = LLM(str(dst), device="cpu", dtype="float32").generate(prompts, PARAMS, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == expected[:3]


def test_peft_adapter_matches_peft(tiny_model_dirs: dict[str, Path], tmp_path: Path) -> None:
    """q/k/v_proj, out_proj, fc1 and fc2, under the checkpoint's names (`model.decoder.layers.N.fc1`)."""
    model_dir = tiny_model_dirs["opt"]
    targets = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]
    adapter = random_peft_adapter(model_dir, tmp_path / "a", targets)
    assert_engine_matches_peft(model_dir, adapter, _prompts()[:3])


@pytest.mark.parametrize(
    ("config", "kw", "message"),
    [
        (
            {"do_layer_norm_before": False},
            {},
            r"unsupported do_layer_norm_before False in .*config.json for OPTForCausalLM: weir serves OPT's "
            r"pre-LayerNorm layout",
        ),
        (
            {"word_embed_proj_dim": 32},
            {},
            r"unsupported word_embed_proj_dim 32 in .*config.json for OPTForCausalLM",
        ),
        (
            {"_remove_final_layer_norm": True},
            {},
            r"unsupported _remove_final_layer_norm True in .*config.json",
        ),
        (
            {},
            {"quantization": "fp8"},
            r"quantization 'fp8' \(.*\) is not supported for OPTForCausalLM: weir serves float OPTForCausalLM checkpoints only",
        ),
    ],
)
def test_unsupported_layouts_are_refused(
    tiny_model_dirs: dict[str, Path], tmp_path: Path, config: dict, kw: dict, message: str
) -> None:
    dst = copy_with_config(tiny_model_dirs["opt"], tmp_path / "m", **config)
    with pytest.raises(ValueError, match=message):
        LLM(str(dst), device="cpu", dtype="float32", **kw)
