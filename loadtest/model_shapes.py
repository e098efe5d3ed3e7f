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
    # Mixture of experts: the published configs (mistralai/Mixtral-8x7B-v0.1 with 2 of its 32 layers, for a
    # real-size start of the fused MoE kernels in little memory; Qwen/Qwen3-30B-A3B whole: ~61 GB in bf16).
    "mixtral-8x7b-2l": {
        "architectures": ["MixtralForCausalLM"],
        "model_type": "mixtral",
        "attention_dropout": 0.0,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "hidden_act": "silu",
        "hidden_size": 4096,
        "initializer_range": 0.02,
        "intermediate_size": 14336,
        "max_position_embeddings": 32768,
        "num_attention_heads": 32,
        "num_experts_per_tok": 2,
        "num_hidden_layers": 2,
        "num_key_value_heads": 8,
        "num_local_experts": 8,
        "output_router_logits": False,
        "rms_norm_eps": 1e-05,
        "rope_theta": 1000000.0,
        "router_aux_loss_coef": 0.02,
        "sliding_window": None,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "use_cache": True,
        "vocab_size": 32000,
    },
    "qwen3-30b-a3b": {
        "architectures": ["Qwen3MoeForCausalLM"],
        "model_type": "qwen3_moe",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": 151643,
        "decoder_sparse_step": 1,
        "eos_token_id": 151645,
        "head_dim": 128,
        "hidden_act": "silu",
        "hidden_size": 2048,
        "initializer_range": 0.02,
        "intermediate_size": 6144,
        "max_position_embeddings": 40960,
        "max_window_layers": 48,
        "mlp_only_layers": [],
        "moe_intermediate_size": 768,
        "norm_topk_prob": True,
        "num_attention_heads": 32,
        "num_experts": 128,
        "num_experts_per_tok": 8,
        "num_hidden_layers": 48,
        "num_key_value_heads": 4,
        "output_router_logits": False,
        "rms_norm_eps": 1e-06,
        "rope_scaling": None,
        "rope_theta": 1000000.0,
        "router_aux_loss_coef": 0.001,
        "sliding_window": None,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "use_cache": True,
        "use_sliding_window": False,
        "vocab_size": 151936,
    },
    # google/gemma-2-9b (its torch_dtype says float32; the benchmarks run bf16): head_dim 256, a 4096-token
    # window on every other layer, attention softcap 50 and final logit softcap 30, tied embeddings.
    "gemma2-9b": {
        "architectures": ["Gemma2ForCausalLM"],
        "model_type": "gemma2",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "attn_logit_softcapping": 50.0,
        "bos_token_id": 2,
        "cache_implementation": "hybrid",
        "eos_token_id": 1,
        "final_logit_softcapping": 30.0,
        "head_dim": 256,
        "hidden_act": "gelu_pytorch_tanh",
        "hidden_activation": "gelu_pytorch_tanh",
        "hidden_size": 3584,
        "initializer_range": 0.02,
        "intermediate_size": 14336,
        "max_position_embeddings": 8192,
        "num_attention_heads": 16,
        "num_hidden_layers": 42,
        "num_key_value_heads": 8,
        "pad_token_id": 0,
        "query_pre_attn_scalar": 256,
        "rms_norm_eps": 1e-06,
        "rope_theta": 10000.0,
        "sliding_window": 4096,
        "tie_word_embeddings": True,
        "torch_dtype": "bfloat16",
        "use_cache": True,
        "vocab_size": 256000,
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
    # For CPU smoke runs of the MoE and Gemma GPU steps: the real shapes' layouts, tiny.
    "tiny-mixtral": {
        "architectures": ["MixtralForCausalLM"],
        "model_type": "mixtral",
        "bos_token_id": 1,
        "eos_token_id": 2,
        "hidden_act": "silu",
        "hidden_size": 64,
        "intermediate_size": 48,
        "max_position_embeddings": 4096,
        "num_attention_heads": 4,
        "num_experts_per_tok": 2,
        "num_hidden_layers": 2,
        "num_key_value_heads": 2,
        "num_local_experts": 4,
        "rms_norm_eps": 1e-05,
        "rope_theta": 1000000.0,
        "sliding_window": None,
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
        "vocab_size": 2048,
    },
    "tiny-qwen3-moe": {
        "architectures": ["Qwen3MoeForCausalLM"],
        "model_type": "qwen3_moe",
        "attention_bias": False,
        "bos_token_id": 1,
        "decoder_sparse_step": 1,
        "eos_token_id": 2,
        "head_dim": 32,
        "hidden_act": "silu",
        "hidden_size": 64,
        "intermediate_size": 128,
        "max_position_embeddings": 4096,
        "mlp_only_layers": [],
        "moe_intermediate_size": 32,
        "norm_topk_prob": True,
        "num_attention_heads": 4,
        "num_experts": 16,
        "num_experts_per_tok": 4,
        "num_hidden_layers": 2,
        "num_key_value_heads": 2,
        "rms_norm_eps": 1e-06,
        "rope_theta": 1000000.0,
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
        "use_sliding_window": False,
        "vocab_size": 2048,
    },
    "tiny-gemma2": {
        "architectures": ["Gemma2ForCausalLM"],
        "model_type": "gemma2",
        "attention_bias": False,
        "attn_logit_softcapping": 50.0,
        "bos_token_id": 2,
        "eos_token_id": 1,
        "final_logit_softcapping": 30.0,
        "head_dim": 16,
        "hidden_activation": "gelu_pytorch_tanh",
        "hidden_size": 64,
        "intermediate_size": 128,
        "max_position_embeddings": 4096,
        "num_attention_heads": 4,
        "num_hidden_layers": 3,
        "num_key_value_heads": 2,
        "pad_token_id": 0,
        "query_pre_attn_scalar": 16,
        "rms_norm_eps": 1e-06,
        "rope_theta": 10000.0,
        "sliding_window": 16,
        "tie_word_embeddings": True,
        "torch_dtype": "float32",
        "vocab_size": 2048,
    },
}
PUBLIC_SHAPES = ("llama3-8b", "qwen3-0.6b", "mixtral-8x7b-2l", "qwen3-30b-a3b", "gemma2-9b")

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
_FORMAT_VERSION = "1"  # bump when the files written below change, so cached folders are rebuilt


def _moe_layout(config: dict[str, Any]) -> tuple[int, int, int, list[bool]]:
    """(experts, top_k, each expert's intermediate size, which layers are MoE); (0, 0, 0, all False)
    for a dense model. Mixtral: every layer, `num_local_experts` of `intermediate_size`; Qwen MoE:
    `num_experts` of `moe_intermediate_size`, a layer dense if in `mlp_only_layers` or (layer + 1) is no
    multiple of `decoder_sparse_step`."""
    layers = int(config["num_hidden_layers"])
    if config.get("model_type") == "mixtral":
        experts = int(config["num_local_experts"])
        return experts, int(config["num_experts_per_tok"]), int(config["intermediate_size"]), [True] * layers
    if config.get("model_type") in ("qwen2_moe", "qwen3_moe"):
        step = int(config.get("decoder_sparse_step") or 1)
        dense = set(config.get("mlp_only_layers") or [])
        moe = [i not in dense and (i + 1) % step == 0 for i in range(layers)]
        inter = int(config["moe_intermediate_size"])
        return int(config["num_experts"]), int(config["num_experts_per_tok"]), inter, moe
    return 0, 0, 0, [False] * layers


def _parameter_split(config: dict[str, Any]) -> tuple[int, int]:
    """(parameters outside the routed experts, parameters of one routed expert in one layer) of a
    Llama/Qwen/Mistral/Mixtral/Qwen-MoE/Gemma 2 checkpoint (embedding and lm_head included)."""
    h = int(config["hidden_size"])
    n_heads = int(config["num_attention_heads"])
    n_kv = int(config.get("num_key_value_heads") or n_heads)
    head_dim = int(config.get("head_dim") or h // n_heads)
    ffn = int(config["intermediate_size"])
    vocab = int(config["vocab_size"])
    model_type = config.get("model_type")
    attn = h * n_heads * head_dim + 2 * h * n_kv * head_dim + n_heads * head_dim * h
    if config.get("attention_bias") or model_type in ("qwen2", "qwen2_moe"):
        attn += n_heads * head_dim + 2 * n_kv * head_dim
    if model_type in ("qwen3", "qwen3_moe", "gemma3_text"):
        attn += 2 * head_dim  # q_norm, k_norm
    norms = (4 if model_type in ("gemma2", "gemma3_text") else 2) * h  # Gemma 2/3: pre and post norms
    experts, _, inter, moe_layers = _moe_layout(config)
    outside = 0
    for is_moe in moe_layers:
        if not is_moe:
            outside += attn + norms + 3 * h * ffn
            continue
        outside += attn + norms + h * experts  # the router
        shared = int(config.get("shared_expert_intermediate_size") or 0)
        if shared:
            outside += 3 * h * shared + h  # Qwen2-MoE's shared expert and its gate
    embed = vocab * h
    lm_head = 0 if config.get("tie_word_embeddings") else vocab * h
    return outside + embed + lm_head + h, 3 * h * inter


def num_parameters(config: dict[str, Any]) -> int:
    """Parameter count of a checkpoint from its config (embedding and lm_head included)."""
    outside, per_expert = _parameter_split(config)
    experts, _, _, moe_layers = _moe_layout(config)
    return outside + sum(moe_layers) * experts * per_expert


def active_parameters(config: dict[str, Any], num_tokens: int = 1) -> float:
    """Parameters a forward over `num_tokens` tokens reads: all of a dense model's; of an MoE model, all
    outside the experts plus, per MoE layer, the experts its tokens choose: top_k at one token, and for
    more tokens the expected number of distinct experts when each token picks top_k of E uniformly,
    E * (1 - (1 - top_k / E) ** num_tokens) (random weights route close to uniformly)."""
    outside, per_expert = _parameter_split(config)
    experts, top_k, _, moe_layers = _moe_layout(config)
    if not experts:
        return float(outside)
    touched = experts * (1.0 - (1.0 - top_k / experts) ** max(1, num_tokens))
    return outside + sum(moe_layers) * touched * per_expert


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
