"""The model-side seams: per-layer quantization methods chosen by prefix, parameters that tell the
loaders their packed layout, the post-load hook, the attention backend chosen once, and the KV-cache
dtype field. The toy methods here stand in for the real ones of the quantization issue.
"""

from __future__ import annotations

import logging
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import ops
from engine.config import EngineConfig
from engine.model.build_context import BuildContext
from engine.model.layers.activation import SiluAndMul
from engine.model.layers.attention import Attention
from engine.model.layers.attention_backend import (
    TorchAttentionBackend,
    TritonAttentionBackend,
    get_attention_backend,
)
from engine.model.layers.linear import (
    LinearBase,
    MergedColumnParallelLinear,
    RowParallelLinear,
    WeightShapeError,
)
from engine.model.layers.norm import RMSNorm
from engine.model.layers.rotary import RotaryEmbedding
from engine.model.parameter import WeightLoader, set_weight_attrs
from engine.model.quantization import (
    LinearMethodBase,
    QuantizationConfig,
    UnquantizedLinearMethod,
)
from engine.model.weight_loader import initialize_dummy_weights, load_weights
from engine.worker.model_runner import ModelRunner

TOL = 1e-4


# ---------------------------------------------------------------------------------- toy methods
class TransposedLinearMethod(UnquantizedLinearMethod):
    """Loads the checkpoint's [out, in] weight, then (post-load) stores it as [in, out] and applies
    x @ W: a stand-in for a method that repacks after loading. Counts its hook calls per layer."""

    def __init__(self) -> None:
        self.hook_calls: dict[str, int] = {}

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        self.hook_calls[layer.prefix] = self.hook_calls.get(layer.prefix, 0) + 1
        weight_t = layer.weight.data.t().contiguous()  # [in, out]
        del layer.weight
        layer.weight_t = nn.Parameter(weight_t, requires_grad=False)

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        out = x @ layer.weight_t
        return out + bias if bias is not None else out


class MLPOnlyConfig(QuantizationConfig):
    """The toy method for the MLP's linear layers, the default for every other one."""

    name = "toy-mlp"

    def __init__(self) -> None:
        self.method = TransposedLinearMethod()
        self.asked: list[str] = []

    def get_linear_method(self, layer: LinearBase, prefix: str) -> LinearMethodBase:
        assert layer.prefix == prefix
        self.asked.append(prefix)
        return self.method if ".mlp." in prefix else UnquantizedLinearMethod()


class PackedInt4Method(LinearMethodBase):
    """GPTQ-like (pack along the input: qweight [in / 8, out] int32, scales [in / group, out]) or
    AWQ-like (pack along the output: qweight [in, out / 8]). Only creation, loading and the hook."""

    def __init__(self, pack_output: bool, group_size: int = 16) -> None:
        self.pack_output = pack_output
        self.group_size = group_size
        self.hook_calls = 0

    def create_weights(
        self,
        layer: nn.Module,
        input_size_per_partition: int,
        output_partition_sizes: list[int],
        input_size: int,
        output_size: int,
        params_dtype: torch.dtype,
        weight_loader: WeightLoader,
    ) -> None:
        out = sum(output_partition_sizes)
        if self.pack_output:  # [in, out / 8]
            shape, packed_dim = (input_size_per_partition, out // 8), 1
        else:  # [in / 8, out]
            shape, packed_dim = (input_size_per_partition // 8, out), 0
        qweight = nn.Parameter(torch.empty(shape, dtype=torch.int32), requires_grad=False)
        set_weight_attrs(
            qweight,
            {
                "input_dim": 0,
                "output_dim": 1,
                "packed_dim": packed_dim,
                "pack_factor": 8,
                "weight_loader": weight_loader,
            },
        )
        layer.register_parameter("qweight", qweight)
        # [in / group_size, out]: one scale per group of inputs, "packed" by group_size along the input
        scales = nn.Parameter(
            torch.empty(input_size_per_partition // self.group_size, out, dtype=params_dtype),
            requires_grad=False,
        )
        set_weight_attrs(
            scales,
            {
                "input_dim": 0,
                "output_dim": 1,
                "packed_dim": 0,
                "pack_factor": self.group_size,
                "weight_loader": weight_loader,
            },
        )
        layer.register_parameter("scales", scales)

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        self.hook_calls += 1

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        raise NotImplementedError("loading only")


class Fixed(QuantizationConfig):
    def __init__(self, method: LinearMethodBase) -> None:
        self.method = method

    def get_linear_method(self, layer: LinearBase, prefix: str) -> LinearMethodBase:
        return self.method


# ---------------------------------------------------------------------------------- helpers
def _runner(model_dir: Path, dtype: str = "float32", **overrides) -> ModelRunner:
    config = EngineConfig(
        model=str(model_dir), device="cpu", dtype=dtype, block_size=16, num_kv_blocks=8, **overrides
    )
    return ModelRunner(config.resolve())


def _logits(runner: ModelRunner, token_ids: list[int]) -> torch.Tensor:
    n = len(token_ids)
    step = runner._build_inputs([token_ids], [0], [n], [[0, 1, 2]], np.arange(n))
    with torch.inference_mode():
        hidden = runner._forward(step.input_ids, step.positions, step.metadata)
        return runner.compute_logits(hidden[step.logits_indices])


def _prompt(n: int) -> list[int]:
    rng = random.Random(7)
    return [rng.randrange(3, 500) for _ in range(n)]


# ---------------------------------------------------------------------------------- quantization seam
@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_method_is_chosen_per_prefix_and_its_hook_runs_once_per_layer(
    tiny_model_dirs: dict[str, Path], family: str
) -> None:
    model_dir = tiny_model_dirs[family]
    default = _runner(model_dir)
    default.load_model()
    default.initialize_kv_cache(8)
    toy = MLPOnlyConfig()
    runner = _runner(model_dir)
    runner.load_model(quant_config=toy)
    runner.initialize_kv_cache(8)

    layers = range(runner.model_config.num_layers)
    mlp = [f"model.layers.{i}.mlp.{name}" for i in layers for name in ("gate_up_proj", "down_proj")]
    attn = [f"model.layers.{i}.self_attn.{name}" for i in layers for name in ("qkv_proj", "o_proj")]
    assert sorted(toy.asked) == sorted(mlp + attn)  # every linear layer asked once, by its own name
    assert toy.method.hook_calls == dict.fromkeys(mlp, 1)
    modules = dict(runner.model.named_modules())
    for prefix in mlp:
        assert modules[prefix].quant_method is toy.method and "weight" not in dict(
            modules[prefix].named_parameters()
        )
    for prefix in attn:
        assert type(modules[prefix].quant_method) is UnquantizedLinearMethod
    # The transposed MLP weights give the default method's logits: loaded, post-processed, applied.
    prompt = _prompt(21)
    assert (_logits(runner, prompt) - _logits(default, prompt)).abs().max().item() < TOL


def test_dummy_init_runs_the_hook_once_and_fills_integer_params_with_random_ints(
    tiny_model_dirs: dict[str, Path],
) -> None:
    toy = MLPOnlyConfig()
    runner = _runner(tiny_model_dirs["llama"], load_format="dummy")
    runner.load_model(quant_config=toy)
    assert set(toy.method.hook_calls.values()) == {1} and len(toy.method.hook_calls) == 4

    method = PackedInt4Method(pack_output=False)
    layer = RowParallelLinear(64, 32, quant_config=Fixed(method), prefix="down_proj")
    initialize_dummy_weights(layer, seed=3)
    assert method.hook_calls == 1
    qweight = layer.qweight  # [64 / 8, 32] int32
    assert qweight.dtype == torch.int32 and qweight.shape == (8, 32)
    assert len(qweight.unique()) > 200  # random 32-bit patterns, not a constant
    assert qweight.min() < -(2**30) and qweight.max() > 2**30  # spread over the whole int32 range
    assert layer.scales.abs().max() <= 1e-3 and layer.scales.abs().max() > 0


def test_gptq_like_qweight_packed_along_the_input_shards_by_packed_rows() -> None:
    """Row-parallel, tp_size=2, rank 1: the rank's input half is the second half of the packed rows
    (in / 8 / 2 of them), and of the group scales."""
    method = PackedInt4Method(pack_output=False, group_size=16)
    layer = RowParallelLinear(64, 24, quant_config=Fixed(method), tp_rank=1, tp_size=2)
    assert layer.qweight.shape == (4, 24) and layer.scales.shape == (2, 24)
    qweight = torch.arange(8 * 24, dtype=torch.int32).view(8, 24)  # the checkpoint's [64 / 8, 24]
    scales = torch.randn(4, 24)  # [64 / 16, 24]
    layer.qweight.weight_loader(layer.qweight, qweight)
    layer.scales.weight_loader(layer.scales, scales)
    assert torch.equal(layer.qweight, qweight[4:8])
    assert torch.equal(layer.scales, scales[2:4])
    with pytest.raises(WeightShapeError) as e:  # an unpacked [in, out] tensor is refused, not sliced
        layer.qweight.weight_loader(layer.qweight, torch.zeros(64, 24, dtype=torch.int32))
    assert e.value.expected == (8, 24) and e.value.got == (64, 24)


def test_awq_like_qweight_packed_along_the_output_loads_fused_shards_through_the_checkpoint_loader(
    tmp_path: Path,
) -> None:
    """Merged gate/up, packed 8-per-int along the output, tp_size=2, rank 1: every sub-matrix's second
    half of packed columns lands at that sub-matrix's packed offset; through load_weights and its
    packed_modules_mapping (gate_proj -> shard 0, up_proj -> shard 1)."""
    method = PackedInt4Method(pack_output=True, group_size=16)

    class Toy(nn.Module):
        packed_modules_mapping = {"gate_up_proj": [("gate_proj", 0), ("up_proj", 1)]}

        def __init__(self) -> None:
            super().__init__()
            self.mlp = nn.Module()
            self.mlp.gate_up_proj = MergedColumnParallelLinear(
                32, [64, 64], quant_config=Fixed(method), tp_rank=1, tp_size=2, prefix="mlp.gate_up_proj"
            )

    model = Toy()
    layer = model.mlp.gate_up_proj
    assert layer.qweight.shape == (32, 8)  # [in, (64 + 64) / 2 / 8]
    gate = torch.arange(32 * 8, dtype=torch.int32).view(32, 8)  # [in, 64 / 8]
    up = -gate - 1
    gate_scales, up_scales = torch.randn(2, 64), torch.randn(2, 64)
    save_file(
        {
            "mlp.gate_proj.qweight": gate,
            "mlp.up_proj.qweight": up,
            "mlp.gate_proj.scales": gate_scales,
            "mlp.up_proj.scales": up_scales,
        },
        str(tmp_path / "model.safetensors"),
    )
    load_weights(model, tmp_path)
    assert torch.equal(layer.qweight, torch.cat([gate[:, 4:8], up[:, 4:8]], dim=1))
    assert torch.equal(layer.scales, torch.cat([gate_scales[:, 32:], up_scales[:, 32:]], dim=1))
    assert method.hook_calls == 1

    # An already-fused checkpoint tensor [in, 128 / 8] splits by packed sub-matrix widths too.
    layer.qweight.weight_loader(layer.qweight, torch.cat([up, gate], dim=1))
    assert torch.equal(layer.qweight, torch.cat([up[:, 4:8], gate[:, 4:8]], dim=1))


# ---------------------------------------------------------------------------------- attention backend
def test_one_backend_chosen_by_the_runner_is_held_by_every_layer(tiny_model_dirs: dict[str, Path]) -> None:
    runner = _runner(tiny_model_dirs["qwen3"])
    runner.load_model()
    backend = runner.attn_backend
    assert isinstance(backend, TorchAttentionBackend) and backend.kernels is ops.TORCH_KERNELS
    kinds = {Attention: 0, RMSNorm: 0, RotaryEmbedding: 0, SiluAndMul: 0}
    for module in runner.model.modules():
        if isinstance(module, Attention):
            assert module.attn_backend is backend
        elif isinstance(module, (RMSNorm, RotaryEmbedding, SiluAndMul)):
            assert module.kernels is backend.kernels
        else:
            continue
        kinds[type(module)] += 1
    # 2 layers: attention, rotary and act once each; norms: 2 per layer, q/k norms (qwen3), final
    assert kinds == {Attention: 2, RMSNorm: 9, RotaryEmbedding: 2, SiluAndMul: 2}


def test_backend_choice(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    f32 = torch.float32
    assert get_attention_backend("cpu", f32, f32, 64, 16).name == "torch"
    assert get_attention_backend("cuda", f32, f32, 64, 16, use_triton=False).name == "torch"
    # The Triton kernels take powers of two >= 16 and, padded, multiples of 8 up to 256 (80, Phi-3's 96);
    # other head sizes stay on torch, named.
    supports = TritonAttentionBackend.supports_head_size
    assert all(supports(d) for d in (16, 64, 80, 96, 112, 160, 192, 200, 256, 512))
    assert not any(supports(d) for d in (8, 20, 100, 264))
    supported = "a multiple of 8 from 16 to 256, or a power of two >= 16"
    with caplog.at_level(logging.WARNING, logger="weir.engine"):
        assert get_attention_backend("cuda", f32, f32, 100, 16).name == "torch"
    assert f"head_dim 100 is not one the Triton kernels take ({supported})" in caplog.text
    with pytest.raises(
        ValueError, match=rf"head_dim=100 is not supported by the Triton kernels; they take {supported}"
    ):
        get_attention_backend("cpu", f32, f32, 100, 16, use_triton=True)

    def no_triton() -> ops.Kernels:
        raise ImportError("No module named 'triton'")

    monkeypatch.setattr(ops, "triton_kernels", no_triton)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="weir.engine"):
        assert get_attention_backend("cuda", f32, f32, 64, 16).name == "torch"
    assert "Triton kernels unavailable (No module named 'triton')" in caplog.text
    with pytest.raises(ImportError):
        get_attention_backend("cpu", f32, f32, 64, 16, use_triton=True)


def test_model_built_alone_gets_the_torch_backend_in_its_dtype() -> None:
    ctx = BuildContext(dtype=torch.bfloat16)
    assert isinstance(ctx.backend, TorchAttentionBackend) and ctx.backend.kv_cache_dtype == torch.bfloat16
    assert ctx.kernels is ops.TORCH_KERNELS


# ---------------------------------------------------------------------------------- KV cache dtype
def test_kv_cache_dtype_auto_is_the_model_dtype_and_other_values_are_refused(
    tiny_model_dirs: dict[str, Path],
) -> None:
    with pytest.raises(ValueError) as e:
        EngineConfig(model="m", kv_cache_dtype="float16")
    assert str(e.value) == "kv_cache_dtype must be one of auto, fp8, fp8_e4m3, fp8_e5m2; got 'float16'"
    with pytest.raises(ValueError, match="kv_cache_dtype must be the model dtype torch.float16 or an fp8"):
        get_attention_backend("cpu", torch.float16, torch.bfloat16, 64, 16)
    runner = _runner(tiny_model_dirs["llama"], dtype="bfloat16", kv_cache_dtype="auto")
    assert runner.config.cache.kv_cache_dtype == "bfloat16"
    runner.load_model()
    runner.initialize_kv_cache(8)
    assert runner.attn_backend is not None and runner.attn_backend.kv_cache_dtype == torch.bfloat16
    assert all(k.dtype == v.dtype == torch.bfloat16 for k, v in runner.kv_caches)
    assert runner.kv_caches[0][0].shape == (8, 16, 2, 16)  # [num_blocks, block_size, num_kv_heads, head_dim]
    assert runner.bytes_per_kv_block == 2 * 2 * 16 * 2 * 16 * 2  # K+V x layers x block x heads x dim x bf16
