"""Tokenizer loading and prompt encoding (the asyncio side of the engine; never the step loop).

A checkpoint with a plain fast tokenizer (tokenizer.json, named PreTrainedTokenizerFast in
tokenizer_config.json: Llama 3's, the default model's) is read with the `tokenizers` library and
jinja2 directly (engine/inputs/fast_tokenizer_files.py says which ones, fast_tokenizer.py how):
transformers' imports, and those a tokenizer's first load pulls in through AutoConfig
(torch.distributed, sympy, accelerate), take seconds. Every other checkpoint loads through
transformers' AutoTokenizer, imported here and not with this module. `TokenizerLoad` loads on a
thread of its own, which on a CPU runs beside the model's construction.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future
from pathlib import Path
from typing import TYPE_CHECKING, Any, Union

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from engine.inputs.fast_tokenizer import FastTokenizer

    AnyTokenizer = Union[FastTokenizer, PreTrainedTokenizerBase]

# Which loader read a tokenizer (logged at start-up): the `tokenizers` library directly, or transformers.
FAST_LOADER = "tokenizers"
AUTO_LOADER = "transformers"


def load_tokenizer(path: str) -> AnyTokenizer:
    return load_tokenizer_with_loader(path)[0]


def load_tokenizer_with_loader(path: str) -> tuple[AnyTokenizer, str, str | None]:
    """The tokenizer, the loader that read it (FAST_LOADER or AUTO_LOADER) and, for AUTO_LOADER,
    why weir's own could not."""
    from engine.inputs.fast_tokenizer_files import read_fast_tokenizer  # noqa: PLC0415 - on the loading thread

    fast = read_fast_tokenizer(path)
    if not isinstance(fast, str):
        return fast, FAST_LOADER, None
    return _auto_tokenizer(path), AUTO_LOADER, fast


def _auto_tokenizer(path: str) -> PreTrainedTokenizerBase:
    from transformers import AutoTokenizer  # noqa: PLC0415 - seconds of imports; see the module doc

    try:
        return AutoTokenizer.from_pretrained(path, **_declared_config(path))
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot load a tokenizer from {path!r}: {exc}") from exc


def _declared_config(path: str) -> dict[str, Any]:
    """`config=` for AutoTokenizer when the checkpoint's files decide its tokenizer by name alone.

    Without it AutoTokenizer builds the model's own config class to read `model_type`, and importing
    that class (transformers' type validators, activations, kernels hub, sharding) pulls in
    torch.distributed.tensor and sympy: ~2 s of CPU on a test machine, more on a GPU host, where it
    also holds the GIL against the model's construction and CUDA-graph capture beside it. When
    tokenizer_config.json names the class and neither file asks for remote code, AutoTokenizer only
    reads the config's model_type, name and tokenizer_class (strings), which a plain PreTrainedConfig
    carries as well. Anything else ({} here) takes AutoTokenizer's own path.
    """
    from engine.inputs.fast_tokenizer_files import json_object  # noqa: PLC0415 - on the loading thread

    root = Path(path)
    tok_cfg = json_object(root / "tokenizer_config.json")
    model_cfg = json_object(root / "config.json")
    if tok_cfg is None or model_cfg is None:
        return {}
    model_type = model_cfg.get("model_type")
    if (
        not isinstance(tok_cfg.get("tokenizer_class"), str)
        or not isinstance(model_type, str)
        or "auto_map" in tok_cfg
        or "auto_map" in model_cfg
    ):
        return {}
    from transformers import PreTrainedConfig  # noqa: PLC0415 - with AutoTokenizer, see above

    config = PreTrainedConfig()
    config.model_type = model_type
    config._name_or_path = path
    if isinstance(model_cfg.get("tokenizer_class"), str):
        config.tokenizer_class = model_cfg["tokenizer_class"]
    return {"config": config}


class TokenizerLoad:
    """`load_tokenizer(path)` on a thread of its own, started now; `result()` waits for it.

    The thread only imports and reads files (no torch device work), so on a CPU it runs beside the model's
    construction, weight loading and memory profile.
    """

    def __init__(self, path: str) -> None:
        self.seconds = 0.0  # how long the load took on its thread (once done)
        self.loader: str | None = None  # FAST_LOADER or AUTO_LOADER (once loaded)
        self.fallback_reason: str | None = None  # why AUTO_LOADER was needed
        self._future: Future[AnyTokenizer] = Future()
        threading.Thread(target=self._run, args=(path,), name="weir-tokenizer", daemon=True).start()

    def _run(self, path: str) -> None:
        start = time.perf_counter()
        try:
            tokenizer, self.loader, self.fallback_reason = load_tokenizer_with_loader(path)
        except BaseException as exc:  # noqa: BLE001 - raised again by result(), on the caller's thread
            self.seconds = time.perf_counter() - start
            self._future.set_exception(exc)
            return
        self.seconds = time.perf_counter() - start
        self._future.set_result(tokenizer)

    def result(self) -> AnyTokenizer:
        """The tokenizer, once loaded; raises what loading raised."""
        return self._future.result()

    def exception(self) -> BaseException | None:
        """What loading raised (None if it succeeded), once it is done."""
        return self._future.exception()


def encode_prompt(tokenizer: AnyTokenizer, prompt: str) -> list[int]:
    """Token ids of a text prompt, with the tokenizer's own special tokens (BOS for Llama)."""
    return list(tokenizer.encode(prompt, add_special_tokens=True))


def render_chat(
    tokenizer: AnyTokenizer,
    messages: list[dict[str, Any]],
    add_generation_prompt: bool = True,
    chat_template: str | None = None,
) -> list[int]:
    """Token ids of a conversation rendered with the model's chat template.

    The template already writes the special tokens it wants, so none are added on top.
    """
    template = chat_template or tokenizer.chat_template
    if not template:
        raise ValueError("this model has no chat template; use the completions API or pass chat_template")
    text = tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt, chat_template=template
    )
    return list(tokenizer.encode(text, add_special_tokens=False))
