"""What every family's `*ForCausalLM` shares: its decoder (`model`, built by the family), the LM head
(tied to the decoder's embedding when the config says), the forward to the last hidden states, and
the logits. A family overrides `compute_logits` only to post-process them (Gemma 2's softcap,
Granite's logits_scaling).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from engine.model.build_context import BuildContext, join_prefix
from engine.model.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from engine.model_config import ModelConfig

# (config, ctx, prefix) -> the decoder: embed_tokens, the layers and the final norm
DecoderBuilder = Callable[[ModelConfig, BuildContext, str], nn.Module]


def token_embedding(config: ModelConfig, ctx: BuildContext, prefix: str) -> VocabParallelEmbedding:
    """A decoder's `embed_tokens` (`prefix`: the decoder's), its vocabulary split over the ranks."""
    return VocabParallelEmbedding(
        config.vocab_size,
        config.hidden_size,
        ctx.dtype,
        tp_rank=ctx.tp_rank,
        tp_size=ctx.tp_size,
        prefix=join_prefix(prefix, "embed_tokens"),
    )


class DecoderForCausalLM(nn.Module):
    # fused parameter -> (checkpoint module name, shard_id) it is loaded from, in order.
    packed_modules_mapping: dict[str, list[tuple[str, str | int]]] = {
        "qkv_proj": [("q_proj", "q"), ("k_proj", "k"), ("v_proj", "v")],
        "gate_up_proj": [("gate_proj", 0), ("up_proj", 1)],
    }
    # checkpoint name fragment -> ours, applied to every tensor name before the mapping above
    checkpoint_renames: dict[str, str] = {}

    def __init__(
        self, config: ModelConfig, ctx: BuildContext, prefix: str, build_decoder: DecoderBuilder
    ) -> None:
        super().__init__()
        self.config = config
        self.model = build_decoder(config, ctx, join_prefix(prefix, "model"))
        self.lm_head = ParallelLMHead(
            config.vocab_size,
            config.hidden_size,
            ctx.dtype,
            tp_rank=ctx.tp_rank,
            tp_size=ctx.tp_size,
            prefix=join_prefix(prefix, "lm_head"),
            bias=config.lm_head_bias,  # Phi-1.5 / Phi-2
        )
        if config.tie_word_embeddings:
            self.lm_head.tie_to(self.model.embed_tokens)

    def forward(
        self,
        input_ids: torch.Tensor,  # [num_tokens] int64
        positions: torch.Tensor,  # [num_tokens] int64
    ) -> torch.Tensor:  # [num_tokens, hidden]
        return self.model(input_ids, positions)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[num_rows, hidden] -> [num_rows, vocab_size] float32."""
        return self.lm_head.logits(hidden)
