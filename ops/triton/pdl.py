"""Programmatic dependent launch (PDL, Hopper and later): overlap a kernel's start with the end of the
kernel before it in the stream.

A kernel launched with `launch_pdl=True` may begin once every program of the kernel before it has
started and signalled (`let_next_kernel_start`) or finished, instead of after that kernel's last
program has drained and its launch latency has passed. Until it calls `wait_for_previous_kernel` it may
only do what does not depend on that kernel: compute addresses and load constant data (weights). Every
read of the previous kernel's outputs and every write (its output may reuse memory the previous kernel
still reads) must come after the wait. The wait returns once the previous kernel has completed and its
writes are visible, which, since that kernel waited on its own predecessor or was launched after it,
covers everything earlier in the stream.

At batch 1 a GEMV spends ~4.5 us of each launch on its ramp (first weight bytes in flight) and drain,
about as long as its streaming on the small projections (H200 sweep at 9ed7267); with PDL its first
weight tiles are requested while the small kernel before it (RMSNorm, SiLU-and-mul, attention) runs.
Works inside CUDA graphs (the launch attribute becomes a programmatic edge).

ON by default since 2026-12-07 (WEIR_PDL=0 turns it off). Every Triton kernel of a decoder layer (RMSNorm,
rotary + KV write, paged attention, SiLU-mul, the GEMVs) takes part since ece1a6b: each lets the next launch once
all its programs are resident and waits for the previous one before any read or write. Measured on an H100 at
fee9542 / ba6732c (alternating runs in one call each, loadtest/results/pdl-pingpong-h100-2026-12-07-11d33cf/): the
batch-1 decode step with GPTQ W4A16 weights 2.712 -> 2.542 ms (-6.3%: the GEMV's first tile is requested before the
wait), FP8 weights 3.500 -> 3.391 (-3.1%), bf16 5.608 -> 5.556 (-0.9%), bf16 at batch 8 6.145 -> 6.110; T2 3,702
-> 3,703 output tok/s (prefill-bound: unchanged); the engine check (114/114) and every quantized format's check on
CUDA (34/34) pass with it. Earlier, on an H200 and older kernels, it lost: a GPTQ batch-1 step 3.058 against 2.978
ms at c2fa90c, bf16 4.446 against 4.359 at 5a5b861 (loadtest/results/startup-sampler-pdl-h200-2026-12-04/); not
measured on an H200 since. Loading the FP8 GEMV's first tile before its wait (prefetch at one token) made the FP8
step 11% slower (3.390 -> 3.770 ms, ba6732c): that GEMV keeps no tile ahead. Also off under the Triton
interpreter and below compute capability 9.0; the in-kernel calls compile to nothing when off.
The skinny GEMMs (2-255 tokens) do not take part: launched with it they made L1's batch-8 step 9-14% slower on an
H100 (ops/triton/skinny_gemm.py); nor does the FP8 GEMV load its first tile before the wait (6% slower, fp8_gemv.py).
With PDL on, the GPU engine check (114/114) and the feature checks' multi-LoRA, beam, fork, FP8 KV cache and
quantized-format parts pass on an H100 (loadtest/results/decode-attn-h100-2026-12-07-e507e83/).
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from ops.env_flags import env_flag


@functools.cache
def pdl_enabled(device: torch.device) -> bool:
    """Whether launches on `device` use PDL: WEIR_PDL on (the default), a CUDA device of compute capability 9.0+, not
    under the interpreter (read once per device: launch paths call this every step)."""
    if device.type != "cuda" or os.environ.get("TRITON_INTERPRET") == "1":
        return False
    if not env_flag("WEIR_PDL"):
        return False
    index = device.index if device.index is not None else torch.cuda.current_device()
    return torch.cuda.get_device_capability(index) >= (9, 0)


@triton.jit
def wait_for_previous_kernel(PDL: tl.constexpr):
    """Block until the previous kernel in the stream has completed and its writes are visible."""
    if PDL:
        tl.extra.cuda.gdc_wait()


@triton.jit
def let_next_kernel_start(PDL: tl.constexpr):
    """Allow a PDL-launched next kernel to start (a hint; its own wait still orders its reads)."""
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()
