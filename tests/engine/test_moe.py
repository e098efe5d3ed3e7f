"""Mixture-of-experts models beyond the parity tests (tests/e2e/test_parity.py, tests/engine/test_models.py
run Mixtral, Qwen2-MoE and Qwen3-MoE under every engine feature): which layers are MoE, both checkpoint
layouts (the hub's per-expert tensors, which save_pretrained writes, and transformers 5's fused one),
the error naming a missing expert tensor, each tensor-parallel rank's expert slices and their sum,
quantized checkpoints resolving, and LoRA on experts refused (an attention-only adapter matches PEFT)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from engine import LLM, LoRARequest, SamplingParams
from engine.config import EngineConfig
from engine.errors import LoRAAdapterError
from engine.model.build_context import BuildContext
from engine.model.models.moe import MoeForCausalLM, SparseMoeBlock
from engine.model.models.registry import get_model_class
from engine.model.weight_loader import load_weights
from engine.model_config import ModelConfig
from tests.engine.test_models import _direct_logits, _hf_logits, _prompt, _runner
from tests.peft_adapters import random_peft_adapter
from tests.tiny_models import hf_causal_lm

TOL = 1e-4


def test_moe_layers_and_routing_flags(tiny_model_dirs: dict[str, Path]) -> None:
    qwen3 = ModelConfig.from_pretrained(tiny_model_dirs["qwen3_moe"], device="cpu")
    assert (qwen3.num_experts, qwen3.num_experts_per_tok, qwen3.moe_intermediate_size) == (4, 2, 48)
    assert qwen3.moe_layers == (1,) and qwen3.norm_topk_prob and qwen3.qk_norm  # layer 0 in mlp_only_layers
    mixtral = ModelConfig.from_pretrained(tiny_model_dirs["mixtral"], device="cpu")
    assert (
        mixtral.moe_layers == (0, 1) and mixtral.norm_topk_prob and not mixtral.routing_weights_in_model_dtype
    )
    qwen2 = ModelConfig.from_pretrained(tiny_model_dirs["qwen2_moe"], device="cpu")
    assert qwen2.shared_expert_intermediate_size == 64 and qwen2.qkv_bias and not qwen2.norm_topk_prob
    cfg = json.loads((tiny_model_dirs["qwen2_moe"] / "config.json").read_text())
    # decoder_sparse_step 2: layers 1 and 3 of 4 are MoE; the hub's key name num_experts
    cfg.update(num_hidden_layers=4, decoder_sparse_step=2, num_experts=4)
    assert ModelConfig.from_dicts("m", cfg, device="cpu").moe_layers == (1, 3)
    with pytest.raises(
        ValueError, match=r"num_experts_per_tok \(5\) in m is larger than the number of experts \(4\)"
    ):
        ModelConfig.from_dicts("m", {**cfg, "num_experts_per_tok": 5}, device="cpu")


def _fused_layout(src: Path, dst: Path) -> Path:
    """`src` saved in transformers 5's in-memory layout: every layer's experts as two stacked tensors
    (mlp.experts.gate_up_proj [E, 2I, H], mlp.experts.down_proj [E, H, I]) and Mixtral's router under mlp."""
    shutil.copytree(src, dst)
    state = hf_causal_lm(str(src), dtype=torch.float32).state_dict()
    assert "model.layers.1.mlp.experts.gate_up_proj" in state
    save_file(
        {k: v.contiguous() for k, v in state.items()},
        str(dst / "model.safetensors"),
        metadata={"format": "pt"},
    )
    return dst


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe", "olmoe"])
def test_fused_checkpoint_layout_loads(tiny_model_dirs: dict[str, Path], family: str, tmp_path: Path) -> None:
    hub = load_file(str(tiny_model_dirs[family] / "model.safetensors"))
    gate = "block_sparse_moe.experts.0.w1" if family == "mixtral" else "mlp.experts.0.gate_proj"
    assert f"model.layers.1.{gate}.weight" in hub  # what save_pretrained writes: the hub's layout
    dst = _fused_layout(tiny_model_dirs[family], tmp_path / "fused")
    prompt = _prompt(20, seed=7)
    ours = _direct_logits(_runner(dst), prompt, 0, len(prompt), [0, 1])
    assert (ours - _hf_logits(tiny_model_dirs[family], prompt)).abs().max().item() < TOL


def test_missing_expert_tensor_names_the_hub_tensor(tiny_model_dirs: dict[str, Path], tmp_path: Path) -> None:
    dst = tmp_path / "missing"
    shutil.copytree(tiny_model_dirs["mixtral"], dst)
    tensors = load_file(str(dst / "model.safetensors"))
    del tensors["model.layers.1.block_sparse_moe.experts.2.w3.weight"]
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError) as err:
        _runner(dst)
    assert str(err.value).startswith(
        "missing weight for parameter model.layers.1.mlp.experts.w13_weight (shard (2, 'up')): checkpoint "
        "tensor model.layers.1.block_sparse_moe.experts.2.w3.weight not found in model.safetensors"
    )


def test_tensor_parallel_ranks_hold_their_expert_slices_and_sum_to_the_whole(
    tiny_model_dirs: dict[str, Path],
) -> None:
    """Qwen2-MoE over 2 ranks: each expert's gate/up rows and down columns split like the dense MLP's;
    the ranks' partial sums (routed experts + gated shared expert) add up to the unsharded block's output."""
    model_dir = tiny_model_dirs["qwen2_moe"]
    config = ModelConfig.from_pretrained(model_dir, dtype="float32", device="cpu")
    full = load_file(str(model_dir / "model.safetensors"))
    blocks = []
    for rank, size in ((0, 1), (0, 2), (1, 2)):
        model = MoeForCausalLM(config, BuildContext(tp_rank=rank, tp_size=size))
        load_weights(model, model_dir)
        blocks.append(model.model.layers[1].mlp)
    whole, *ranks = blocks
    for rank, block in enumerate(ranks):
        rows = slice(rank * 24, (rank + 1) * 24)  # 48 intermediate rows per expert, 24 a rank
        gate, up = (full[f"model.layers.1.mlp.experts.3.{n}.weight"] for n in ("gate_proj", "up_proj"))
        assert torch.equal(block.experts.w13_weight[3], torch.cat([gate[rows], up[rows]]))
        assert torch.equal(
            block.experts.w2_weight[3], full["model.layers.1.mlp.experts.3.down_proj.weight"][:, rows]
        )
    x = torch.randn(9, 64, generator=torch.Generator().manual_seed(0))

    def partial(block: SparseMoeBlock) -> torch.Tensor:  # the block's forward without the all-reduce
        weights, ids = block.gate.route(x)
        shared = torch.sigmoid(block.shared_expert_gate(x)) * block.shared_expert(x)
        return block.experts(x, weights, ids) + shared

    torch.testing.assert_close(partial(ranks[0]) + partial(ranks[1]), whole(x), rtol=1e-5, atol=1e-5)


def test_quantized_moe_checkpoints_resolve(tiny_model_dirs: dict[str, Path], tmp_path: Path) -> None:
    """FP8 and integer experts run (tests/engine/quantization/test_moe_fp8.py, test_moe_wna16.py, with
    the formats still refused); a GPTQ config and online fp8 resolve."""
    dst = tmp_path / "gptq"
    shutil.copytree(tiny_model_dirs["qwen3_moe"], dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg["quantization_config"] = {
        "quant_method": "gptq",
        "bits": 4,
        "group_size": 32,
        "desc_act": False,
        "sym": True,
    }
    (dst / "config.json").write_text(json.dumps(cfg))
    assert EngineConfig(model=str(dst), device="cpu").resolve().quant.method == "gptq"
    resolved = EngineConfig(model=str(tiny_model_dirs["mixtral"]), device="cpu", quantization="fp8").resolve()
    assert resolved.quant.method == "fp8"


def test_lora_attention_adapter_matches_peft_and_expert_targets_are_refused(
    tiny_model_dirs: dict[str, Path], tmp_path: Path
) -> None:
    from peft import PeftModel

    model_dir = tiny_model_dirs["qwen3_moe"]
    attn = random_peft_adapter(
        model_dir, tmp_path / "attn", target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]
    )
    prompts = [_prompt(n, seed=n) for n in (6, 19)]
    peft = PeftModel.from_pretrained(hf_causal_lm(str(model_dir), dtype=torch.float32), str(attn))
    base = hf_causal_lm(str(model_dir), dtype=torch.float32)
    expected, unadapted = [], []
    for prompt, out in ((p, o) for p in prompts for o in (expected, unadapted)):
        model = peft if out is expected else base
        ids = model.generate(
            torch.tensor([prompt]), max_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=0
        )
        out.append(ids[0, len(prompt) :].tolist())
    assert expected != unadapted  # the adapter changes the output
    llm = LLM(str(model_dir), device="cpu", dtype="float32", enable_lora=True, max_lora_rank=8)
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    request = LoRARequest("attn", 1, str(attn))
    outs = llm.generate(prompts, params, use_tqdm=False, lora_request=[request, request])
    assert [o.outputs[0].token_ids for o in outs] == expected

    # PEFT turns MLP targets of transformers 5's stacked experts into target_parameters
    experts = random_peft_adapter(
        model_dir, tmp_path / "experts", target_modules=["gate_proj", "up_proj", "down_proj"]
    )
    with pytest.raises(
        LoRAAdapterError,
        match=r"target_parameters.*targets MoE expert parameters: LoRA on MoE "
        "experts is not supported",
    ):
        llm.generate(
            prompts[:1], params, use_tqdm=False, lora_request=LoRARequest("experts", 2, str(experts))
        )
    # the hub's per-expert module names (adapters trained on per-expert Linear modules)
    per_expert = tmp_path / "per-expert"
    shutil.copytree(attn, per_expert)
    tensors = load_file(str(per_expert / "adapter_model.safetensors"))
    key = "base_model.model.model.layers.1.mlp.experts.0.gate_proj"
    tensors[f"{key}.lora_A.weight"], tensors[f"{key}.lora_B.weight"] = torch.zeros(4, 64), torch.zeros(48, 4)
    save_file(tensors, str(per_expert / "adapter_model.safetensors"))
    with pytest.raises(LoRAAdapterError) as err:
        llm.generate(
            prompts[:1], params, use_tqdm=False, lora_request=LoRARequest("per-expert", 3, str(per_expert))
        )
    assert "module 'model.layers.1.mlp.experts.0.gate_proj' is a mixture-of-experts module" in str(err.value)
    assert "LoRA on MoE experts is not supported" in str(err.value)
    # the router ("gate"): PEFT turns it into a target parameter too; the refusal names the router
    router = random_peft_adapter(model_dir, tmp_path / "router", target_modules=["gate"])
    with pytest.raises(LoRAAdapterError) as err:
        llm.generate(prompts[:1], params, use_tqdm=False, lora_request=LoRARequest("router", 4, str(router)))
    assert str(err.value).endswith(
        "target_parameters: ['gate.weight'] targets the MoE router: LoRA on the router is not supported"
    )


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe", "granite_moe", "olmoe"])
def test_router_matches_transformers_in_bfloat16(tiny_model_dirs: dict[str, Path], family: str) -> None:
    """The routing's dtype steps, which float32 parity cannot see: bf16 logits, float32 softmax and top-k,
    renormalised (GraniteMoe: top-k of the logits, then their softmax); Qwen's and GraniteMoe's weights
    rounded to bf16 (as transformers multiplies the experts by them), Mixtral's kept float32."""
    model_dir = tiny_model_dirs[family]
    hf = hf_causal_lm(str(model_dir), dtype=torch.bfloat16)
    layer = hf.model.layers[1]
    hf_router = layer.block_sparse_moe.router if family == "granite_moe" else layer.mlp.gate
    config = ModelConfig.from_pretrained(model_dir, dtype="bfloat16", device="cpu")
    model = get_model_class(config.architecture)(config, BuildContext(dtype=torch.bfloat16))  # OLMoE's own
    load_weights(model, model_dir)
    x = torch.randn(33, 64, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    weights, ids = model.model.layers[1].mlp.gate.route(x)
    _, hf_weights, hf_ids = hf_router(x)
    assert hf_weights.dtype == (torch.float32 if family == "mixtral" else torch.bfloat16)
    assert torch.equal(ids, hf_ids)
    assert weights.dtype == torch.float32 and torch.equal(weights, hf_weights.float())


def test_granite_moe_stacked_experts_split_per_rank_and_quantization_is_refused(
    tiny_model_dirs: dict[str, Path], tmp_path: Path
) -> None:
    """GraniteMoe's input_linear [E, 2 * I, H] (gate rows, then up) and output_linear [E, H, I] load into
    the stacked experts, each tensor-parallel rank its rows / columns; a quantized GraniteMoe checkpoint
    is refused at resolution (its experts load only from the float stacked tensors)."""
    model_dir = tiny_model_dirs["granite_moe"]
    config = ModelConfig.from_pretrained(model_dir, dtype="float32", device="cpu")
    assert config.softmax_after_topk and config.moe_layers == (0, 1) and config.residual_multiplier == 0.22
    full = load_file(str(model_dir / "model.safetensors"))
    w13, w2 = (full[f"model.layers.1.block_sparse_moe.{n}.weight"] for n in ("input_linear", "output_linear"))
    for rank in (0, 1):
        model = MoeForCausalLM(config, BuildContext(tp_rank=rank, tp_size=2))
        load_weights(model, model_dir)
        experts = model.model.layers[1].mlp.experts
        rows = slice(rank * 24, (rank + 1) * 24)  # 48 intermediate rows per expert, 24 a rank
        assert torch.equal(experts.w13_weight, torch.cat([w13[:, :48][:, rows], w13[:, 48:][:, rows]], dim=1))
        assert torch.equal(experts.w2_weight, w2[:, :, rows])
    dst = tmp_path / "gptq"
    shutil.copytree(model_dir, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "gptq", "bits": 4, "group_size": 32, "desc_act": False}
    (dst / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError) as err:
        EngineConfig(model=str(dst), device="cpu").resolve()
    assert str(err.value) == (
        f"quantization 'gptq' ({dst / 'config.json'} quantization_config) is not supported for "
        "GraniteMoeForCausalLM: its experts load only from the float stacked tensors (input_linear / "
        "output_linear); serve an unquantized checkpoint"
    )
