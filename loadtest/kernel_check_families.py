"""gpu_kernel_check.py's `families` part: the kernels the Gemma, Phi-3 and sliding-window models added,
at their real shapes, in bf16, each against ops.reference (rel err < 1e-2 as every other kernel check,
outputs poisoned) or bit for bit against the launches it fuses.

- Paged attention with a sliding window, on mixed batches (prefill chunks with cached context, decodes)
  and decode batches whose contexts sit just below, at and past the window (unsplit and split KV):
  Gemma-2-9B (16 / 8 heads, head_dim 256, window 4096, softcap 50, scale 256^-0.5), Gemma-3-12B (the
  same heads, window 1024, no softcap), Mistral-7B-v0.1 (32 / 8 heads, head_dim 128, window 4096).
  gpu_kernel_check's correctness part covers head_dim 128 with softcap 50 at contexts up to 4096 only.
- The fused decode (rotary, KV write and windowed, softcapped attention in one launch) bit for bit the
  two launches it replaces, at Gemma-2-9B's shape, contexts past the window.
- A CUDA-graph capture of Gemma-2-9B's windowed, softcapped decode, replayed with new lengths and tables.
- Partial rotary at Phi-4-mini's shape (24 / 8 heads, head_dim 128, rotary_dim 96: halves of 48, no
  power of two): rotary_embedding vs the reference, rotary_and_write_kv bit for bit rotary_embedding
  then write_kv_cache, the fused decode vs the reference. (Phi-3-mini's head_dim 96 runs the torch
  reference ops: no Triton kernel to check.)
- Gemma's RMSNorm ((1 + weight), with and without the residual) at Gemma-2-2B / 2-9B / 3-27B widths and
  over Gemma 3's q/k-norm rows (head_dim 256); GeGLU (tanh GELU times up) at their intermediate sizes.
  Then both timed at 4096 tokens against the copy bandwidth.

Smoke form (CPU, Triton interpreter, float32): the same cases at tiny shapes.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from loadtest.kernel_check_common import (
    Poisoned,
    Replay,
    check_close,
    check_true,
    guarded,
    make_paged,
    sync,
    time_ms,
    upcast,
)
from ops import reference


@dataclasses.dataclass(frozen=True)
class AttnShape:
    num_heads: int
    num_kv_heads: int
    head_dim: int
    scale: float
    window: int
    softcap: float | None


WINDOWED = {
    "gemma2-9b": AttnShape(16, 8, 256, 256**-0.5, 4096, 50.0),
    "gemma3-12b": AttnShape(16, 8, 256, 256**-0.5, 1024, None),
    "mistral-7b": AttnShape(32, 8, 128, 128**-0.5, 4096, None),
}
SMOKE_WINDOWED = {"tiny-gemma2": AttnShape(4, 2, 32, 24**-0.5, 24, 50.0)}
PARTIAL = {"phi4-mini": (24, 8, 128, 96)}  # heads, kv heads, head_dim, rotary_dim
SMOKE_PARTIAL = {"tiny-phi4-mini": (4, 2, 32, 24)}
NORM_WIDTHS = {"gemma2-2b": 2304, "gemma2-9b": 3584, "gemma3-27b": 5376}
SMOKE_NORM_WIDTHS = {"tiny": 64}
GEGLU_WIDTHS = {"gemma2-2b": 9216, "gemma2-9b": 14336, "gemma3-27b": 21504}
SMOKE_GEGLU_WIDTHS = {"tiny": 48}


def families_part(results: dict, device: torch.device, smoke: bool) -> None:
    import ops.triton as tops

    dtype = torch.float32 if smoke else torch.bfloat16
    for name, shape in (SMOKE_WINDOWED if smoke else WINDOWED).items():
        guarded(
            results,
            f"{name} windowed attention",
            windowed_attention,
            results,
            tops,
            name,
            shape,
            dtype,
            device,
        )
    gemma = "tiny-gemma2" if smoke else "gemma2-9b"
    shape = (SMOKE_WINDOWED if smoke else WINDOWED)[gemma]
    guarded(results, f"{gemma} fused decode", fused_decode_exact, results, tops, gemma, shape, dtype, device)
    guarded(
        results, f"{gemma} graph replay", windowed_graph_replay, results, tops, gemma, shape, dtype, device
    )
    for name, dims in (SMOKE_PARTIAL if smoke else PARTIAL).items():
        args = (results, tops, name, *dims, dtype, device, 17 if smoke else 257)
        guarded(results, f"{name} partial rotary", partial_rotary, *args)
    guarded(results, "gemma norms and GeGLU", norms_and_geglu, results, tops, smoke, dtype, device)


def window_lens(w: int) -> tuple[list[int], list[int], list[int]]:
    """(mixed q_lens, mixed seq_lens, decode seq_lens) around a window of w: prefill chunks that start
    inside and past the window, contexts one below, at and one past it, and several windows long."""
    q_lens = [min(300, w), 129, 77, 1, 1, 1, 1, 1]
    seq_lens = [min(300, w), w + 129 + 40, 2 * w + 77, 1, w - 1, w, w + 1, 2 * w + min(500, w)]
    decode = [1, 33, w - 1, w, w + 1, 3 * w + 5]
    return q_lens, seq_lens, decode


def windowed_attention(results: dict, tops, name: str, s: AttnShape, dtype: torch.dtype, device: torch.device) -> None:  # fmt: skip  # noqa: ANN001
    from ops.triton.paged_attention import choose_config, paged_attention_with_config

    q_lens, seq_lens, decode = window_lens(s.window)
    extra = {"sliding_window": s.window, "softcap": s.softcap}
    label = f"{name} window {s.window}" + (f" softcap {s.softcap:g}" if s.softcap else "")
    mixed = make_paged(q_lens, seq_lens, s.num_heads, s.num_kv_heads, s.head_dim, 16, dtype, seed=21, device=device)  # fmt: skip
    mixed["scale"] = s.scale
    ref = reference.paged_attention(**upcast(mixed), **extra)
    with Poisoned():
        out = tops.paged_attention(**mixed, **extra)
    check_close(results, f"{label}: paged_attention mixed batch (contexts to {max(seq_lens)})", out, ref)
    dec = make_paged([1] * len(decode), decode, s.num_heads, s.num_kv_heads, s.head_dim, 16, dtype, seed=22, device=device)  # fmt: skip
    dec["scale"] = s.scale
    ref = reference.paged_attention(**upcast(dec), **extra)
    heur = choose_config(len(decode), s.num_heads, s.num_kv_heads, s.head_dim, 1, max(decode), device)
    for segments in sorted({heur.num_segments, 1, 8}):
        config = dataclasses.replace(heur, num_segments=segments)
        with Poisoned():
            out = paged_attention_with_config(**dec, config=config, **extra)
        mark = " (heuristic)" if segments == heur.num_segments else ""
        check_close(results, f"{label}: paged_attention decode, {segments} KV segments{mark}", out, ref)


def rope_cache(
    rotary_dim: int, max_position: int, device: torch.device, base: float = 10000.0
) -> torch.Tensor:
    """[max_position, rotary_dim] float32: cos then sin of plain rope angles."""
    inv_freq = 1.0 / (base ** (torch.arange(0, rotary_dim, 2, dtype=torch.float64) / rotary_dim))
    freqs = torch.outer(torch.arange(max_position, dtype=torch.float64), inv_freq)
    return torch.cat((freqs.cos(), freqs.sin()), dim=-1).float().to(device)


def decode_inputs(seq_lens: list[int], nh: int, nkv: int, d: int, dtype: torch.dtype, device: torch.device, seed: int) -> tuple:  # fmt: skip
    """A decode batch (one new token a sequence at position seq_len - 1), its slots and its q/k/v."""
    n = len(seq_lens)
    dec = make_paged([1] * n, seq_lens, nh, nkv, d, 16, dtype, seed=seed, device=device)
    pos = torch.tensor(seq_lens, device=device) - 1
    slots = dec["block_tables"][torch.arange(n, device=device), pos // 16].long() * 16 + pos % 16
    g = torch.Generator(device=device).manual_seed(seed)
    qkv = torch.randn(n, (nh + 2 * nkv) * d, device=device, dtype=dtype, generator=g)
    q, k, v = qkv.split([nh * d, nkv * d, nkv * d], dim=-1)
    return dec, pos, slots, q, k, v


def fused_decode_exact(results: dict, tops, name: str, s: AttnShape, dtype: torch.dtype, device: torch.device) -> None:  # fmt: skip  # noqa: ANN001
    """decode_attention bit for bit rotary_and_write_kv then paged_attention, windowed and softcapped."""
    _, _, decode = window_lens(s.window)
    d = s.head_dim
    cos_sin = rope_cache(d, 4 * s.window, device)
    dec, pos, slots, q, k, v = decode_inputs(decode, s.num_heads, s.num_kv_heads, d, dtype, device, seed=23)
    args = (dec["block_tables"], dec["seq_lens"], dec["query_start_loc"])
    extra = {"sliding_window": s.window, "softcap": s.softcap}
    fkc, fvc, skc, svc = (c.clone() for c in (dec["k_cache"], dec["v_cache"]) * 2)
    with Poisoned():
        fused = tops.decode_attention(pos, q, k, v, cos_sin, d, fkc, fvc, slots, *args, max(decode), s.scale, **extra)  # fmt: skip
    sq = tops.rotary_and_write_kv(pos, q, k, v, cos_sin, d, skc, svc, slots)
    sep = tops.paged_attention(sq.view(len(decode), s.num_heads, d), skc, svc, *args, 1, max(decode), s.scale, **extra)  # fmt: skip
    sync(device)
    same = bool(torch.equal(fused, sep) and torch.equal(fkc, skc) and torch.equal(fvc, svc))
    check_true(results, f"{name}: windowed softcapped decode_attention == rotary_and_write_kv, paged_attention (bit for bit)", same)  # fmt: skip
    ref = reference.decode_attention(
        pos, q.float(), k.float(), v.float(), cos_sin, d, dec["k_cache"].float(), dec["v_cache"].float(), slots,
        *args, max(decode), s.scale, **extra,
    )  # fmt: skip
    check_close(results, f"{name}: windowed softcapped decode_attention vs reference", fused, ref)


def windowed_graph_replay(results: dict, tops, name: str, s: AttnShape, dtype: torch.dtype, device: torch.device) -> None:  # fmt: skip  # noqa: ANN001
    """Capture the windowed decode once (the runner's max_seq_len), replay with new lengths and tables."""
    _, _, decode = window_lens(s.window)
    extra = {"sliding_window": s.window, "softcap": s.softcap}
    batch = make_paged([1] * len(decode), decode, s.num_heads, s.num_kv_heads, s.head_dim, 16, dtype, seed=24, device=device)  # fmt: skip
    batch["scale"] = s.scale
    batch["max_seq_len"] = 4 * s.window  # the runner captures with its max, not the batch's
    captured = Replay(lambda: tops.paged_attention(**batch, **extra), device)
    new_lens = [x + 7 for x in decode[::-1]]
    new = make_paged([1] * len(decode), new_lens, s.num_heads, s.num_kv_heads, s.head_dim, 16, dtype,
                     k_cache=batch["k_cache"], v_cache=batch["v_cache"], seed=25, device=device)  # fmt: skip
    assert new["block_tables"].shape[1] <= batch["block_tables"].shape[1] + 1
    cols = min(new["block_tables"].shape[1], batch["block_tables"].shape[1])
    batch["block_tables"][:, :cols].copy_(new["block_tables"][:, :cols])
    batch["seq_lens"].copy_(new["seq_lens"])
    batch["query"].copy_(new["query"])
    out = captured.replay()
    ref = reference.paged_attention(**upcast(batch), **extra)
    check_close(results, f"{name}: CUDA-graph replay of the windowed softcapped decode (new lengths, tables)", out, ref)  # fmt: skip


def partial_rotary(results: dict, tops, name: str, nh: int, nkv: int, d: int, rotary_dim: int, dtype: torch.dtype, device: torch.device, n: int) -> None:  # fmt: skip  # noqa: ANN001
    # longrope-like angles: per-frequency factors and an attention factor scaling cos and sin
    half = rotary_dim // 2
    factors = 1.0 + torch.arange(half, dtype=torch.float64) / half
    inv_freq = 1.0 / (factors * 10000.0 ** (torch.arange(0, rotary_dim, 2, dtype=torch.float64) / rotary_dim))
    freqs = torch.outer(torch.arange(8192, dtype=torch.float64), inv_freq)
    cos_sin = (1.19 * torch.cat((freqs.cos(), freqs.sin()), dim=-1)).float().to(device)  # [8192, rotary_dim]
    g = torch.Generator(device=device).manual_seed(31)
    qkv = torch.randn(n, (nh + 2 * nkv) * d, device=device, dtype=dtype, generator=g)
    q, k, v = qkv.split([nh * d, nkv * d, nkv * d], dim=-1)
    pos = torch.randint(0, 8192, (n,), device=device, generator=g)
    rq, rk = reference.rotary_embedding(pos, q.float(), k.float(), cos_sin, d)
    with Poisoned():
        oq, ok = tops.rotary_embedding(pos, q, k, cos_sin, d)
    label = f"{name} (head {d}, rotary {rotary_dim})"
    check_close(results, f"{label}: rotary q", oq, rq)
    check_close(results, f"{label}: rotary k", ok, rk)
    passed = bool(torch.equal(oq.view(n, nh, d)[..., rotary_dim:], q.reshape(n, nh, d)[..., rotary_dim:]))
    check_true(results, f"{label}: the dims past rotary_dim pass through unchanged", passed)
    kc = torch.randn(64, 16, nkv, d, device=device, dtype=dtype, generator=g)
    vc = torch.randn(64, 16, nkv, d, device=device, dtype=dtype, generator=g)
    slots = torch.randperm(64 * 16, device=device, generator=g)[:n]
    slots[::7] = -1
    fkc, fvc, skc, svc = kc.clone(), vc.clone(), kc.clone(), vc.clone()
    with Poisoned():
        fq = tops.rotary_and_write_kv(pos, q, k, v, cos_sin, d, fkc, fvc, slots)
    sq, sk = tops.rotary_embedding(pos, q, k, cos_sin, d)
    tops.write_kv_cache(sk.view(n, nkv, d), v.reshape(n, nkv, d), skc, svc, slots)
    sync(device)
    same = bool(torch.equal(fq, sq) and torch.equal(fkc, skc) and torch.equal(fvc, svc))
    check_true(
        results, f"{label}: rotary_and_write_kv == rotary_embedding, write_kv_cache (bit for bit)", same
    )
    seq_lens = [1, 100, 1000, 4000] if n > 100 else [1, 20, 70]
    dec, dpos, dslots, dq, dk, dv = decode_inputs(seq_lens, nh, nkv, d, dtype, device, seed=32)
    args = (dec["block_tables"], dec["seq_lens"], dec["query_start_loc"], max(seq_lens), d**-0.5)
    ref = reference.decode_attention(
        dpos, dq.float(), dk.float(), dv.float(), cos_sin, d, dec["k_cache"].float(), dec["v_cache"].float(), dslots, *args,
    )  # fmt: skip
    with Poisoned():
        out = tops.decode_attention(
            dpos, dq, dk, dv, cos_sin, d, dec["k_cache"], dec["v_cache"], dslots, *args
        )
    check_close(results, f"{label}: fused decode_attention vs reference", out, ref)


def norms_and_geglu(results: dict, tops, smoke: bool, dtype: torch.dtype, device: torch.device) -> None:  # noqa: ANN001
    g = torch.Generator(device=device).manual_seed(41)
    n = 17 if smoke else 257
    widths = dict(SMOKE_NORM_WIDTHS if smoke else NORM_WIDTHS)
    for name, h in widths.items():
        x = torch.randn(n, h, device=device, generator=g).to(dtype)
        res = torch.randn(n, h, device=device, generator=g).to(dtype)
        w = (0.3 * torch.randn(h, device=device, generator=g)).to(dtype)  # scales by 1 + w
        # against the spec on the same inputs: the residual sum is rounded to x's dtype by the spec too
        with Poisoned():
            out = tops.gemma_rms_norm(x, w, 1e-6)
        check_close(results, f"{name} gemma_rms_norm {h}", out, reference.gemma_rms_norm(x, w, 1e-6))
        ref_o, ref_r = reference.gemma_rms_norm(x, w, 1e-6, res)
        with Poisoned():
            out_o, out_r = tops.gemma_rms_norm(x, w, 1e-6, res)
        check_close(results, f"{name} gemma_rms_norm+residual {h} out", out_o, ref_o)
        check_close(results, f"{name} gemma_rms_norm+residual {h} residual", out_r, ref_r)
    d = 32 if smoke else 256  # Gemma 3's q/k norm: rows of one head
    rows = torch.randn(n * (4 if smoke else 16), d, device=device, generator=g).to(dtype)
    w = (0.3 * torch.randn(d, device=device, generator=g)).to(dtype)
    with Poisoned():
        out = tops.gemma_rms_norm(rows, w, 1e-6)
    check_close(
        results, f"gemma3 q/k norm rows of head_dim {d}", out, reference.gemma_rms_norm(rows, w, 1e-6)
    )
    for name, inter in (SMOKE_GEGLU_WIDTHS if smoke else GEGLU_WIDTHS).items():
        gu = torch.randn(n, 2 * inter, device=device, generator=g).to(dtype)
        with Poisoned():
            out = tops.gelu_tanh_and_mul(gu)
        check_close(
            results, f"{name} gelu_tanh_and_mul {inter}", out, reference.gelu_tanh_and_mul(gu.float())
        )
    # Times at 4096 tokens (bandwidth-bound: bytes over the copy bandwidth)
    tokens = 8 if smoke else 4096
    h = 64 if smoke else NORM_WIDTHS["gemma2-9b"]
    inter = 48 if smoke else GEGLU_WIDTHS["gemma2-9b"]
    x = torch.randn(tokens, h, device=device, generator=g).to(dtype)
    res = torch.randn_like(x)
    w = (0.3 * torch.randn(h, device=device, generator=g)).to(dtype)
    gu = torch.randn(tokens, 2 * inter, device=device, generator=g).to(dtype)
    size = x.element_size()
    rows = [
        (
            f"gemma_rms_norm+residual {tokens}x{h}",
            time_ms(lambda: tops.gemma_rms_norm(x, w, 1e-6, res), device),
            4 * x.numel() * size,
        ),  # fmt: skip
        (
            f"gelu_tanh_and_mul {tokens}x2x{inter}",
            time_ms(lambda: tops.gelu_tanh_and_mul(gu), device),
            gu.numel() * size * 3 // 2,
        ),  # fmt: skip
    ]
    copy = results.get("copy_bandwidth_gbs", float("nan"))
    out_rows = results["timings"].setdefault("families_elementwise", [])
    for label, ms, nbytes in rows:
        gbs = nbytes / ms / 1e6
        out_rows.append({"name": label, "ms": ms, "gbs": gbs, "frac_copy": gbs / copy})
        frac = gbs / copy if math.isfinite(copy) and copy > 0 else float("nan")
        print(f"  {label:36s} {ms * 1e3:8.1f} us {gbs:7.0f} GB/s {frac:5.0%} of copy", flush=True)
