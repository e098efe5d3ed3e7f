"""What `weir serve` imports before its engine starts building, in a fresh interpreter.

Every module imported there is paid by every start-up, on the critical path: transformers' tokenizer
stack (seconds, with the torch.distributed.tensor and sympy it drags in through AutoConfig) is not
imported at all for a plain fast tokenizer, which weir reads itself on the tokenizer's own thread
(engine/inputs/tokenizer.py), and the rest named below is not needed to serve at all. These tests fail when an eager import brings one of them back; they time
nothing (the machine's speed would make any bound flaky).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

# What app/cli.py's `serve` imports before it builds the engine (and the app, right after it).
SERVE_PATH = ("app.cli", "app.startup", "app.logging", "engine.async_engine", "app.runner", "app.server")

# Not before the engine builds: the tokenizer stack (its thread imports what it needs), what only torch.compile,
# DTensor or symbolic shapes use (weir uses none of them), the Triton kernels (imported where a
# runner picks them), optional extras and the other commands.
HEAVY = (
    "transformers",
    "huggingface_hub",
    "jinja2",
    "accelerate",
    "PIL",
    "sympy",
    "mpmath",
    "torch._dynamo",
    "torch._inductor",
    "torch.distributed.tensor",
    "triton",
    "ops.triton",
    "matplotlib",
    "ray",
    "peft",
    "compressed_tensors",
    "app.bench_cli",
    "loadtest",
)


def _fresh(code: str) -> dict:
    """Run `code` in a fresh interpreter (repo root on the path, GC as in `weir serve`); its last
    stdout line is JSON."""
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=240,
        check=True,
    ).stdout
    return json.loads(out.strip().splitlines()[-1])


def _loaded(modules: list[str], names: tuple[str, ...]) -> list[str]:
    """The names in `names` that are, or are a package of, one of `modules`."""
    return sorted({n for n in names for m in modules if m == n or m.startswith(n + ".")})


def test_cli_imports_neither_torch_nor_the_server() -> None:
    """`weir --help`, `--version` and configuration errors answer before torch would have loaded."""
    r = _fresh("import sys, json\nimport app.cli\nprint(json.dumps(sorted(sys.modules)))")
    assert _loaded(r, ("torch", "numpy", "uvicorn", "starlette", "structlog", *HEAVY)) == []


def test_serve_path_imports_nothing_heavy_beyond_torch() -> None:
    # What `import torch` itself loads is torch's (some versions import more at start), not weir's.
    code = (
        "import gc, sys, json, importlib\n"
        "gc.disable()\n"
        "import torch\n"
        "before = set(sys.modules)\n"
        f"for name in {SERVE_PATH!r}: importlib.import_module(name)\n"
        "print(json.dumps(sorted(set(sys.modules) - before)))\n"
    )
    added = _fresh(code)
    assert "engine.worker.model_runner" in added  # the path was imported (not already in torch's set)
    assert _loaded(added, HEAVY) == []


def test_engine_start_imports_no_transformers_for_a_plain_fast_tokenizer() -> None:
    """Building an engine on the default model (a tokenizer.json named PreTrainedTokenizerFast) reads
    its tokenizer with `tokenizers` and jinja2 on the tokenizer's thread: transformers (seconds of
    imports, with the DTensor and sympy its config classes drag in) is imported on no thread at all."""
    code = (
        "import gc, sys, json, threading\n"
        "gc.disable()\n"
        "first = {}\n"
        "def hook(event, args):\n"
        "    if event == 'import' and args[0] not in sys.modules:\n"
        "        first.setdefault(args[0], threading.current_thread().name)\n"
        "sys.addaudithook(hook)\n"
        "from app.config import default_model_dir\n"
        "from engine.config import EngineConfig\n"
        "from engine.llm_engine import LLMEngine\n"
        "engine = LLMEngine(EngineConfig(model=str(default_model_dir()), device='cpu', max_model_len=64,\n"
        "    max_num_batched_tokens=64, max_num_seqs=4, num_kv_blocks=16))\n"
        "from app.prompt_encoder import PromptEncoder\n"
        "PromptEncoder(engine.tokenizer).close()  # what the server builds on it\n"
        "chat = engine.tokenizer.apply_chat_template([{'role': 'user', 'content': 'hi'}], tokenize=False)\n"
        "print(json.dumps({'tokens': engine.tokenizer.encode('hello'), 'chat': chat,\n"
        "    'loader': engine.startup_phases.labels,\n"
        "    'threads': {n: t for n, t in first.items() if n.split('.')[0] == 'jinja2'},\n"
        "    'modules': sorted(sys.modules)}))\n"
    )
    r = _fresh(code)
    assert r["tokens"] and r["chat"] == "<|im_start|>user\nhi<|im_end|>\n"  # the tokenizer did load
    assert r["loader"] == {"tokenizer_loader": "tokenizers"}
    # The chat template was compiled while loading, on the tokenizer's thread.
    assert r["threads"].get("jinja2") == "weir-tokenizer"
    assert set(r["threads"].values()) == {"weir-tokenizer"}
    assert (
        _loaded(r["modules"], ("transformers", "huggingface_hub", "sympy", "torch.distributed.tensor")) == []
    )
