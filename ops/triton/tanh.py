"""tanh for Triton kernels (attention logit softcapping, the tanh-approximate GELU).

From exp2, not libdevice: the Triton interpreter (the tests' CPU path) has no libdevice tanh.
tanh(x) = sign(x) * (1 - e) / (1 + e) with e = exp(-2|x|) in (0, 1]: no overflow at any x (an
exp(2x) form is inf / inf = NaN past |x| ~ 44), and at most a few float32 ulps from torch.tanh in
absolute terms (near 0, 1 - e cancels to an absolute, not relative, error of ~1e-7).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def tanh(x):
    """Elementwise tanh of a float32 tensor."""
    e = tl.exp2(tl.abs(x) * -2.8853900817779268)  # exp(-2|x|): -2 * log2(e)
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x < 0.0, -t, t)
