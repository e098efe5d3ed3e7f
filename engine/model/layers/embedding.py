"""Token embedding and LM head, split along the vocabulary for tensor parallelism (tp_size=1 default).

Each rank holds rows [tp_rank * rows_per_rank, +rows_per_rank) of the (padded) vocabulary; rows past
the real vocabulary are zero. A tied LM head shares the embedding's Parameter (see `tie_to`).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from engine.model.checkpoint_slice import materialize
from engine.model.parameter import WeightShapeError, set_weight_attrs


class VocabParallelEmbedding(nn.Module):
    accepts_checkpoint_slices = True  # its loader only narrows (engine.model.checkpoint_slice)

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        params_dtype: torch.dtype | None = None,
        tp_rank: int = 0,
        tp_size: int = 1,
        prefix: str = "",
    ) -> None:
        super().__init__()
        self.prefix = prefix
        self.num_embeddings = num_embeddings
        self.embedding_dim = embedding_dim
        self.tp_rank = tp_rank
        self.tp_size = tp_size
        self.rows_per_rank = -(-num_embeddings // tp_size)
        self.vocab_start = tp_rank * self.rows_per_rank
        self.vocab_end = min(self.vocab_start + self.rows_per_rank, num_embeddings)
        dtype = params_dtype or torch.get_default_dtype()
        # [rows_per_rank, embedding_dim]
        self.weight = nn.Parameter(
            torch.empty(self.rows_per_rank, embedding_dim, dtype=dtype), requires_grad=False
        )
        set_weight_attrs(self.weight, {"output_dim": 0, "weight_loader": self.weight_loader})

    def weight_loader(self, param: torch.Tensor, loaded_weight: torch.Tensor, shard_id: Any = None) -> None:
        if shard_id is not None:
            raise ValueError(f"{type(self).__name__} takes no shard_id; got {shard_id!r}")
        expected = (self.num_embeddings, self.embedding_dim)
        if tuple(loaded_weight.shape) != expected:
            raise WeightShapeError(expected, tuple(loaded_weight.shape))
        n = self.vocab_end - self.vocab_start
        param.data[:n].copy_(materialize(loaded_weight.narrow(0, self.vocab_start, n)))
        param.data[n:].zero_()

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:  # [num_tokens] -> [num_tokens, dim]
        if self.tp_size == 1:
            return F.embedding(input_ids, self.weight)
        in_range = (input_ids >= self.vocab_start) & (input_ids < self.vocab_end)
        local_ids = torch.where(in_range, input_ids - self.vocab_start, 0)
        out = F.embedding(local_ids, self.weight) * in_range.unsqueeze(-1).to(self.weight.dtype)
        torch.distributed.all_reduce(out)
        return out


class ParallelLMHead(VocabParallelEmbedding):
    """The output projection hidden -> vocabulary logits. Not called as a module: see `logits`.
    `bias` (Phi-1.5 / Phi-2's head): one per vocabulary row, split over the ranks as the rows are."""

    def __init__(self, *args: Any, bias: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.bias: nn.Parameter | None = None
        if bias:
            # [rows_per_rank]; the padding rows' bias stays 0
            self.bias = nn.Parameter(
                torch.zeros(self.rows_per_rank, dtype=self.weight.dtype), requires_grad=False
            )
            set_weight_attrs(self.bias, {"output_dim": 0, "weight_loader": self.bias_loader})

    def bias_loader(self, param: torch.Tensor, loaded_weight: torch.Tensor, shard_id: Any = None) -> None:
        if shard_id is not None:
            raise ValueError(f"{type(self).__name__} takes no shard_id; got {shard_id!r}")
        if tuple(loaded_weight.shape) != (self.num_embeddings,):
            raise WeightShapeError((self.num_embeddings,), tuple(loaded_weight.shape))
        n = self.vocab_end - self.vocab_start
        param.data[:n].copy_(materialize(loaded_weight.narrow(0, self.vocab_start, n)))
        param.data[n:].zero_()

    def tie_to(self, embedding: VocabParallelEmbedding) -> None:
        """Share the embedding matrix (tie_word_embeddings): one Parameter, loaded once."""
        self.weight = embedding.weight

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[num_rows, hidden] -> [num_rows, num_embeddings] float32 (padding columns dropped)."""
        logits = F.linear(hidden, self.weight, self.bias)  # [num_rows, rows_per_rank]
        if self.tp_size > 1:
            parts = [torch.empty_like(logits) for _ in range(self.tp_size)]
            torch.distributed.all_gather(parts, logits)
            logits = torch.cat(parts, dim=-1)
        return logits[:, : self.num_embeddings].float()

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("ParallelLMHead is applied through .logits(hidden), not called as a module")
