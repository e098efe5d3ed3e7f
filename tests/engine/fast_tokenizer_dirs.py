"""Tokenizer checkpoints for the fast tokenizer's parity tests, built offline with `tokenizers`.

Each is a directory with tokenizer.json, tokenizer_config.json and config.json, as a real checkpoint
ships them: a Llama-3-style byte-level BPE (a BOS-prepending post-processor, header and turn
tokens, an added non-special token, a token that strips the space before it, add_bos_token false in
its config, which transformers 5 ignores beside a tokenizer.json) and a BERT-style WordPiece (CLS/SEP
post-processor, lower-casing normalizer, clean_up_tokenization_spaces true, named chat templates).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from tests.tiny_models import stdlib_corpus

LLAMA3_SPECIALS = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
    "<|reserved_special_token_0|>",
]
LLAMA3_SPLIT = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
# Exercises what transformers' template environment adds: namespace, raise_exception, strftime_now,
# tojson (no HTML escaping), dict(), loop controls, the {% generation %} tag, trim/lstrip blocks.
LLAMA3_TEMPLATE = """{{- bos_token }}
{%- set ns = namespace(system="", turns=0) %}
{%- if messages[0]['role'] == 'system' %}
    {%- set ns.system = messages[0]['content'] %}
    {%- set messages = messages[1:] %}
{%- endif %}
{{- '<|start_header_id|>system<|end_header_id|>\\n\\n' }}
{%- if date_string is defined %}{{ 'Date: ' + date_string + '\\n' }}{% endif %}
{{- 'Year: ' + strftime_now('%Y')[:2] + '\\n' }}
{%- if tools is not none %}{{ tools | tojson(indent=2) }}{{ '\\n' }}{% endif %}
{%- if documents is not none %}{% for d in documents %}{{ d | tojson }}{% endfor %}{% endif %}
{{- ns.system + '<|eot_id|>' }}
{%- for message in messages %}
    {%- if message['role'] not in ['user', 'assistant'] %}
        {{- raise_exception('Conversation roles must be user or assistant, got ' + message['role']) }}
    {%- endif %}
    {%- if loop.index0 > 6 %}{% break %}{% endif %}
    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}
    {%- if message['content'] is string %}
        {%- if message['role'] == 'assistant' %}{% generation %}{{ message['content'] | trim }}{% endgeneration %}
        {%- else %}{{ message['content'] | trim }}{% endif %}
    {%- else %}
        {%- for part in message['content'] %}
            {%- if part['type'] != 'text' %}{% continue %}{% endif %}
            {{- part['text'] }}
        {%- endfor %}
    {%- endif %}
    {%- if message.name is defined %}{{ dict(name=message.name) | tojson }}{% endif %}
    {{- '<|eot_id|>' }}
    {%- set ns.turns = ns.turns + 1 %}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"""
BERT_TEMPLATE = (
    "{% for m in messages %}[{{ m['role'] | upper }}] {{ m['content'] }} {{ sep_token }} {% endfor %}"
)
BERT_TOOL_TEMPLATE = "TOOLS {{ tools | tojson }} {% for m in messages %}{{ m['content'] }}{% endfor %}"


def build_llama3(path: Path) -> Path:
    from tokenizers import (
        AddedToken,
        Regex,
        Tokenizer,
        decoders,
        models,
        pre_tokenizers,
        processors,
        trainers,
    )

    tok = Tokenizer(models.BPE(ignore_merges=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator(stdlib_corpus(200_000), trainer=trainer)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in LLAMA3_SPECIALS])
    tok.add_tokens(
        [AddedToken("<tool>", special=False, normalized=False), AddedToken(" <mask>", lstrip=True)]
    )
    bos = tok.token_to_id("<|begin_of_text|>")
    tok.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A:0",
        pair="<|begin_of_text|> $A:0 <|begin_of_text|> $B:1",
        special_tokens=[("<|begin_of_text|>", bos)],
    )
    return _save(
        path,
        tok,
        {
            "add_bos_token": False,  # ignored by transformers 5 beside a tokenizer.json
            "bos_token": "<|begin_of_text|>",
            "eos_token": "<|eot_id|>",
            "pad_token": "<|end_of_text|>",
            "clean_up_tokenization_spaces": True,  # ignored for BPE by transformers 5
            "chat_template": LLAMA3_TEMPLATE,
            "model_input_names": ["input_ids", "attention_mask"],
            "model_max_length": 131072,
            "tokenizer_class": "PreTrainedTokenizerFast",
        },
        "llama",
        with_decoder=True,
    )


def build_bert(path: Path) -> Path:
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece(cleanup=False)  # the clean-up is then tokenizer_config.json's
    trainer = trainers.WordPieceTrainer(vocab_size=700, special_tokens=specials, show_progress=False)
    tok.train_from_iterator(stdlib_corpus(200_000), trainer=trainer)
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A:0 [SEP]:0",
        pair="[CLS] $A:0 [SEP]:0 $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls), ("[SEP]", sep)],
    )
    return _save(
        path,
        tok,
        {
            "cls_token": "[CLS]",
            "sep_token": "[SEP]",
            "pad_token": "[PAD]",
            "unk_token": "[UNK]",
            "mask_token": "[MASK]",
            "clean_up_tokenization_spaces": True,
            "chat_template": [
                {"name": "default", "template": BERT_TEMPLATE},
                {"name": "tool_use", "template": BERT_TOOL_TEMPLATE},
            ],
            "tokenizer_class": "TokenizersBackend",
        },
        "mistral",
        with_decoder=False,
    )


def with_config(tokenizer_dir: Path, path: Path, model_type: str = "llama") -> Path:
    """A copy of a tokenizer directory with the config.json of a `model_type` checkpoint."""
    shutil.copytree(tokenizer_dir, path)
    (path / "config.json").write_text(json.dumps({"model_type": model_type}))
    return path


def edit_json(path: Path, **fields: object) -> None:
    """Set (None: remove) top-level fields of a JSON file."""
    data = json.loads(path.read_text())
    for key, value in fields.items():
        if value is None:
            data.pop(key, None)
        else:
            data[key] = value
    path.write_text(json.dumps(data))


def _save(path: Path, tok: object, config: dict, model_type: str, with_decoder: bool) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    tok.save(str(path / "tokenizer.json"))
    if with_decoder:  # as transformers writes it: every added token, by id
        config["added_tokens_decoder"] = {
            str(i): t.__getstate__() for i, t in sorted(tok.get_added_tokens_decoder().items())
        }
    (path / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    (path / "config.json").write_text(json.dumps({"model_type": model_type}))
    return path
