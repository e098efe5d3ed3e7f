"""Tokenizer loading and prompt encoding (the asyncio side of the engine; never the step loop).

transformers is imported where a tokenizer is loaded, not with this module: its imports (and those a
tokenizer's first load pulls in through AutoConfig: torch.distributed, sympy, accelerate) take
seconds, which `TokenizerLoad` spends on a thread of its own while the engine builds the model.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


def load_tokenizer(path: str) -> PreTrainedTokenizerBase:
    from transformers import AutoTokenizer  # noqa: PLC0415 - seconds of imports; see the module doc

    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot load a tokenizer from {path!r}: {exc}") from exc


class TokenizerLoad:
    """`load_tokenizer(path)` on a thread of its own, started now; `result()` waits for it.

    The thread only imports and reads files (no torch device work), so it can run beside the model's
    construction, weight loading and memory profile.
    """

    def __init__(self, path: str) -> None:
        self.seconds = 0.0  # how long the load took on its thread (once done)
        self._future: Future[PreTrainedTokenizerBase] = Future()
        threading.Thread(target=self._run, args=(path,), name="weir-tokenizer", daemon=True).start()

    def _run(self, path: str) -> None:
        start = time.perf_counter()
        try:
            tokenizer = load_tokenizer(path)
        except BaseException as exc:  # noqa: BLE001 - raised again by result(), on the caller's thread
            self.seconds = time.perf_counter() - start
            self._future.set_exception(exc)
            return
        self.seconds = time.perf_counter() - start
        self._future.set_result(tokenizer)

    def result(self) -> PreTrainedTokenizerBase:
        """The tokenizer, once loaded; raises what loading raised."""
        return self._future.result()

    def exception(self) -> BaseException | None:
        """What loading raised (None if it succeeded), once it is done."""
        return self._future.exception()


def encode_prompt(tokenizer: PreTrainedTokenizerBase, prompt: str) -> list[int]:
    """Token ids of a text prompt, with the tokenizer's own special tokens (BOS for Llama)."""
    return list(tokenizer.encode(prompt, add_special_tokens=True))


def render_chat(
    tokenizer: PreTrainedTokenizerBase,
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
