"""`weir bench latency|throughput|serve`: the loadtest/ benchmarks under `vllm bench`'s names.

Each subcommand is one loadtest/ script (its own parser, so every flag of the script works too), with the
defaults of the vLLM subcommand it mirrors and, for latency and throughput, the embedded default model
unless --model DIR or --shape NAME says otherwise. `weir bench serve` is a client only: it streams to a
running OpenAI-compatible server (weir's or another engine's) at --base-url or --host/--port
(default 127.0.0.1:8000), and --model / --served-model-name name the model in its requests, as in vLLM.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from typing import Any

# name -> (module, one-line help, defaults that make it `vllm bench NAME`-shaped)
SUBCOMMANDS: dict[str, tuple[str, str, dict[str, Any]]] = {
    "latency": (
        "loadtest.bench_latency",
        "Latency of one batch (--batch-size, --input-len, --output-len) over --num-iters iterations: "
        "ITL, TTFT, end-to-end latency, roofline fraction.",
        {"batch_sizes": "8", "num_iters": 30, "num_iters_warmup": 10},
    ),
    "throughput": (
        "loadtest.bench_throughput",
        "Offline throughput: --num-prompts random requests queued at once: req/s, output and total tok/s "
        "(optionally against transformers peers, --peer hf,hf-cb).",
        {"workload": "t2"},  # vLLM's random dataset: 1000 prompts of 1024 tokens, 128 out
    ),
    "serve": (
        "loadtest.bench_serving",
        "Serving: stream --num-prompts requests at --request-rate to a running OpenAI-compatible server: "
        "TTFT, ITL, TPOT, throughput.",
        # Prompt ids below 4096: the embedded model's vocabulary, within every real model's (no tokenizer here).
        {"request_rates": "inf", "warmup_requests": 1, "offline": "none", "token_id_max": 4096},
    ),
}


def build_parser() -> argparse.ArgumentParser:
    """`weir bench --help`: the subcommands (each one's own --help lists its flags)."""
    parser = argparse.ArgumentParser(
        prog="weir bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="bench", metavar="{latency,throughput,serve}")
    for name, (_module, help_text, _defaults) in SUBCOMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


def _given(argv: Sequence[str], *flags: str) -> bool:
    return any(a == f or a.startswith(f + "=") for a in argv for f in flags)


def serve_argv(argv: Sequence[str]) -> list[str]:
    """vLLM's meaning of two flags: --model and --served-model-name name the model in requests (the
    script's --model is a local checkout); without --base-url/--host/--port the server is 127.0.0.1:8000."""
    out: list[str] = []
    model_name: str | None = None
    served_name: str | None = None
    it = iter(argv)
    for arg in it:
        flag, eq, value = arg.partition("=")
        if flag in ("--model", "--served-model-name"):
            value = value if eq else next(it, "")
            if flag == "--model":
                model_name = value
            else:
                served_name = value
            continue
        out.append(arg)
    name = served_name or model_name
    if name:
        out += ["--model-name", name]
    if not _given(out, "--base-url", "--url", "--host", "--port"):
        out += ["--port", "8000"]
    return out


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[2:] if argv is None else argv)
    parser = build_parser()
    if not argv or argv[0] in ("-h", "--help"):
        parser.print_help()
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in SUBCOMMANDS:
        parser.error(f"unknown benchmark {name!r} (choose from {', '.join(SUBCOMMANDS)})")
    module_name, help_text, defaults = SUBCOMMANDS[name]
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        print(
            f"weir bench: error: {module_name} is not importable ({exc}); run from a weir checkout",
            file=sys.stderr,
        )
        return 2
    script = module.build_parser()
    script.prog = f"weir bench {name}"
    script.description = f"{help_text}\n\n{module.__doc__}"
    script.set_defaults(**defaults)
    if name == "serve":
        rest = serve_argv(rest)
    else:
        from app.config import default_model_dir

        script.set_defaults(model=default_model_dir())  # --shape still wins (resolve_model)
    return int(module.main(rest, script))
