"""Perplexity of the embedded default model (engine/default_model, a trained 3.9M-parameter Llama)
quantized to each format weir reads, against the unquantized model, on held-out text: the module
docstrings of weir's own engine/ package (never in the model's training corpus, which is the Python
standard library's docs, but the same register of English).

The quantized checkpoints are written with the same round-to-nearest writers the tests pin
(tests/engine/quantization/checkpoints.py): GPTQ's and AWQ's file formats with RTN codes, not the
GPTQ/AWQ algorithms' error-compensated ones, so the figures are an upper bound on what those tools'
checkpoints of this model would lose. The default model's MLP width (496) is a multiple of none of
the group sizes 32..128, so grouped GPTQ/AWQ and [128, 128] FP8 blocks leave down_proj (and for
blocks gate/up) unquantized, as a tool would with modules_to_not_convert.

    PYTHONPATH=. python -m tools.quant_accuracy        # prints the README's Markdown table
    PYTHONPATH=. python -m tools.quant_accuracy SqueezeLLM "KV cache"   # only rows naming these

SqueezeLLM's tables here are each channel's 16 quantiles (nearest-entry codes), not SqueezeLLM's
sensitivity-weighted k-means; the FP8 KV-cache rows keep the weights and quantize only the cache.
"""

from __future__ import annotations

import ast
import math
import sys
import tempfile
from pathlib import Path

from engine import LLM, SamplingParams
from engine.inputs.tokenizer import load_tokenizer
from tests.engine.quantization.checkpoints import write_awq, write_fp8, write_gptq, write_squeezellm
from tests.engine.quantization.ct_library import write_ct_library_checkpoint

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = ROOT / "engine" / "default_model"
WINDOW = 256  # tokens per scored window (the model's max_position_embeddings is 1024)
MAX_WINDOWS = 16  # 4080 scored tokens: enough to separate the formats, minutes on a CPU


def held_out_text() -> str:
    docs = []
    for path in sorted((ROOT / "engine").rglob("*.py")):
        doc = ast.get_docstring(ast.parse(path.read_text()))
        if doc:
            docs.append(doc)
    return "\n\n".join(docs)


def token_logprobs(model_dir: Path, windows: list[list[int]], **options: object) -> list[float]:
    """log p of every token of every window but the first, given the tokens before it."""
    llm = LLM(str(model_dir), device="cpu", dtype="float32", **options)
    outs = llm.generate(windows, SamplingParams(max_tokens=1, prompt_logprobs=0), use_tqdm=False)
    logprobs = [
        out.prompt_logprobs[pos][window[pos]].logprob
        for window, out in zip(windows, outs, strict=True)
        for pos in range(1, len(window))
    ]
    llm.shutdown()
    return logprobs


def main() -> None:
    tokenizer = load_tokenizer(str(DEFAULT_MODEL))
    ids = tokenizer.encode(held_out_text())
    windows = [ids[i : i + WINDOW] for i in range(0, len(ids) - WINDOW + 1, WINDOW)][:MAX_WINDOWS]
    down = ("mlp.down_proj",)
    mlp = ("mlp.down_proj", "mlp.gate_proj", "mlp.up_proj")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        rows: list[tuple[str, Path, dict]] = [("unquantized (bf16 weights, fp32 compute)", DEFAULT_MODEL, {})]
        rows.append(
            ("FP8 online, per channel (`--quantization fp8`)", DEFAULT_MODEL, {"quantization": "fp8"})
        )
        rows.append(("FP8 checkpoint, per tensor", write_fp8(DEFAULT_MODEL, root / "a", "tensor")[0], {}))
        rows.append(
            (
                "FP8 checkpoint, [128, 128] blocks (MLP unquantized)",
                write_fp8(DEFAULT_MODEL, root / "b", "block", skip=mlp)[0],
                {},
            )
        )
        rows.append(
            (
                "GPTQ 8-bit, group -1 (RTN)",
                write_gptq(DEFAULT_MODEL, root / "c", 8, -1, False, False, "gptq_v2")[0],
                {},
            )
        )
        rows.append(
            (
                "GPTQ 4-bit, group -1, asym (RTN)",
                write_gptq(DEFAULT_MODEL, root / "d", 4, -1, False, False, "gptq_v2")[0],
                {},
            )
        )
        rows.append(
            (
                "GPTQ 4-bit, group 128, sym (RTN; down_proj unquantized)",
                write_gptq(DEFAULT_MODEL, root / "e", 4, 128, False, True, "gptq", skip=down)[0],
                {},
            )
        )
        rows.append(
            (
                "AWQ 4-bit, group 64 (RTN; down_proj unquantized)",
                write_awq(DEFAULT_MODEL, root / "f", 64, skip=down)[0],
                {},
            )
        )
        rows.append(
            ("SqueezeLLM 4-bit (quantile tables)", write_squeezellm(DEFAULT_MODEL, root / "g")[0], {})
        )
        for symmetric in (True, False):
            rows.append(
                (
                    f"compressed-tensors W4A16 per channel, {'sym' if symmetric else 'asym'} (RTN by the "
                    "compressed-tensors package)",
                    write_ct_library_checkpoint(DEFAULT_MODEL, root / f"ct-{symmetric}", 4, -1, symmetric)[0],
                    {},
                )
            )
        rows.append(("FP8 e4m3 KV cache (unquantized weights)", DEFAULT_MODEL, {"kv_cache_dtype": "fp8"}))
        rows.append(
            ("FP8 e5m2 KV cache (unquantized weights)", DEFAULT_MODEL, {"kv_cache_dtype": "fp8_e5m2"})
        )
        wanted = sys.argv[1:]
        rows = [row for i, row in enumerate(rows) if i == 0 or not wanted or any(w in row[0] for w in wanted)]
        base: list[float] = []
        print(f"{len(windows)} windows of {WINDOW} tokens ({len(windows) * (WINDOW - 1)} scored)\n")
        print(
            "| weights | perplexity | vs unquantized | mean abs diff of log p per token |\n|---|---|---|---|"
        )
        for label, path, options in rows:
            lp = token_logprobs(path, windows, **options)
            base = base or lp
            ppl, base_ppl = (math.exp(-sum(x) / len(x)) for x in (lp, base))
            drift = sum(abs(a - b) for a, b in zip(lp, base, strict=True)) / len(lp)
            print(f"| {label} | {ppl:.2f} | {ppl / base_ppl:.4f}x | {drift:.4f} |", flush=True)


if __name__ == "__main__":
    main()
