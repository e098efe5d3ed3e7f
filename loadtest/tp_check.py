"""Tensor-parallel correctness on GPUs: greedy tokens of tensor_parallel_size N against 1, same inputs.

    python loadtest/tp_check.py --tiny --out tp-tiny.json                  # fp32 tiny models, graphs on/off
    python loadtest/tp_check.py --shape llama3-8b --out tp-8b.json         # bf16, random weights

--tiny builds the test suite's tiny fp32 checkpoints (one with a single KV head and an odd vocabulary,
Qwen3 with tied embeddings) and expects every token equal, with CUDA graphs on and off. --shape writes a
random-weight bf16 checkpoint of that shape once under --workdir (safetensors, in Hugging Face names;
dummy weights would differ between tp sizes, as each rank draws its own shard) and reports how many
sequences diverge and where: bf16 all-reduces sum in another order than one GPU's matmul, so greedy
ties may flip, as with graphs vs eager.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from loadtest.common import device_name, git_commit  # noqa: E402


def write_random_checkpoint(shape: str, workdir: Path, device: str, seed: int = 0) -> Path:
    """The shape's folder plus model.safetensors of random bf16 weights (norms 1), written once."""
    import torch
    from safetensors.torch import save_file

    from loadtest.model_shapes import SHAPES, write_shape

    path = workdir / f"{shape}-random"
    if (path / "model.safetensors").is_file():
        return path
    write_shape(shape, path)
    c = SHAPES[shape]
    h, inter, layers = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"]
    head_dim = h // c["num_attention_heads"]
    q, kv = c["num_attention_heads"] * head_dim, c["num_key_value_heads"] * head_dim
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (c["vocab_size"], h)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes |= {
            p + "input_layernorm.weight": (h,),
            p + "post_attention_layernorm.weight": (h,),
            p + "self_attn.q_proj.weight": (q, h),
            p + "self_attn.k_proj.weight": (kv, h),
            p + "self_attn.v_proj.weight": (kv, h),
            p + "self_attn.o_proj.weight": (h, q),
            p + "mlp.gate_proj.weight": (inter, h),
            p + "mlp.up_proj.weight": (inter, h),
            p + "mlp.down_proj.weight": (h, inter),
        }
    shapes |= {"model.norm.weight": (h,), "lm_head.weight": (c["vocab_size"], h)}
    gen = torch.Generator(device=device).manual_seed(seed)
    tensors = {}
    for name, size in shapes.items():
        if name.endswith("norm.weight"):
            tensors[name] = torch.ones(size, dtype=torch.bfloat16)
        else:
            std = 0.02 if "embed" not in name else 1.0
            t = torch.empty(size, dtype=torch.float32, device=device).normal_(0.0, std, generator=gen)
            tensors[name] = t.to(torch.bfloat16).cpu()
    tmp = path / "model.safetensors.tmp"
    save_file(tensors, str(tmp))
    tmp.rename(path / "model.safetensors")
    return path


def tiny_checkpoints(workdir: Path) -> dict[str, Path]:
    from tests.tiny_models import build_model, build_tokenizer

    tokenizer = build_tokenizer(workdir / "tokenizer")
    return {
        "llama-1kv-vocab511": build_model(
            "llama", workdir / "llama-1kv", tokenizer, num_key_value_heads=1, vocab_size=511
        ),
        "qwen3-tied": build_model("qwen3", workdir / "qwen3", tokenizer),
    }


def greedy(model_dir: Path, prompts: list[list[int]], max_tokens: int, **engine: Any) -> tuple[list, float]:
    from engine import LLM, SamplingParams

    start = time.perf_counter()
    llm = LLM(str(model_dir), **engine)
    startup = time.perf_counter() - start
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    outs = llm.generate(prompts, params, use_tqdm=False)
    llm.shutdown()
    return [o.outputs[0].token_ids for o in outs], startup


def compare(a: list[list[int]], b: list[list[int]]) -> dict[str, Any]:
    first = [
        next((i for i, (x, y) in enumerate(zip(s, t, strict=True)) if x != y), None)
        for s, t in zip(a, b, strict=True)
    ]
    diverged = [i for i in first if i is not None]
    return {
        "sequences": len(a),
        "diverged": len(diverged),
        "first_divergence_positions": diverged,
        "equal": not diverged,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--tiny", action="store_true", help="the test suite's tiny fp32 models")
    what.add_argument("--shape", help="a loadtest/model_shapes.py shape with random bf16 weights")
    p.add_argument("--tensor-parallel-size", "-tp", type=int, default=2)
    p.add_argument("--num-prompts", type=int, default=16)
    p.add_argument("--input-len", type=int, default=64)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "weir_tp_check"))
    p.add_argument("--device", default="cuda", help="cpu: a smoke run of this script (gloo)")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    commit, dirty = git_commit()
    report: dict[str, Any] = {
        "benchmark": "tp_check",
        "card": device_name(args.device),
        "commit": commit,
        "git_dirty": dirty,
        "argv": sys.argv[1:] if argv is None else argv,
        "tensor_parallel_size": args.tensor_parallel_size,
        "results": {},
    }
    ok = True
    if args.tiny:
        models = tiny_checkpoints(workdir)
        engine: dict[str, Any] = {"device": args.device, "dtype": "float32", "max_model_len": 256}
        vocab = 500
    else:
        models = {args.shape: write_random_checkpoint(args.shape, workdir, args.device)}
        engine = {
            "device": args.device,
            "dtype": "bfloat16",
            "max_model_len": args.input_len + args.output_len + 64,
        }
        vocab = 128000
    rng = random.Random(0)
    prompts = [[rng.randrange(3, vocab) for _ in range(args.input_len)] for _ in range(args.num_prompts)]
    for name, model_dir in models.items():
        for eager in (False, True):
            key = f"{name}{'-eager' if eager else '-graphs'}"
            base, base_s = greedy(model_dir, prompts, args.output_len, enforce_eager=eager, **engine)
            tp, tp_s = greedy(
                model_dir,
                prompts,
                args.output_len,
                enforce_eager=eager,
                tensor_parallel_size=args.tensor_parallel_size,
                **engine,
            )
            result = compare(base, tp) | {"startup_s_tp1": round(base_s, 2), "startup_s_tp": round(tp_s, 2)}
            report["results"][key] = result
            ok = ok and (result["equal"] or not args.tiny)
            print(key, json.dumps(result), flush=True)
    report["status"] = "ok" if ok else "mismatch"
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
