"""Model folders at real model shapes for `load_format="dummy"`: config.json, generation_config.json and a
tokenizer, no weights. The benchmarks run on random weights (no model hub on the GPU machine), so the
tokenizer only has to cover the real vocabulary: a word-level one whose token i is the word `t<i>`.

    python loadtest/model_shapes.py llama3-8b /tmp/llama3-8b
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

# config.json of the published checkpoints (meta-llama/Meta-Llama-3-8B, Qwen/Qwen3-0.6B).
SHAPES: dict[str, dict[str, Any]] = {
    "llama3-8b": {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": 128000,
        "eos_token_id": 128001,
        "hidden_act": "silu",
        "hidden_size": 4096,
        "initializer_range": 0.02,
        "intermediate_size": 14336,
        "max_position_embeddings": 8192,
        "mlp_bias": False,
        "num_attention_heads": 32,
        "num_hidden_layers": 32,
        "num_key_value_heads": 8,
        "rms_norm_eps": 1e-05,
        "rope_scaling": None,
        "rope_theta": 500000.0,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "use_cache": True,
        "vocab_size": 128256,
    },
    # Does not fit one H200 in bf16 (about 141 GB of weights): the tensor-parallel issue's 2-GPU run.
    "llama3-70b": {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": 128000,
        "eos_token_id": 128001,
        "hidden_act": "silu",
        "hidden_size": 8192,
        "initializer_range": 0.02,
        "intermediate_size": 28672,
        "max_position_embeddings": 8192,
        "mlp_bias": False,
        "num_attention_heads": 64,
        "num_hidden_layers": 80,
        "num_key_value_heads": 8,
        "rms_norm_eps": 1e-05,
        "rope_scaling": None,
        "rope_theta": 500000.0,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "use_cache": True,
        "vocab_size": 128256,
    },
    "qwen3-0.6b": {
        "architectures": ["Qwen3ForCausalLM"],
        "model_type": "qwen3",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": 151643,
        "eos_token_id": 151645,
        "head_dim": 128,
        "hidden_act": "silu",
        "hidden_size": 1024,
        "initializer_range": 0.02,
        "intermediate_size": 3072,
        "max_position_embeddings": 40960,
        "max_window_layers": 28,
        "num_attention_heads": 16,
        "num_hidden_layers": 28,
        "num_key_value_heads": 8,
        "rms_norm_eps": 1e-06,
        "rope_scaling": None,
        "rope_theta": 1000000,
        "sliding_window": None,
        "tie_word_embeddings": True,
        "torch_dtype": "bfloat16",
        "use_cache": True,
        "use_sliding_window": False,
        "vocab_size": 151936,
    },
    # For CPU tests of the --shape path: Llama-3's layout and vocabulary, two tiny layers.
    "tiny-llama3": {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "attention_bias": False,
        "bos_token_id": 128000,
        "eos_token_id": 128001,
        "hidden_act": "silu",
        "hidden_size": 64,
        "initializer_range": 0.02,
        "intermediate_size": 128,
        "max_position_embeddings": 4096,
        "num_attention_heads": 4,
        "num_hidden_layers": 2,
        "num_key_value_heads": 2,
        "rms_norm_eps": 1e-05,
        "rope_scaling": None,
        "rope_theta": 500000.0,
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
        "vocab_size": 128256,
    },
}
PUBLIC_SHAPES = ("llama3-8b", "qwen3-0.6b")

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
_FORMAT_VERSION = "1"  # bump when the files written below change, so cached folders are rebuilt


def num_parameters(config: dict[str, Any]) -> int:
    """Parameter count of a Llama/Qwen-family checkpoint from its config (embedding and lm_head included)."""
    h = int(config["hidden_size"])
    n_heads = int(config["num_attention_heads"])
    n_kv = int(config.get("num_key_value_heads") or n_heads)
    head_dim = int(config.get("head_dim") or h // n_heads)
    ffn = int(config["intermediate_size"])
    vocab = int(config["vocab_size"])
    layers = int(config["num_hidden_layers"])
    attn = h * n_heads * head_dim + 2 * h * n_kv * head_dim + n_heads * head_dim * h
    if config.get("attention_bias") or config.get("model_type") == "qwen2":
        attn += n_heads * head_dim + 2 * n_kv * head_dim
    if config.get("model_type") == "qwen3":
        attn += 2 * head_dim  # q_norm, k_norm
    mlp = 3 * h * ffn
    per_layer = attn + mlp + 2 * h
    embed = vocab * h
    lm_head = 0 if config.get("tie_word_embeddings") else vocab * h
    return layers * per_layer + embed + lm_head + h


def _token(i: int) -> str:
    return f"t{i}"


def write_tokenizer(path: Path, vocab_size: int, bos_id: int | None, eos_id: int | None) -> None:
    """A word-level tokenizer covering [0, vocab_size): token i is `t<i>`, whitespace-separated."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {_token(i): i for i in range(vocab_size)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=_token(0)))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    special: dict[str, str] = {"unk_token": _token(0)}
    if bos_id is not None:
        special["bos_token"] = _token(bos_id)
    if eos_id is not None:
        special["eos_token"] = _token(eos_id)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, **special)
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(str(path))


def write_shape(shape: str, path: str | Path) -> Path:
    """Write the folder for `shape` at `path` (created if missing) and return it."""
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; known: {', '.join(SHAPES)}")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = SHAPES[shape]
    (path / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    gen = {"bos_token_id": config["bos_token_id"], "eos_token_id": config["eos_token_id"]}
    (path / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    write_tokenizer(path, int(config["vocab_size"]), config.get("bos_token_id"), config.get("eos_token_id"))
    (path / ".weir_shape").write_text(f"{shape} {_FORMAT_VERSION}\n")
    return path


def shape_dir(shape: str, root: str | Path | None = None) -> Path:
    """A cached folder for `shape` under `root` (default: $TMPDIR/weir_shapes), built once per machine.

    Built in a sibling temp folder and renamed into place, so concurrent scripts never see half a folder.
    """
    root = Path(root) if root is not None else Path(tempfile.gettempdir()) / "weir_shapes"
    final = root / shape
    marker = final / ".weir_shape"
    if marker.is_file() and marker.read_text().split() == [shape, _FORMAT_VERSION]:
        return final
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{shape}-", dir=root))
    write_shape(shape, tmp)
    if final.exists():
        shutil.rmtree(final, ignore_errors=True)
    try:
        os.replace(tmp, final)
    except OSError:  # another process won the race
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2 or args[0] not in SHAPES:
        print(f"usage: model_shapes.py {{{'|'.join(SHAPES)}}} OUTPUT_DIR", file=sys.stderr)
        return 2
    out = write_shape(args[0], args[1])
    print(f"{args[0]}: {num_parameters(SHAPES[args[0]]) / 1e9:.3f}B parameters -> {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
