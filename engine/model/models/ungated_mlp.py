"""The ungated two-layer MLP of StarCoder2 (`c_fc`, `c_proj`), Phi-1.5 / Phi-2 (`fc1`, `fc2`), GPT-NeoX
(`dense_h_to_4h`, `dense_4h_to_h`), Arcee and Apertus (`up_proj`, `down_proj`):
hidden -> intermediate -> activation -> hidden, named as each family's checkpoints name the two projections
(so quantized checkpoints, skip lists and PEFT adapters find them). The activation runs as torch's, in the
model dtype, as transformers' activation modules do: GELU's tanh form for `gelu_pytorch_tanh`, `gelu_new` and
`gelu_fast` (the same formula), the exact one for `gelu`, `relu` (OPT), `relu2` (Arcee) as relu(x) squared, and `xielu`
(Apertus) with its learned scalars under `act_fn` (engine.model.layers.xielu).

Tensor parallelism: the first projection's columns and the second's rows split alike, so each rank
runs its slice of the activation (elementwise) and the second projection's partial sums meet in its all-reduce.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
from torch import nn

from engine.model.build_context import BuildContext, join_prefix
from engine.model.layers.linear import ColumnParallelLinear, RowParallelLinear
from engine.model.layers.xielu import XIELU
from engine.model_config import ModelConfig


class UngatedMLP(nn.Module):
    def __init__(
        self,
        config: ModelConfig,
        ctx: BuildContext,
        prefix: str,
        names: tuple[str, str],  # the checkpoint's (up, down) module names
        bias: bool,
    ) -> None:
        super().__init__()
        args = ctx.linear_args()
        up_name, down_name = names
        up = ColumnParallelLinear(
            config.hidden_size,
            config.intermediate_size,
            bias=bias,
            prefix=join_prefix(prefix, up_name),
            **args,
        )
        down = RowParallelLinear(
            config.intermediate_size,
            config.hidden_size,
            bias=bias,
            prefix=join_prefix(prefix, down_name),
            **args,
        )
        setattr(self, up_name, up)
        setattr(self, down_name, down)
        self._layers = (up, down)  # a tuple: the forward's handles, not registered a second time
        act = config.hidden_act
        # [num_tokens, intermediate / tp] -> the same; xIELU is a module (its scalars load from the checkpoint)
        self.act_fn: Callable[[torch.Tensor], torch.Tensor]
        if act == "xielu":
            self.act_fn = XIELU(ctx.dtype)
        elif act == "relu2":
            self.act_fn = _relu_squared
        elif act == "relu":  # OPT's
            self.act_fn = nn.functional.relu
        else:
            self.act_fn = partial(nn.functional.gelu, approximate="none" if act == "gelu" else "tanh")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [num_tokens, hidden] -> [num_tokens, hidden]."""
        up, down = self._layers
        return down(self.act_fn(up(x)))


def _relu_squared(x: torch.Tensor) -> torch.Tensor:
    return torch.square(nn.functional.relu(x))
