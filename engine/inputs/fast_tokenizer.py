"""A checkpoint's tokenizer.json read with `tokenizers` alone: what weir uses of a transformers fast
tokenizer, without importing transformers (seconds of imports at every start-up).

`FastTokenizer` is the subset of transformers 5's TokenizersBackend that weir (app/, engine/) and
its tests call, with the same results: encode and decode are the Rust tokenizer's own (transformers
adds nothing to them for a checkpoint that engine/inputs/fast_tokenizer_files.py accepts), the
special tokens come from tokenizer_config.json, and the chat template renders through
engine/inputs/chat_template.py. Anything beyond the subset raises rather than guessing.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from tokenizers import AddedToken, Tokenizer

from engine.inputs.chat_template import compile_template, normalize_messages, render_chat_template

# transformers' named special tokens, in the order its all_special_tokens lists them.
SPECIAL_TOKEN_NAMES = (
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
)
VERY_LARGE_INTEGER = int(1e30)  # transformers' model_max_length when the config names none
# apply_chat_template's own arguments for tokenized output, which weir never passes.
_UNSUPPORTED_CHAT_ARGS = (
    "padding",
    "truncation",
    "max_length",
    "return_tensors",
    "return_assistant_tokens_mask",
    "tokenizer_kwargs",
    "sanitize_control_tokens",
)


class FastTokenizer:
    """transformers' fast tokenizer, as far as weir uses it (see the module docstring)."""

    is_fast = True

    def __init__(
        self,
        backend: Tokenizer,
        *,
        name_or_path: str,
        special_tokens: dict[str, str],
        extra_special_tokens: list[str],
        chat_template: str | dict[str, str] | None,
        clean_up_tokenization_spaces: Any = False,
        clean_up_for_bpe: bool = False,
        model_max_length: int = VERY_LARGE_INTEGER,
        model_input_names: Iterable[str] = ("input_ids", "token_type_ids", "attention_mask"),
    ) -> None:
        self._tokenizer = backend
        self.name_or_path = name_or_path
        self._special = {name: special_tokens.get(name) for name in SPECIAL_TOKEN_NAMES}
        self._extra = list(extra_special_tokens)
        self.chat_template = chat_template
        self.clean_up_tokenization_spaces = clean_up_tokenization_spaces
        # transformers skips the clean-up for BPE models (it strips real spaces before punctuation)
        # unless this flag asks for it anyway.
        self._clean_up_bpe = clean_up_for_bpe
        self.split_special_tokens = False
        self.model_max_length = model_max_length
        self.model_input_names = list(model_input_names)
        backend.encode_special_tokens = False
        if isinstance(chat_template, str):
            try:  # here, on the loading thread, rather than in the first chat request
                compile_template(chat_template)
            except Exception:  # noqa: BLE001, S110 - a broken template fails each render instead, as in transformers
                pass

    # ------------------------------------------------------------------ vocabulary
    @property
    def backend_tokenizer(self) -> Tokenizer:
        return self._tokenizer

    @property
    def vocab_size(self) -> int:
        """The base vocabulary, without the added tokens."""
        return self._tokenizer.get_vocab_size(with_added_tokens=False)

    def __len__(self) -> int:
        return self._tokenizer.get_vocab_size(with_added_tokens=True)

    def get_vocab(self) -> dict[str, int]:
        return self._tokenizer.get_vocab(with_added_tokens=True)

    @property
    def vocab(self) -> dict[str, int]:
        return self.get_vocab()

    @property
    def added_tokens_decoder(self) -> dict[int, AddedToken]:
        return self._tokenizer.get_added_tokens_decoder()

    @property
    def added_tokens_encoder(self) -> dict[str, int]:
        return {t.content: i for i, t in sorted(self.added_tokens_decoder.items(), key=lambda item: item[0])}

    def get_added_vocab(self) -> dict[str, int]:
        return self.added_tokens_encoder

    def convert_tokens_to_ids(self, tokens: str | list[str]) -> int | None | list[int | None]:
        if isinstance(tokens, str):
            return self._token_id(tokens)
        return [self._token_id(t) for t in tokens]

    def _token_id(self, token: str) -> int | None:
        index = self._tokenizer.token_to_id(token)
        return self.unk_token_id if index is None else index

    def convert_ids_to_tokens(self, ids: int | list[int], skip_special_tokens: bool = False) -> Any:
        if isinstance(ids, int):
            return self._tokenizer.id_to_token(ids)
        skip = set(self.all_special_ids) if skip_special_tokens else set()
        return [self._tokenizer.id_to_token(int(i)) for i in ids if int(i) not in skip]

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        decoder = self._tokenizer.decoder
        return decoder.decode(tokens) if decoder is not None else " ".join(tokens)

    # ------------------------------------------------------------------ special tokens
    def __getattr__(self, name: str) -> Any:
        # bos_token, bos_token_id, ... (only reached for names not set on the instance)
        base = name.removesuffix("_id")
        special = self.__dict__.get("_special", {})
        if base in special:
            value = special[base]
            if name == base or value is None:
                return value
            return self._token_id(value)
        raise AttributeError(f"{type(self).__name__} has no attribute {name}")

    @property
    def extra_special_tokens(self) -> list[str]:
        return list(self._extra)

    @property
    def extra_special_tokens_ids(self) -> list[int | None]:
        return [self._token_id(t) for t in self._extra]

    @property
    def special_tokens_map(self) -> dict[str, str]:
        return {name: value for name, value in self._special.items() if value is not None}

    @property
    def all_special_tokens(self) -> list[str]:
        return list(dict.fromkeys([*self.special_tokens_map.values(), *self._extra]))

    @property
    def all_special_ids(self) -> list[int | None]:
        return [self._token_id(t) for t in self.all_special_tokens]

    # ------------------------------------------------------------------ encode / decode
    def encode(
        self, text: str, add_special_tokens: bool = True, split_special_tokens: bool | None = None
    ) -> list[int]:
        return self._encode(text, add_special_tokens, split_special_tokens)

    def __call__(
        self, text: str, add_special_tokens: bool = True, split_special_tokens: bool | None = None
    ) -> dict[str, list[int]]:
        encoding = self._encoding(text, add_special_tokens, split_special_tokens)
        out = {"input_ids": encoding.ids}
        if "token_type_ids" in self.model_input_names:
            out["token_type_ids"] = encoding.type_ids
        if "attention_mask" in self.model_input_names:
            out["attention_mask"] = encoding.attention_mask
        return out

    def _encode(self, text: str, add_special_tokens: bool, split_special_tokens: bool | None) -> list[int]:
        return self._encoding(text, add_special_tokens, split_special_tokens).ids

    def _encoding(self, text: str, add_special_tokens: bool, split_special_tokens: bool | None) -> Any:
        if not isinstance(text, str):
            raise ValueError("weir's tokenizer encodes one text (a str) at a time")
        split = self.split_special_tokens if split_special_tokens is None else split_special_tokens
        # As transformers does, the flag stays set on the shared Rust tokenizer after the call.
        if self._tokenizer.encode_special_tokens != split:
            self._tokenizer.encode_special_tokens = split
        return self._tokenizer.encode(text, add_special_tokens=add_special_tokens)

    def decode(
        self,
        token_ids: Any,
        skip_special_tokens: bool = False,
        clean_up_tokenization_spaces: bool | None = None,
        **kwargs: Any,  # spaces_between_special_tokens and the like: transformers ignores them too
    ) -> str | list[str]:
        if hasattr(token_ids, "tolist"):  # a tensor or an array
            token_ids = token_ids.tolist()
        if isinstance(token_ids, dict):
            token_ids = token_ids["input_ids"]
        if isinstance(token_ids, int):
            token_ids = [token_ids]
        if isinstance(token_ids, (list, tuple)) and token_ids and isinstance(token_ids[0], (list, tuple)):
            return [self._decode(ids, skip_special_tokens, clean_up_tokenization_spaces) for ids in token_ids]
        return self._decode(token_ids, skip_special_tokens, clean_up_tokenization_spaces)

    def _decode(self, ids: Any, skip_special_tokens: bool, clean_up: bool | None) -> str:
        text = self._tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)
        if clean_up is None:
            clean_up = self.clean_up_tokenization_spaces
        if clean_up and (type(self._tokenizer.model).__name__ != "BPE" or self._clean_up_bpe):
            text = self.clean_up_tokenization(text)
        return text

    @staticmethod
    def clean_up_tokenization(text: str) -> str:
        """The space clean-up of WordPiece-era tokenizers (" ." -> ".", " n't" -> "n't", ...)."""
        for before, after in _CLEAN_UP:
            text = text.replace(before, after)
        return text

    # ------------------------------------------------------------------ chat
    def get_chat_template(self, chat_template: str | None = None, tools: list | None = None) -> str:
        """The template text: `chat_template` (a template, or a name among the model's templates),
        else the model's (its "tool_use" one when tools are given, else its "default" one)."""
        templates = self.chat_template
        if isinstance(templates, dict):
            if chat_template is not None and chat_template in templates:
                return templates[chat_template]
            if chat_template is None:
                if tools is not None and "tool_use" in templates:
                    return templates["tool_use"]
                if "default" in templates:
                    return templates["default"]
                raise ValueError(
                    "This model has multiple chat templates with no default specified! Please either pass a chat "
                    "template or the name of the template you wish to use to the `chat_template` argument. Available "
                    f"template names are {sorted(templates.keys())}."
                )
        elif chat_template is None:
            if templates is None:
                raise ValueError(
                    "Cannot use chat template functions because tokenizer.chat_template is not set and no template "
                    "argument was passed! For information about writing templates and setting the "
                    "tokenizer.chat_template attribute, please see the documentation at "
                    "https://huggingface.co/docs/transformers/main/en/chat_templating"
                )
            return templates
        return chat_template

    def apply_chat_template(
        self,
        conversation: Any,
        tools: list[dict] | None = None,
        documents: list[dict] | None = None,
        chat_template: str | None = None,
        add_generation_prompt: bool = False,
        continue_final_message: bool | str = False,
        tokenize: bool = True,
        return_dict: bool = True,
        **kwargs: Any,
    ) -> Any:
        """The rendered conversation (a text with tokenize=False; else its ids, as a dict with
        return_dict, the default, as transformers returns them). Extra keyword arguments are
        template variables."""
        unsupported = [name for name in _UNSUPPORTED_CHAT_ARGS if name in kwargs]
        if unsupported:
            raise NotImplementedError(
                f"apply_chat_template({', '.join(unsupported)}=...) needs transformers' tokenizer"
            )
        template = self.get_chat_template(chat_template, tools)
        if isinstance(conversation, (list, tuple)) and len(conversation) == 0:
            raise ValueError(
                "Cannot apply chat template to an empty conversation. Provide at least one message."
            )
        batched = isinstance(conversation, (list, tuple)) and (
            isinstance(conversation[0], (list, tuple)) or hasattr(conversation[0], "messages")
        )
        conversations = [normalize_messages(c) for c in (conversation if batched else [conversation])]
        if continue_final_message and add_generation_prompt:
            raise ValueError(
                "continue_final_message and add_generation_prompt are not compatible. Use continue_final_message when you want the model to continue the final message, and add_generation_prompt when you want to add a header that will prompt it to start a new assistant message instead."
            )
        variables = {**self.special_tokens_map, **kwargs}  # the caller's names win
        texts = [
            render_chat_template(
                template,
                chat,
                tools=tools,
                documents=documents,
                add_generation_prompt=add_generation_prompt,
                continue_final_message=continue_final_message,
                variables=variables,
            )
            for chat in conversations
        ]
        if not tokenize:
            return texts if batched else texts[0]
        encoded = [self(t, add_special_tokens=False) for t in texts]
        if not return_dict:
            ids = [e["input_ids"] for e in encoded]
            return ids if batched else ids[0]
        if not batched:
            return encoded[0]
        return {key: [e[key] for e in encoded] for key in encoded[0]}

    def __repr__(self) -> str:
        return f"FastTokenizer(name_or_path={self.name_or_path!r}, vocab_size={self.vocab_size}, len={len(self)})"


_CLEAN_UP = (
    (" .", "."),
    (" ?", "?"),
    (" !", "!"),
    (" ,", ","),
    (" ' ", "'"),
    (" n't", "n't"),
    (" 'm", "'m"),
    (" 's", "'s"),
    (" 've", "'ve"),
    (" 're", "'re"),
)
