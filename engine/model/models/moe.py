"""The mixture-of-experts families: Mixtral, Qwen2-MoE, Qwen3-MoE and GraniteMoe (Granite's scalings
from the Llama layers, Mixtral's every-layer MoE, a softmax over the top_k router logits; GraniteMoeShared
adds an ungated shared MLP).

Each is the Llama decoder (engine.model.models.llama: attention, norms, rotary; Qwen3-MoE's q/k norm
and Qwen2-MoE's q/k/v bias by the same ModelConfig flags) whose MLP, in the layers listed in
`config.moe_layers`, is a SparseMoeBlock: a router picks top_k experts per token, the experts run as one
fused op, and Qwen2-MoE adds a shared expert scaled by a sigmoid gate. The other layers (Qwen's
`mlp_only_layers` / `decoder_sparse_step`) keep the dense MLP.

Checkpoint names: ours are `model.layers.N.mlp.{gate, experts, shared_expert, shared_expert_gate}` as in
the Qwen checkpoints; Mixtral's hub checkpoints say `block_sparse_moe` where we say `mlp`
(`checkpoint_renames`), and name their experts' projections w1 (gate), w3 (up), w2 (down).
"""

from __future__ import annotations

import torch
from torch import nn

from engine.model.build_context import BuildContext, join_prefix
from engine.model.layers.fused_moe import MIXTRAL_EXPERT_NAMES, QWEN_EXPERT_NAMES, FusedMoE
from engine.model.layers.moe_router import ReplicatedLinear, TopKRouter
from engine.model.models.llama import LlamaForCausalLM, LlamaMLP
from engine.model_config import ModelConfig


class SparseMoeBlock(nn.Module):
    def __init__(self, config: ModelConfig, ctx: BuildContext, prefix: str) -> None:
        super().__init__()
        self.tp_size = ctx.tp_size
        self.gate = TopKRouter(
            config.hidden_size,
            config.num_experts,
            config.num_experts_per_tok,
            renormalize=config.norm_topk_prob,
            weights_in_model_dtype=config.routing_weights_in_model_dtype,
            params_dtype=ctx.dtype,
            prefix=join_prefix(prefix, "gate"),
            softmax_after_topk=config.softmax_after_topk,
        )
        mixtral = config.architecture == "MixtralForCausalLM"
        self.experts = FusedMoE(
            config.num_experts,
            config.hidden_size,
            config.moe_intermediate_size,
            ctx.dtype,
            tp_rank=ctx.tp_rank,
            tp_size=ctx.tp_size,
            kernels=ctx.kernels,
            expert_names=MIXTRAL_EXPERT_NAMES if mixtral else QWEN_EXPERT_NAMES,
            prefix=join_prefix(prefix, "experts"),
            quant_config=ctx.quant_config,
            # the hub's name, which skip lists use: Mixtral's block_sparse_moe (checkpoint_renames)
            checkpoint_prefix=_hub_name(join_prefix(prefix, "experts")) if mixtral else None,
        )
        if config.shared_expert_intermediate_size:
            # Its down projection's partial sum joins the experts' before the block's one all-reduce.
            self.shared_expert: LlamaMLP | None = LlamaMLP(
                config,
                ctx,
                join_prefix(prefix, "shared_expert"),
                intermediate_size=config.shared_expert_intermediate_size,
                reduce_results=False,
            )
            self.shared_expert_gate: ReplicatedLinear | None = (
                ReplicatedLinear(config.hidden_size, 1, ctx.dtype, join_prefix(prefix, "shared_expert_gate"))
                if config.shared_expert_gated
                else None  # GraniteMoeShared: the shared MLP's output is added as it is
            )
        else:
            self.shared_expert = self.shared_expert_gate = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [num_tokens, hidden] -> [num_tokens, hidden]."""
        topk_weights, topk_ids = self.gate.route(x)  # [num_tokens, top_k] each
        out = self.experts(x, topk_weights, topk_ids)  # this rank's partial sum
        if self.shared_expert is not None:
            shared = self.shared_expert(x)  # this rank's partial sum too
            if self.shared_expert_gate is not None:
                # sigmoid(gate) scales each rank's partial sum: the all-reduce then sums the scaled whole.
                shared = torch.sigmoid(self.shared_expert_gate(x)) * shared
            out = out + shared
        if self.tp_size > 1:
            torch.distributed.all_reduce(out)
        return out


def _hub_name(name: str) -> str:
    """Our `model.layers.N.mlp...` as Mixtral's checkpoints name it (`block_sparse_moe`)."""
    return name.replace(".mlp.", ".block_sparse_moe.")


def moe_or_dense_mlp(config: ModelConfig, layer_idx: int, ctx: BuildContext, prefix: str) -> nn.Module:
    if layer_idx in config.moe_layers:
        return SparseMoeBlock(config, ctx, prefix)
    return LlamaMLP(config, ctx, prefix)


class MoeForCausalLM(LlamaForCausalLM):
    build_mlp = staticmethod(moe_or_dense_mlp)

    def __init__(self, config: ModelConfig, ctx: BuildContext | None = None, prefix: str = "") -> None:
        super().__init__(config, ctx, prefix)
        if config.architecture == "MixtralForCausalLM":  # the hub's name for the MoE block
            self.checkpoint_renames = {".block_sparse_moe.": ".mlp."}
        elif config.architecture == "GraniteMoeHybridForCausalLM" and not config.is_moe:
            # a dense Granite 4.0: every layer's MLP is the shared one, its input_linear gate rows then up
            self.checkpoint_renames = {
                ".shared_mlp.input_linear.": ".mlp.gate_up_proj.",
                ".shared_mlp.output_linear.": ".mlp.down_proj.",
            }
        elif config.architecture in (
            "GraniteMoeForCausalLM",
            "GraniteMoeSharedForCausalLM",
            "GraniteMoeHybridForCausalLM",
        ):
            # GraniteMoe's checkpoints (hub and transformers 5's save alike) stack every expert in one
            # tensor per layer: input_linear [E, 2 * I, H] (gate rows, then up), output_linear [E, H, I]:
            # the stacked layout FusedMoE loads as transformers 5's fused gate_up_proj / down_proj.
            self.checkpoint_renames = {
                ".block_sparse_moe.input_linear.weight": ".mlp.experts.gate_up_proj",
                ".block_sparse_moe.output_linear.weight": ".mlp.experts.down_proj",
                ".block_sparse_moe.router.layer.": ".mlp.gate.",
                # GraniteMoeShared's shared MLP: input_linear [2 * S, H] is gate rows then up rows, the
                # fused gate_up_proj's layout (its loader splits a whole tensor into the two shards).
                ".shared_mlp.input_linear.": ".mlp.shared_expert.gate_up_proj.",
                ".shared_mlp.output_linear.": ".mlp.shared_expert.down_proj.",
            }
