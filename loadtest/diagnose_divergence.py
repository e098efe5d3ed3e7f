"""Where a tiny family's greedy tokens leave transformers' on the GPU: one op at a time back on torch.

On an H100 (`2d0586f`, loadtest/results/families-moe-h100-2026-12-05-98de842/README.md) the engine
check's tiny gemma2 in fp32 left transformers' tokens (transformers on the CPU) at prompt 3, token 8, in
every engine mode, though that step's top-two logit margin is 1.3e-2 and the same engine on the CPU,
with the torch ops or the Triton kernels under the interpreter, gives transformers' tokens. This script
takes the engine check's prompts (loadtest/gpu_engine_check.py) and prints, for each setting, the
greedy tokens' first divergence from transformers on the CPU and the largest |log p| difference of
transformers' own tokens, teacher-forced (prompt_logprobs over prompt + its continuation):

- transformers on the device (does the device itself move these logits?);
- the engine with every Triton kernel, then with the torch ops everywhere (CUDA graphs off for both);
- the engine with the Triton kernels but one op (or the attention backend) on torch: the op whose
  swap brings the drift down to the torch ops' level is where the difference is.

On an H100 at 9c4fe20 transformers on the GPU kept its CPU tokens (9.5e-7) while the engine left them
with every op on torch as with the kernels (0.018 at (3, 7)): the difference is outside the swappable
ops. `--layers` then compares the residual stream and each attention / MLP output, layer by layer and
position by position, between the engine and transformers on the device (prompt 3 + transformers'
continuation, alone and in the four-prompt batch): the first module whose output moves is the place.
There it was layer 0's attention from position 1, and the cause the reference's: that machine's
transformers 5.17 ran Gemma 2 through sdpa, which drops its attention softcap (the references now load
through tests/tiny_models.hf_causal_lm; loadtest/results/gemma2-diag-layers-h100-2026-12-05-79d0c3e/).

Run: python3 loadtest/diagnose_divergence.py --family gemma2 [--layers] [--out FILE]; --device cpu runs the
same on the CPU (the Triton kernels under TRITON_INTERPRET=1 when it is set before the start; CI's
smoke uses it). Imports nothing from app/.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from engine import LLM, SamplingParams  # noqa: E402
from loadtest.feature_check_quant import teacher_forced  # noqa: E402
from loadtest.gpu_engine_check import (  # noqa: E402
    TINY_MAX_TOKENS,
    TINY_PROMPT_LENGTHS,
    first_divergence,
    hf_greedy,
)
from loadtest.op_swap import EVERY_OP, OpSwap  # noqa: E402
from tests.tiny_models import build_model, build_tokenizer, hf_causal_lm  # noqa: E402


def hf_run(
    model_dir: Path, prompts: list[list[int]], device: str
) -> tuple[list[list[int]], list[list[float]]]:
    """transformers' greedy tokens (the engine check's hf_greedy) and their teacher-forced log p (float32)
    on `device`."""
    tokens = hf_greedy(model_dir, prompts, TINY_MAX_TOKENS, device)
    model = hf_causal_lm(str(model_dir), dtype=torch.float32).to(device).eval()
    logps = []
    with torch.no_grad():
        for p, cont in zip(prompts, tokens, strict=True):
            seq = torch.tensor([p + cont], device=device)
            logits = model(seq).logits[0].float().log_softmax(-1)  # [len, vocab]
            rows = logits[len(p) - 1 : -1]  # the rows predicting each continuation token
            logps.append(rows.gather(1, seq[0, len(p) :, None])[:, 0].tolist())
    return tokens, logps


def engine_run(
    llm: LLM, prompts: list[list[int]], hf_tokens: list[list[int]]
) -> tuple[list[list[int]], list[list[float]]]:
    greedy = SamplingParams(temperature=0.0, max_tokens=TINY_MAX_TOKENS, ignore_eos=True)
    tokens = [list(o.outputs[0].token_ids) for o in llm.generate(prompts, greedy, use_tqdm=False)]
    return tokens, teacher_forced(llm, prompts, hf_tokens)


def drift(a: list[list[float]], b: list[list[float]]) -> dict[str, Any]:
    """The largest |a - b| and where (prompt, token)."""
    worst = max(
        (
            (abs(x - y), i, j)
            for i, (r, s) in enumerate(zip(a, b, strict=True))
            for j, (x, y) in enumerate(zip(r, s, strict=True))
        ),
        default=(0.0, -1, -1),
    )
    return {"max_abs_logprob_diff": float(f"{worst[0]:.3e}"), "at": [worst[1], worst[2]]}


def _captured(store: dict[str, list[torch.Tensor]], name: str) -> Any:
    def hook(_module: Any, _args: Any, out: Any) -> None:
        if isinstance(out, tuple):  # a weir decoder layer's (hidden, residual) sums to the stream; HF's [0]
            out = out[0] + out[1] if name.startswith("weir") and name.endswith("stream") else out[0]
        store.setdefault(name, []).append(out.detach().float().reshape(-1, out.shape[-1]).cpu())

    return hook


def layer_outputs(model: Any, prefix: str, layers: Any) -> tuple[dict[str, list[torch.Tensor]], list[Any]]:
    """Forward hooks on each layer (the stream after it), its self_attn and its mlp."""
    store: dict[str, list[torch.Tensor]] = {}
    handles = []  # (not the embedding: transformers' Gemma scales inside it, the engine after it)
    for i, layer in enumerate(layers):
        handles.append(layer.self_attn.register_forward_hook(_captured(store, f"{prefix} {i} attn")))
        handles.append(layer.mlp.register_forward_hook(_captured(store, f"{prefix} {i} mlp")))
        handles.append(layer.register_forward_hook(_captured(store, f"{prefix} {i} stream")))
    return store, handles


def layer0_tensors(model: Any, side: str, kept: dict[str, torch.Tensor]) -> list[Any]:
    """Hooks keeping layer 0's attention tensors in `kept` (CPU copies, float32): q, k, v before rope
    (transformers' q/k/v_proj, side "hf"; the engine's fused qkv_proj, side "weir"), the input of o_proj
    (attention's output) and the rotary cos/sin (transformers' rotary_emb output; the engine's cache)."""

    def keep(name: str, arg: bool = False) -> Any:
        def hook(_m: Any, args: Any, out: Any = None) -> None:
            t = args[0] if arg else out
            if not isinstance(t, torch.Tensor):  # transformers' rotary_emb: (cos, sin)
                t = torch.cat([x.reshape(-1, x.shape[-1]) for x in t], -1)
            kept[f"{side} {name}"] = t.detach().float().reshape(-1, t.shape[-1]).cpu()

        return hook

    attn = model.model.layers[0].self_attn
    handles = [attn.o_proj.register_forward_pre_hook(keep("attn", arg=True))]
    if side == "hf":
        handles += [getattr(attn, f"{x}_proj").register_forward_hook(keep(x)) for x in "qkv"]
        handles.append(model.model.rotary_emb.register_forward_hook(keep("cos sin")))
    else:
        handles.append(attn.qkv_proj.register_forward_hook(keep("qkv")))
        kept["weir cos sin cache"] = attn.rotary_emb.cos_sin_cache.detach().float().cpu()
    return handles


def layer_drift(
    llm: LLM,
    model_dir: Path,
    prompts: list[list[int]],
    continuations: list[list[int]],
    device: str,
    dump: Path | None = None,
) -> list[dict[str, Any]]:
    """For the longest prompt + its continuation (alone, then last in the batch of all), each module's
    largest |engine - transformers| on `device` and the first position over 1e-4. transformers' hidden
    states are its residual stream after each layer; the engine's layer returns (hidden, residual),
    whose sum is the same stream. `dump`: layer 0's attention tensors of both (layer0_tensors), saved."""
    hf = hf_causal_lm(str(model_dir), dtype=torch.float32).to(device).eval()
    seq = prompts[-1] + continuations[-1]
    model = llm.llm_engine.executor.runner.model
    kept: dict[str, torch.Tensor] = {}
    hf_store, handles = layer_outputs(hf, "hf", hf.model.layers)
    handles += layer0_tensors(hf, "hf", kept)
    with torch.no_grad():
        hf(torch.tensor([seq], device=device))
    for h in handles:
        h.remove()
    rows = []
    full = [p + c for p, c in zip(prompts, continuations, strict=True)]
    for label, batch in (("alone", [seq]), ("in the batch", full)):
        llm.llm_engine.scheduler.reset_prefix_cache()
        store, handles = layer_outputs(model, "weir", model.model.layers)
        if label == "alone":
            handles += layer0_tensors(model, "weir", kept)
        llm.generate(batch, SamplingParams(max_tokens=1), use_tqdm=False)
        for h in handles:
            h.remove()
        if label == "alone" and dump is not None:
            torch.save(kept, dump)
        for key, hf_out in hf_store.items():
            name = key.removeprefix("hf ")
            ours = torch.cat(store[f"weir {name}"])[-len(seq) :]  # [len(seq), hidden]: the last sequence
            diff = (ours - hf_out[0]).abs().amax(-1)  # [len(seq)]
            over = (diff > 1e-4).nonzero()
            row = {
                "run": label,
                "module": name,
                "max_abs_diff": float(f"{diff.max().item():.3e}"),
                "first_position_over_1e-4": int(over[0]) if len(over) else None,
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def force_triton_on_cpu() -> None:
    """The engine's backend choice made Triton (the interpreter) on the CPU, as the kernel tests force it."""
    import engine.worker.model_runner as model_runner

    choose = model_runner.get_attention_backend
    model_runner.get_attention_backend = lambda *args, **kw: choose(*args[:5], use_triton=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", default="gemma2")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--out", default=None)
    parser.add_argument("--layers", action="store_true", help="compare module outputs layer by layer")
    parser.add_argument(
        "--ops", default=",".join(EVERY_OP), help="the ops swapped back on torch one at a time (comma list)"
    )
    args = parser.parse_args()
    ops = args.ops.split(",")
    unknown = [op for op in ops if op not in EVERY_OP]
    if unknown:  # refused before the minutes of runs, not when the loop reaches it
        parser.error(f"--ops: {', '.join(map(repr, unknown))} not among {', '.join(EVERY_OP)}")

    root = Path(tempfile.mkdtemp(prefix="weir-diverge-"))
    tok = build_tokenizer(root / "tokenizer")
    rng = random.Random(0)  # the engine check's prompts (gpu_engine_check.tiny_parity)
    prompts = [[rng.randrange(3, 500) for _ in range(n)] for n in TINY_PROMPT_LENGTHS]
    model_dir = build_model(args.family, root / args.family, tok)
    if args.device == "cpu" and os.environ.get("TRITON_INTERPRET") == "1":
        force_triton_on_cpu()

    expected, hf_cpu = hf_run(model_dir, prompts, "cpu")
    rows: list[dict[str, Any]] = []

    def row(label: str, tokens: list[list[int]], logps: list[list[float]]) -> None:
        r = {"setting": label, "first_divergence": first_divergence(tokens, expected), **drift(logps, hf_cpu)}
        rows.append(r)
        print(json.dumps(r), flush=True)

    if args.device != "cpu":
        row(f"transformers on {args.device}", *hf_run(model_dir, prompts, args.device))
    llm = LLM(str(model_dir), device=args.device, dtype="float32", num_kv_blocks=256, enforce_eager=True)
    print(f"engine backend: {llm.llm_engine.executor.runner.attn_backend.name}", flush=True)
    row("engine, as built", *engine_run(llm, prompts, expected))
    if args.layers:
        dump = Path(args.out).with_suffix(".layer0.pt") if args.out else None
        rows.extend(layer_drift(llm, model_dir, prompts, expected, args.device, dump))
    runner = llm.llm_engine.executor.runner
    with OpSwap(runner):
        row("engine, every op on torch", *engine_run(llm, prompts, expected))
    for op in ops:
        with OpSwap(runner, (op,)):
            row(f"engine, {op} on torch", *engine_run(llm, prompts, expected))
    if args.out:
        Path(args.out).write_text(
            json.dumps({"family": args.family, "device": args.device, "rows": rows}, indent=1)
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
