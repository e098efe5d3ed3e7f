"""FP8 experts of Mixtral / Qwen2-MoE / Qwen3-MoE (engine.model.quantization.fp8_moe): `quant_method:
"fp8"` checkpoints per tensor (as Mixtral-8x7B FP8), per channel and per block (as Qwen3-30B-A3B-FP8's
weight_scale_inv, here [16, 32] blocks, the last of each expert's down input a partial one, and [128, 128]
on a wider model), compressed-tensors float-quantized, and online `quantization="fp8"`. Each loads to
exactly the dequantized weights (the experts stacked, every expert's tensors compared) and runs like
transformers on them (greedy tokens and logprobs). Checkpoints written by tests/engine/quantization/
checkpoints.py (write_fp8: vLLM's Fp8Config / DeepSeek-V3's block layout; write_compressed_tensors:
compressed-tensors' float-quantized layout). Also: static input scales (one per GEMM, the largest over
the experts, as vLLM), ignored experts, and what is refused."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from engine.model.layers.fused_moe import FusedMoE
from engine.model.quantization.detect import resolve_quantization
from engine.model.quantization.fp8 import Fp8Config
from engine.model.quantization.fp8_moe import Fp8FusedMoEMethod
from ops import reference
from tests.engine.quantization.checkpoints import (
    fp8_online_reference,
    write_compressed_tensors,
    write_fp8,
    write_fp8_online_reference,
)
from tests.engine.quantization.parity import assert_parity
from tests.engine.quantization.weights import assert_weights_match_reference, load_quantized
from tests.tiny_models import build_model

_CACHE: dict[tuple, tuple[Path, Path]] = {}
BLOCK = (16, 32)  # divides the tiny models' expert intermediate (48) and dense outputs; 48 % 32 != 0


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    _CACHE.clear()
    return tmp_path_factory.mktemp("moe-fp8")


def _checkpoint(
    src: Path,
    root: Path,
    scheme: str,
    skip: tuple[str, ...] = (),
    static: bool = False,
    block: tuple[int, int] = BLOCK,
) -> tuple[Path, Path]:
    key = (str(src), scheme, skip, static, block)
    if key not in _CACHE:
        out = root / str(len(_CACHE))
        if scheme.startswith("ct-"):
            _CACHE[key] = write_compressed_tensors(src, out, scheme.removeprefix("ct-"), skip)
        else:
            _CACHE[key] = write_fp8(src, out, scheme, block, skip, static)
    return _CACHE[key]


def _experts(model: torch.nn.Module) -> list[FusedMoE]:
    return [m for m in model.modules() if isinstance(m, FusedMoE)]


@pytest.mark.parametrize(
    ("family", "scheme", "quantized_layers"),
    [
        ("mixtral", "tensor", 2 * 2 + 2),  # per-tensor scales: each expert's gate / up scalar over its rows
        ("qwen2_moe", "channel", 2 * 4 + 2),  # + the shared expert (a dense MLP)
        ("qwen3_moe", "block", 2 * 2 + 2 + 1),  # layer 0 dense (mlp_only_layers)
        ("mixtral", "ct-fp8-channel", 2 * 2 + 2),
    ],
)
def test_fp8_moe_loads_exactly_the_dequantized_weights(
    tiny_model_dirs: dict[str, Path], root: Path, family: str, scheme: str, quantized_layers: int
) -> None:
    quantized, ref = _checkpoint(tiny_model_dirs[family], root, scheme)
    method, _, config = resolve_quantization(quantized, None)
    assert method == ("compressed-tensors" if scheme.startswith("ct-") else "fp8")
    model = load_quantized(quantized, config)
    assert assert_weights_match_reference(model, ref) == quantized_layers
    for layer in _experts(model):
        assert isinstance(layer.quant_method, Fp8FusedMoEMethod)
        assert layer.w13_weight.dtype == layer.w2_weight.dtype == torch.float8_e4m3fn
        assert layer.w13_scale.shape == ((4, 96 // 16, 2) if scheme == "block" else (4, 96, 1))
        assert layer.w2_scale.shape == ((4, 64 // 16, 2) if scheme == "block" else (4, 64, 1))
    assert model.model.layers[1].mlp.gate.weight.dtype == torch.float32  # the router stays float


@pytest.mark.parametrize(
    ("family", "scheme", "setting"),
    [
        ("mixtral", "tensor", "default"),
        ("qwen2_moe", "channel", "preemption"),
        ("qwen3_moe", "block", "chunked_prefill"),
        ("qwen3_moe", "ct-fp8-channel", "default"),
    ],
)
def test_fp8_moe_greedy_parity_with_transformers(
    tiny_model_dirs: dict[str, Path], root: Path, family: str, scheme: str, setting: str
) -> None:
    quantized, ref = _checkpoint(tiny_model_dirs[family], root, scheme)
    assert_parity(quantized, ref, setting, "compressed-tensors" if scheme.startswith("ct-") else "fp8")


def test_online_fp8_quantizes_every_expert_per_channel(
    tiny_model_dirs: dict[str, Path], tmp_path: Path
) -> None:
    model_dir = tiny_model_dirs["qwen2_moe"]
    model = load_quantized(model_dir, Fp8Config(from_checkpoint=False))
    layer = _experts(model)[1]
    original = load_file(str(model_dir / "model.safetensors"))[
        "model.layers.1.mlp.experts.2.down_proj.weight"
    ]
    got = layer.w2_weight[2].float() * layer.w2_scale[2]  # [H, I] times [H, 1]
    assert torch.equal(got, fp8_online_reference(original))  # amax / 448 per output channel
    reference_dir = write_fp8_online_reference(model_dir, tmp_path)
    assert assert_weights_match_reference(model, reference_dir) == 2 * 4 + 2
    assert_parity(model_dir, reference_dir, "default", "fp8", quantization="fp8")


def test_static_input_scales_quantize_each_gemms_input(tiny_model_dirs: dict[str, Path], root: Path) -> None:
    """activation_scheme "static": one input scale per GEMM of the layer, the largest over every
    expert's gate and up (one input) and over every expert's down, as vLLM takes them; x, and the
    SiLU-mul before down, pass through fp8 with them, as an FP8 GEMM would read them."""
    quantized, _ = _checkpoint(tiny_model_dirs["mixtral"], root, "tensor", static=True)
    _, _, config = resolve_quantization(quantized, None)
    assert config == Fp8Config(from_checkpoint=True, static_activations=True)
    layer = _experts(load_quantized(quantized, config))[1]
    stored = load_file(str(quantized / "model.safetensors"))
    base = "model.layers.1.block_sparse_moe.experts"
    gate_up = [stored[f"{base}.{e}.{w}.input_scale"].item() for e in range(4) for w in ("w1", "w3")]
    down = [stored[f"{base}.{e}.w2.input_scale"].item() for e in range(4)]
    assert len(set(gate_up)) > 1 and layer.a13_scale.item() == max(gate_up)
    assert layer.a2_scale.item() == max(down)
    x = torch.randn(7, 64, generator=torch.Generator().manual_seed(0))
    weights, ids = torch.softmax(torch.randn(7, 4, generator=torch.Generator().manual_seed(1)), -1).topk(2)

    def qdq(v: torch.Tensor, s: torch.Tensor) -> torch.Tensor:  # what an FP8 GEMM reads
        return (v / s).clamp(-448, 448).to(torch.float8_e4m3fn).float() * s

    w13 = layer.w13_weight.float() * layer.w13_scale  # [E, 2I, H]: per-tensor scales over the rows
    w2 = layer.w2_weight.float() * layer.w2_scale
    expected = torch.zeros_like(x)
    for t in range(7):
        for k in range(2):
            e = ids[t, k]
            gate, up = (w13[e] @ qdq(x[t], layer.a13_scale)).chunk(2)
            act = torch.nn.functional.silu(gate) * up
            expected[t] += weights[t, k] * (w2[e] @ qdq(act, layer.a2_scale))
    got = layer(x, weights, ids)
    # The loop above sums each token's GEMV in another order than the layer's per-expert GEMM, and a
    # last-bit difference in the SiLU-mul can move an element across an fp8 rounding boundary before
    # down: one fp8 step of a small element, up to 1.6e-5 here on one CPU's BLAS (0 on another). Both
    # bounds sit far below what quantizing the inputs changes (over 1e-3, the last assertion).
    torch.testing.assert_close(got, expected, rtol=1e-3, atol=1e-4)
    plain = reference.fused_moe(x, w13, w2, weights, ids)  # the same weights, inputs not quantized
    assert (got - plain).abs().max() > 1e-3


def test_ignored_experts_stay_float_and_a_partial_ignore_is_refused(
    tiny_model_dirs: dict[str, Path], root: Path
) -> None:
    # ignored_layers names the hub's modules: Mixtral's block_sparse_moe, not weir's mlp
    quantized, ref = _checkpoint(tiny_model_dirs["mixtral"], root, "channel", ("block_sparse_moe.experts",))
    _, _, config = resolve_quantization(quantized, None)
    model = load_quantized(quantized, config)
    assert assert_weights_match_reference(model, ref) == 2 * 2  # attention only
    assert all(layer.w13_weight.dtype == torch.float32 for layer in _experts(model))
    partial, _ = _checkpoint(tiny_model_dirs["qwen3_moe"], root, "channel", ("experts.3.",))
    _, _, config = resolve_quantization(partial, None)
    with pytest.raises(ValueError) as err:
        load_quantized(partial, config)
    assert str(err.value) == (
        "the checkpoint keeps only some experts of model.layers.1.mlp.experts unquantized "
        "(model.layers.1.mlp.experts.3.gate_proj but not model.layers.1.mlp.experts.0.gate_proj), which weir "
        "runs stacked: skip all of them or none"
    )


def test_fp8_moe_refusals_name_the_layer_or_tensor(
    tiny_model_dirs: dict[str, Path], root: Path, tmp_path: Path
) -> None:
    # [32, 32] blocks: an expert's 48 intermediate rows are not whole blocks (gate and up stack per expert)
    quantized, _ = _checkpoint(tiny_model_dirs["mixtral"], root, "block", block=(32, 32))
    _, _, config = resolve_quantization(quantized, None)
    with pytest.raises(ValueError) as err:
        load_quantized(quantized, config)
    assert str(err.value) == (
        "FP8 MoE layer model.layers.0.mlp.experts: each expert's intermediate rows per rank (48) are not a "
        "multiple of weight_block_size[0] 32"
    )
    good, _ = _checkpoint(tiny_model_dirs["mixtral"], root, "tensor")
    bad = tmp_path / "bf16-expert"
    shutil.copytree(good, bad)
    tensors = load_file(str(bad / "model.safetensors"))
    name = "model.layers.1.block_sparse_moe.experts.2.w3.weight"
    tensors[name] = tensors[name].to(torch.bfloat16)
    save_file(tensors, str(bad / "model.safetensors"))
    with pytest.raises(
        ValueError, match=rf"^{name}: an fp8 checkpoint's weight must be float8_e4m3fn; got torch.bfloat16$"
    ):
        load_quantized(bad, resolve_quantization(bad, None)[2])
    del tensors[name.replace(".weight", ".weight_scale")]
    save_file({**tensors, name: tensors[name].to(torch.float8_e4m3fn)}, str(bad / "model.safetensors"))
    with pytest.raises(ValueError) as err:
        load_quantized(bad, resolve_quantization(bad, None)[2])
    assert str(err.value).startswith(
        "missing weight for parameter model.layers.1.mlp.experts.w13_weight_scale (shard (2, 'up')): checkpoint "
        f"tensor {name}_scale not found"
    )


@pytest.mark.parametrize("scheme", ["channel", "block"])
def test_tensor_parallel_ranks_hold_their_fp8_expert_slices(
    tiny_model_dirs: dict[str, Path], root: Path, scheme: str
) -> None:
    """Over 2 ranks each expert's gate/up rows and down columns split as the float experts' do, with
    their per-channel scales, or their [8, 8] block scales (a rank's 24 rows: 3 blocks); each rank's
    partial sum added up gives the unsharded layer's output."""
    from engine.model.build_context import BuildContext
    from engine.model.models.moe import MoeForCausalLM
    from engine.model.weight_loader import load_weights
    from engine.model_config import ModelConfig

    quantized, _ = _checkpoint(tiny_model_dirs["qwen2_moe"], root, scheme, block=(8, 8))
    _, _, quant = resolve_quantization(quantized, None)
    config = ModelConfig.from_pretrained(quantized, dtype="float32", device="cpu")
    layers = []
    for rank, size in ((0, 1), (0, 2), (1, 2)):
        model = MoeForCausalLM(config, BuildContext(quant_config=quant, tp_rank=rank, tp_size=size))
        load_weights(model, quantized)
        layers.append(model.model.layers[1].mlp.experts)
    whole, *ranks = layers
    x = torch.randn(9, 64, generator=torch.Generator().manual_seed(0))
    weights, ids = torch.softmax(torch.randn(9, 4, generator=torch.Generator().manual_seed(2)), -1).topk(2)
    for rank, layer in enumerate(ranks):
        rows = slice(rank * 24, (rank + 1) * 24)
        deq = reference.dequantize_fp8_experts(
            layer.w2_weight, layer.w2_scale, layer.quant_method.block_shape, torch.float32
        )
        full = reference.dequantize_fp8_experts(
            whole.w2_weight, whole.w2_scale, whole.quant_method.block_shape, torch.float32
        )
        assert torch.equal(deq, full[:, :, rows])
    torch.testing.assert_close(ranks[0](x, weights, ids) + ranks[1](x, weights, ids), whole(x, weights, ids))


def test_fp8_moe_runs_on_random_weights(tiny_model_dirs: dict[str, Path], root: Path) -> None:
    """load_format "dummy" (benchmarks): fp8 experts and their scales get valid random values."""
    from engine import LLM, SamplingParams

    quantized, _ = _checkpoint(tiny_model_dirs["qwen3_moe"], root, "block")
    llm = LLM(str(quantized), device="cpu", dtype="float32", load_format="dummy", num_kv_blocks=8)
    (out,) = llm.generate(
        [[5, 6, 7]], SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True), use_tqdm=False
    )
    assert len(out.outputs[0].token_ids) == 3
    llm.shutdown()


def test_fp8_moe_loads_128_by_128_blocks(tiny_tokenizer_dir: Path, tmp_path: Path) -> None:
    """Qwen3-30B-A3B-FP8's [128, 128] blocks on a Qwen3-MoE wide enough for them (hidden 256, experts'
    intermediate 128; the down projection's input one block)."""
    src = build_model(
        "qwen3_moe",
        tmp_path / "wide",
        tiny_tokenizer_dir,
        config_overrides={"moe_intermediate_size": 128},
        hidden_size=256,
        num_key_value_heads=4,  # k and v: 128 rows each
    )
    quantized, ref = write_fp8(src, tmp_path, "block", (128, 128))
    model = load_quantized(quantized, resolve_quantization(quantized, None)[2])
    assert assert_weights_match_reference(model, ref) == 2 * 2 + 2 + 1
