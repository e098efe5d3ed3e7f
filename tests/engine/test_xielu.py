"""xIELU (Apertus's activation, engine/model/layers/xielu.py) against transformers' XIELUActivation, its
Python form, with the same four scalars: equal bit for bit on both branches and around eps."""

from __future__ import annotations

import torch

from engine.model.layers.xielu import XIELU


def test_xielu_matches_transformers() -> None:
    from transformers.activations import XIELUActivation

    theirs = XIELUActivation(alpha_p_init=1.3, alpha_n_init=0.9, beta=0.4, eps=-1e-5, dtype=torch.float32)
    ours = XIELU(torch.float32)
    with torch.no_grad():
        for name in ("alpha_p", "alpha_n", "beta", "eps"):
            getattr(ours, name).copy_(getattr(theirs, name))
    x = torch.cat(
        [
            torch.randn(4, 64, generator=torch.Generator().manual_seed(0)) * 3,
            torch.tensor([[-2e-5, -1e-5, 0.0, 1e-6]]).repeat(4, 16),
        ]
    )
    assert torch.equal(ours(x), theirs._xielu_python(x))
    assert not torch.equal(ours(x), XIELU(torch.float32)(x))  # the loaded scalars are what it uses
