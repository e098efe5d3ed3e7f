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

OFF by default (WEIR_PDL=1 turns it on): measured on an H200 at c2fa90c, a batch-1 GPTQ decode step took
3.058 ms with it and 2.978 ms without (Q1, `loadtest/results/gemv-pdl-lora-h200-2026-12-03-c2fa90c/`),
although back-to-back GEMVs in the sweep's graphs gained from it. Since ece1a6b every Triton kernel of
a decoder layer (RMSNorm, rotary + KV write, paged attention, SiLU-mul, the GEMVs) takes part: each
lets the next launch once all its programs are resident and waits for the previous one before any
read or write. Token parity holds (engine check 36/36 on an H200 with WEIR_PDL=1), but the bf16 batch-1
step was 2% slower with it (4.446 against 4.359 ms, 5a5b861, alternating runs in one call,
`loadtest/results/startup-sampler-pdl-h200-2026-12-04/5-pdl-5a5b861/`). Also off under the Triton
interpreter and below compute capability 9.0; the in-kernel calls compile to nothing when off.
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
    """Whether launches on `device` use PDL: WEIR_PDL=1, a CUDA device of compute capability 9.0+, not
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
