"""Tokenizer loading and prompt encoding (the asyncio side of the engine; never the step loop)."""

from __future__ import annotations

from typing import Any

from transformers import AutoTokenizer, PreTrainedTokenizerBase


def load_tokenizer(path: str) -> PreTrainedTokenizerBase:
    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot load a tokenizer from {path!r}: {exc}") from exc


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
