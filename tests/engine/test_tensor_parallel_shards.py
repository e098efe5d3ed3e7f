"""Tensor-parallel shards without processes: each rank's model, built alone, holds exactly its slice
of the checkpoint (KV heads replicated when there are fewer than ranks, the vocabulary padded to a
multiple of the ranks), read through safetensors slices rather than whole tensors; bad sizes are
refused at resolution with the reason."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from engine.config import EngineConfig
from engine.model.build_context import BuildContext
from engine.model.models.llama import LlamaForCausalLM
from engine.model.weight_loader import load_weights
from engine.model_config import ModelConfig
from tests.tiny_models import build_model


@pytest.fixture(scope="module")
def one_kv_head_dir(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer_dir: Path) -> Path:
    # 4 query heads, 1 KV head, vocabulary 511 (odd): both edge cases of a split over 2 ranks.
    path = tmp_path_factory.mktemp("tp") / "llama-1kv-511"
    return build_model("llama", path, tiny_tokenizer_dir, num_key_value_heads=1, vocab_size=511)


class _RecordingSafeOpen:
    """safe_open, recording which tensors were read whole (get_tensor) and which as slices."""

    whole: list[str] = []
    sliced: list[str] = []

    def __init__(self, *args: object, **kwargs: object) -> None:
        self._f = safe_open(*args, **kwargs)  # type: ignore[arg-type]

    def __enter__(self) -> _RecordingSafeOpen:
        self._f.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._f.__exit__(*exc)

    def keys(self) -> list[str]:
        return list(self._f.keys())

    def get_tensor(self, name: str) -> torch.Tensor:
        self.whole.append(name)
        return self._f.get_tensor(name)

    def get_slice(self, name: str) -> object:
        self.sliced.append(name)
        return self._f.get_slice(name)


@pytest.mark.parametrize("rank", [0, 1])
def test_each_rank_reads_only_its_shard(
    one_kv_head_dir: Path, rank: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("engine.model.weight_loader.safe_open", _RecordingSafeOpen)
    _RecordingSafeOpen.whole, _RecordingSafeOpen.sliced = [], []
    config = ModelConfig.from_pretrained(
        str(one_kv_head_dir), max_model_len=None, dtype="float32", device="cpu"
    )
    model = LlamaForCausalLM(config, BuildContext(tp_rank=rank, tp_size=2))
    load_weights(model, one_kv_head_dir)
    full = load_file(str(one_kv_head_dir / "model.safetensors"))

    # Only norms (replicated, tiny) are read whole; every matrix through a slice.
    assert _RecordingSafeOpen.whole and all(name.endswith("norm.weight") for name in _RecordingSafeOpen.whole)
    assert "model.embed_tokens.weight" in _RecordingSafeOpen.sliced
    assert "model.layers.0.mlp.down_proj.weight" in _RecordingSafeOpen.sliced

    attn = model.model.layers[0].self_attn
    q, k, v = (full[f"model.layers.0.self_attn.{n}_proj.weight"] for n in "qkv")  # [heads * 16, 64]
    assert (attn.num_heads, attn.num_kv_heads) == (2, 1)
    # Query heads split; the single KV head replicated on both ranks.
    assert torch.equal(attn.qkv_proj.weight, torch.cat([q[rank * 32 : (rank + 1) * 32], k, v]))
    down = full["model.layers.0.mlp.down_proj.weight"]  # [64, 128]
    assert torch.equal(model.model.layers[0].mlp.down_proj.weight, down[:, rank * 64 : (rank + 1) * 64])
    gate, up = full["model.layers.0.mlp.gate_proj.weight"], full["model.layers.0.mlp.up_proj.weight"]
    expected_gate_up = torch.cat([gate[rank * 64 : (rank + 1) * 64], up[rank * 64 : (rank + 1) * 64]])
    assert torch.equal(model.model.layers[0].mlp.gate_up_proj.weight, expected_gate_up)

    # 511 rows padded to 512: 256 per rank, rank 1's last row zero.
    for param, name in (
        (model.model.embed_tokens.weight, "model.embed_tokens.weight"),
        (model.lm_head.weight, "lm_head.weight"),
    ):
        assert param.shape == (256, 64)
        rows = full[name][rank * 256 : (rank + 1) * 256]
        assert torch.equal(param[: rows.shape[0]], rows)
        assert torch.count_nonzero(param[rows.shape[0] :]) == 0
    assert (rank == 1) == (full["lm_head.weight"][rank * 256 :].shape[0] == 255)


_LLAMA = {
    "architectures": ["LlamaForCausalLM"],
    "hidden_size": 64,
    "num_attention_heads": 6,
    "num_key_value_heads": 2,
    "num_hidden_layers": 2,
    "intermediate_size": 96,
    "vocab_size": 512,
    "max_position_embeddings": 256,
}


def _resolve(device: str, **options: object):
    config = EngineConfig("m", **options)  # type: ignore[arg-type]
    model = ModelConfig.from_dicts("m", _LLAMA, max_model_len=None, dtype="float32", device=device)
    return config.resolve_with(model)


def test_tensor_parallel_size_is_checked_at_resolution(monkeypatch: pytest.MonkeyPatch) -> None:
    assert _resolve("cpu", tensor_parallel_size=2).parallel.tensor_parallel_size == 2
    assert _resolve("cpu").parallel.distributed_executor_backend == "mp"
    with pytest.raises(
        ValueError, match=r"tensor_parallel_size 4 must divide the model's num_attention_heads \(6\)"
    ):
        _resolve("cpu", tensor_parallel_size=4)
    # 6 heads / 3 ranks is fine, but 2 KV heads neither split over 3 ranks nor replicate evenly.
    with pytest.raises(ValueError, match=r"num_key_value_heads \(2\) must divide one another"):
        _resolve("cpu", tensor_parallel_size=3)
    with pytest.raises(ValueError, match="tensor_parallel_size must be a positive integer; got 0"):
        EngineConfig("m", tensor_parallel_size=0)
    olmo2 = ModelConfig.from_dicts("m", {**_LLAMA, "architectures": ["Olmo2ForCausalLM"]}, device="cpu")
    with pytest.raises(ValueError) as err:
        EngineConfig("m", tensor_parallel_size=2).resolve_with(olmo2)
    assert str(err.value) == (
        "tensor_parallel_size 2 is not supported for Olmo2ForCausalLM: its q/k RMSNorms span every "
        "attention head; serve it with tensor_parallel_size 1"
    )
    with pytest.raises(ValueError, match="distributed_executor_backend must be one of mp, ray; got 'x'"):
        EngineConfig("m", distributed_executor_backend="x")
    # More ranks than GPUs, on CUDA with worker processes on this node.
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(
        ValueError, match="tensor_parallel_size 2 needs 2 GPUs \\(one per rank\\); this machine has 1"
    ):
        _resolve("cuda", tensor_parallel_size=2)
