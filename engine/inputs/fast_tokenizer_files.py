"""Which checkpoints weir's own tokenizer (engine/inputs/fast_tokenizer.py) reads, and reading them.

transformers' AutoTokenizer loads a tokenizer.json unchanged only on some paths, and each of them is
checked here before the file is read without it: the class it picks is the plain fast tokenizer
(tokenizer_config.json names PreTrainedTokenizerFast or TokenizersBackend, the model type is one
whose registered tokenizer does not replace that class, no remote code, no Mistral tekken.json),
and nothing in the configuration would make transformers change the Rust tokenizer after loading
it: every special token and every entry of added_tokens_decoder must already be in tokenizer.json
with the same properties (transformers adds or re-flags those that are not), no truncation or
padding is baked in (transformers drops them on the first encode), no split_special_tokens, no
model-specific special tokens, no legacy special_tokens_map.json / added_tokens.json. Checked
against transformers 5 (tests/engine/test_fast_tokenizer.py compares both on several tokenizers):
any other major version, and anything not listed, takes AutoTokenizer's path.

With a tokenizer.json, transformers 5 ignores tokenizer_config.json's add_bos_token and
add_eos_token: the file's post-processor decides which special tokens `encode` adds. A file with no
post-processor gets an empty TemplateProcessing, as transformers gives it.
"""

from __future__ import annotations

import json
from importlib import metadata
from pathlib import Path
from typing import Any

from engine.inputs.chat_template import MIN_JINJA2
from engine.inputs.fast_tokenizer import SPECIAL_TOKEN_NAMES, VERY_LARGE_INTEGER, FastTokenizer

# tokenizer_config.json classes that AutoTokenizer loads as the plain fast tokenizer.
PLAIN_CLASSES = ("PreTrainedTokenizerFast", "TokenizersBackend")
# Model types for which transformers 5 keeps a declared plain class (for others, e.g. qwen2, it
# swaps in the model's own tokenizer class, which rebuilds the pre-tokenizer and decoder).
VERIFIED_MODEL_TYPES = (
    "llama",
    "mistral",
    "mixtral",
    "qwen3",
)  # mixtral: mistral's mapping in transformers 5
_ADDED_TOKEN_TYPE = "AddedToken"  # how tokenizer_config.json marks an AddedToken dict


def read_fast_tokenizer(path: str) -> FastTokenizer | str:
    """weir's own tokenizer for the checkpoint directory `path`, or why AutoTokenizer must load it."""
    root = Path(path)
    if not root.is_dir():
        return "not a local directory"
    reason = _versions_problem()
    if reason:
        return reason
    if not (root / "tokenizer.json").is_file():
        return "no tokenizer.json"
    tok_cfg = json_object(root / "tokenizer_config.json")
    model_cfg = json_object(root / "config.json")
    if tok_cfg is None or model_cfg is None:
        return "no readable tokenizer_config.json and config.json"
    reason = _config_problem(root, tok_cfg, model_cfg)
    if reason:
        return reason
    named = {name: _token_text(tok_cfg.get(name)) for name in SPECIAL_TOKEN_NAMES}
    extras_cfg = tok_cfg.get("extra_special_tokens") or tok_cfg.get("additional_special_tokens") or []
    extras = [_token_text(t) for t in extras_cfg] if isinstance(extras_cfg, list) else [False]
    if any(v is False for v in named.values()) or any(not isinstance(t, str) for t in extras):
        return "a special token that is neither a string nor an AddedToken"
    templates = _chat_templates(root, tok_cfg)
    if templates is False:
        return "a chat_template that is neither a string nor a list of named templates"

    from tokenizers import Tokenizer, processors  # noqa: PLC0415 - on the tokenizer's thread

    try:
        backend = Tokenizer.from_file(str(root / "tokenizer.json"))
    except Exception as exc:  # noqa: BLE001 - AutoTokenizer reports the file's problem in its words
        return f"tokenizer.json does not load ({exc})"
    if backend.truncation is not None or backend.padding is not None:
        return "tokenizer.json sets truncation or padding"
    reason = _added_tokens_problem(backend, tok_cfg, named, extras)
    if reason:
        return reason
    if backend.post_processor is None:
        backend.post_processor = processors.TemplateProcessing(
            single="$A:0", pair="$A:0 $B:1", special_tokens=[]
        )
    max_length = tok_cfg.get("model_max_length", tok_cfg.get("max_len"))
    return FastTokenizer(
        backend,
        name_or_path=path,
        special_tokens={k: v for k, v in named.items() if isinstance(v, str)},
        extra_special_tokens=extras,
        chat_template=templates,
        clean_up_tokenization_spaces=tok_cfg.get("clean_up_tokenization_spaces", False),
        clean_up_for_bpe=bool(
            tok_cfg.get("clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output", False)
        ),
        model_max_length=VERY_LARGE_INTEGER if max_length is None else max_length,
        model_input_names=tok_cfg.get("model_input_names", ("input_ids", "attention_mask")),
    )


def _versions_problem() -> str | None:
    try:
        transformers_version = metadata.version("transformers")
        jinja2_version = metadata.version("jinja2")
    except metadata.PackageNotFoundError as exc:
        return f"{exc.name} is not installed"
    if not transformers_version.startswith("5."):
        return f"transformers {transformers_version} (weir's tokenizer matches transformers 5)"
    if _version_tuple(jinja2_version) < MIN_JINJA2:
        return f"jinja2 {jinja2_version} (chat templates need 3.1.6)"
    return None


def _version_tuple(version: str) -> tuple[int, ...]:
    parts = []
    for part in version.split(".")[:3]:
        digits = "".join(c for c in part if c.isdigit()) if part[:1].isdigit() else ""
        parts.append(int(digits) if digits else 0)
    return tuple(parts)


def json_object(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _config_problem(root: Path, tok_cfg: dict, model_cfg: dict) -> str | None:
    if "auto_map" in tok_cfg or "auto_map" in model_cfg:
        return "auto_map (remote code)"
    tokenizer_class = tok_cfg.get("tokenizer_class")
    if tokenizer_class not in PLAIN_CLASSES:
        return f"tokenizer_class {tokenizer_class!r} (only {' or '.join(PLAIN_CLASSES)} is read without transformers)"
    model_type = model_cfg.get("model_type")
    if model_type not in VERIFIED_MODEL_TYPES or "model_name" in model_cfg:
        return f"model_type {model_type!r} (verified: {', '.join(VERIFIED_MODEL_TYPES)})"
    if (root / "tekken.json").exists():
        return "a Mistral tekken.json"
    if tok_cfg.get("backend", "tokenizers") != "tokenizers":
        return f"backend {tok_cfg['backend']!r}"
    for key in ("fast_tokenizer_files", "fix_mistral_regex"):
        if key in tok_cfg:
            return f"tokenizer_config.json sets {key}"
    if tok_cfg.get("split_special_tokens"):
        return "split_special_tokens"
    for key in ("padding_side", "truncation_side"):
        if tok_cfg.get(key, "right") not in ("right", "left"):
            return f"{key} {tok_cfg[key]!r}"
    if isinstance(tok_cfg.get("extra_special_tokens"), dict):
        return "named extra_special_tokens"
    for key, value in tok_cfg.items():
        if key.endswith("_token") and key not in SPECIAL_TOKEN_NAMES and isinstance(value, (str, dict)):
            return f"a model-specific special token ({key})"
    if "added_tokens_decoder" not in tok_cfg:
        for legacy in ("special_tokens_map.json", "added_tokens.json"):
            if (root / legacy).exists():
                return f"a legacy {legacy}"
    return None


def _token_text(value: Any) -> str | None | bool:
    """A special token's text as tokenizer_config.json gives it (a string, or an AddedToken dict
    marked `"__type": "AddedToken"`); False for anything else."""
    if value is None or isinstance(value, str):
        return value
    if (
        isinstance(value, dict)
        and value.get("__type") == _ADDED_TOKEN_TYPE
        and isinstance(value.get("content"), str)
    ):
        return value["content"]
    return False  # transformers refuses it (or, for a plain dict, keeps it as no token at all)


def _added_tokens_problem(backend: Any, tok_cfg: dict, named: dict, extras: list[str]) -> str | None:
    """Why transformers would add or re-flag tokens of this backend (None: it would change nothing).

    It re-adds every entry of added_tokens_decoder (a named special token's entry flagged special),
    which changes the backend unless an identical token is already there, and adds the special
    tokens that are not added tokens yet."""
    from tokenizers import AddedToken  # noqa: PLC0415

    have = backend.get_added_tokens_decoder()  # id -> AddedToken
    have_texts = {t.content for t in have.values()}
    named_texts = {v for v in named.values() if isinstance(v, str)}
    declared = tok_cfg.get("added_tokens_decoder")
    if declared is not None:
        if not isinstance(declared, dict):
            return "added_tokens_decoder is not a mapping"
        for index, fields in declared.items():
            if not isinstance(fields, dict):
                return "added_tokens_decoder holds a non-AddedToken"
            fields = {k: v for k, v in fields.items() if k != "__type"}
            try:
                want = AddedToken(**fields).__getstate__()
                index = int(index)
            except (TypeError, ValueError):
                return f"added_tokens_decoder entry {index!r} is not an AddedToken"
            if not want["special"] and want["content"] in named_texts:
                want["special"] = True
            current = have.get(index)
            if current is None or current.__getstate__() != want:
                return f"added token {want['content']!r} (id {index}) differs from tokenizer.json's"
    else:  # transformers takes tokenizer.json's own added tokens: only the special flag can change
        for current in have.values():
            if current.content in named_texts and not current.special:
                return f"special token {current.content!r} is not special in tokenizer.json"
    for text in [*named_texts, *extras]:
        if text not in have_texts:
            return f"special token {text!r} is not an added token of tokenizer.json"
    return None


def _chat_templates(root: Path, tok_cfg: dict) -> str | dict[str, str] | None | bool:
    """The chat template(s) as transformers reads them: chat_template.jinja and the files of
    additional_chat_templates/ win over tokenizer_config.json's chat_template (a string, or a list of
    {name, template}, which becomes a dict); False for anything else."""
    files: dict[str, str] = {}
    default = root / "chat_template.jinja"
    if default.is_file():
        files["default"] = default.read_text(encoding="utf-8")
    extra_dir = root / "additional_chat_templates"
    if extra_dir.is_dir():
        for f in sorted(extra_dir.glob("*.jinja")):
            files[f.name.removesuffix(".jinja")] = f.read_text(encoding="utf-8")
    if files:
        return files["default"] if list(files) == ["default"] else files
    template = tok_cfg.get("chat_template")
    if template is None or isinstance(template, str):
        return template
    if isinstance(template, list) and all(
        isinstance(t, dict) and isinstance(t.get("name"), str) and isinstance(t.get("template"), str)
        for t in template
    ):
        return {t["name"]: t["template"] for t in template}
    return False
