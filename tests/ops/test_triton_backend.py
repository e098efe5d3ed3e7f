"""The Triton attention backend through the engine's API: chosen explicitly (no process-global switch),
it routes every op of the model to ops.triton, and a whole model forward on it matches the torch
backend. Without a GPU the kernels run under the Triton interpreter (see tests.ops.triton_interpreter).
"""

from __future__ import annotations

# isort: off
# First: it sets TRITON_INTERPRET before anything below can import triton.
from tests.ops.triton_interpreter import DEVICE, in_process, only_in_subprocess, rerun_in_fresh_process

# isort: on

import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import ops
import ops.triton as impl
from engine.config import EngineConfig
from engine.model.layers.activation import SiluAndMul
from engine.model.layers.attention import Attention
from engine.model.layers.attention_backend import TritonAttentionBackend, get_attention_backend
from engine.model.layers.norm import RMSNorm
from engine.model.layers.rotary import RotaryEmbedding
from engine.worker.model_runner import ModelRunner
from tests.tiny_models import hf_causal_lm


@only_in_subprocess
def test_in_fresh_interpreter_process() -> None:
    rerun_in_fresh_process(__file__)


def _runner(
    model_dir: Path,
    use_triton: bool,
    kv_cache_dtype: str = "auto",
    dtype: str = "float32",
    quantization: str | None = None,
) -> ModelRunner:
    config = EngineConfig(
        model=str(model_dir),
        device=DEVICE,
        dtype=dtype,
        block_size=16,
        num_kv_blocks=8,
        enforce_eager=True,
        kv_cache_dtype=kv_cache_dtype,
        quantization=quantization,
    )
    resolved = config.resolve()
    runner = ModelRunner(resolved)
    runner.load_model(resolved.quant.linear, use_triton=use_triton)
    runner.initialize_kv_cache(8)
    return runner


@in_process
def test_triton_backend_routes_every_op_of_the_model(tiny_model_dirs: dict[str, Path]) -> None:
    f32 = torch.float32
    backend = get_attention_backend(DEVICE, f32, f32, 32, 16, use_triton=True)
    assert isinstance(backend, TritonAttentionBackend)
    for name in ops.OP_NAMES:
        assert getattr(backend.kernels, name) is getattr(impl, name)
    assert backend.write_kv_cache is impl.write_kv_cache and backend.paged_attention is impl.paged_attention

    triton_runner = _runner(tiny_model_dirs["qwen3"], use_triton=True)
    seen = set()
    for module in triton_runner.model.modules():
        if isinstance(module, Attention):
            assert module.attn_backend is triton_runner.attn_backend
            assert module.attn_backend.paged_attention is impl.paged_attention
        elif isinstance(module, (RMSNorm, RotaryEmbedding, SiluAndMul)):
            assert module.kernels.name == "triton"
        else:
            continue
        seen.add(type(module))
    assert seen == {Attention, RMSNorm, RotaryEmbedding, SiluAndMul}
    # The choice belongs to that engine: one built after it, in the same process, still runs torch.
    torch_runner = _runner(tiny_model_dirs["qwen3"], use_triton=False)
    assert torch_runner.attn_backend is not None and torch_runner.attn_backend.kernels is ops.TORCH_KERNELS


def _with_per_head_scales(src: Path, dst: Path) -> Path:
    """`src` with per-KV-head k/v scales far apart (the tiny models have 2 KV heads, 2 layers)."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    tensors = load_file(str(dst / "model.safetensors"))
    for i in range(2):
        tensors[f"model.layers.{i}.self_attn.k_scale"] = torch.tensor([0.0625, 3.0])
        tensors[f"model.layers.{i}.self_attn.v_scale"] = torch.tensor([2.0, 0.015625])
    save_file(tensors, str(dst / "model.safetensors"))
    return dst


@in_process
@pytest.mark.parametrize("kv_cache_dtype", ["auto", "fp8", "fp8-per-head"])
def test_model_forward_on_triton_matches_torch(
    tiny_model_dirs: dict[str, Path], kv_cache_dtype: str, tmp_path: Path
) -> None:
    """Prefill in two chunks (the second attends over the cache the first wrote, through the Triton
    KV write): every position's logits match the torch backend's, with an fp8 cache too (the write is
    the reference's bit for bit given the same K/V, which differ by float rounding between backends),
    and with per-KV-head scales loaded from the checkpoint."""
    model_dir = tiny_model_dirs["qwen3"]
    if kv_cache_dtype == "fp8-per-head":
        model_dir, kv_cache_dtype = _with_per_head_scales(model_dir, tmp_path / "per-head"), "fp8"
    prompt = [int(t) for t in np.random.default_rng(0).integers(3, 500, size=21)]
    blocks = [5, 0]
    logits = {}
    for use_triton in (False, True):
        runner = _runner(model_dir, use_triton, kv_cache_dtype)
        if model_dir != tiny_model_dirs["qwen3"]:
            assert [a.k_scale.tolist() for a in runner.attn_layers] == [[0.0625, 3.0]] * 2
        assert runner.kv_caches[0][0].dtype == (
            torch.float8_e4m3fn if kv_cache_dtype == "fp8" else torch.float32
        )
        chunks = []
        for start, n in ((0, 13), (13, 8)):
            step = runner._build_inputs([prompt], [start], [n], [blocks], np.arange(n))
            with torch.inference_mode():
                hidden = runner._forward(step.input_ids, step.positions, step.metadata)
                chunks.append(runner.compute_logits(hidden[step.logits_indices]))
        logits[use_triton] = torch.cat(chunks)  # [21, vocab]
    assert logits[True].shape == (21, 512)
    assert (logits[True] - logits[False]).abs().max().item() < 1e-4


def _chunked_prefill_logits(runner: ModelRunner, prompt: list[int], blocks: list[int]) -> torch.Tensor:
    """[len(prompt), vocab]: the prompt's logits from two prefill chunks (13 tokens, then the rest, which
    attends over the cache the first wrote)."""
    chunks = []
    for start, n in ((0, 13), (13, len(prompt) - 13)):
        step = runner._build_inputs([prompt], [start], [n], [blocks], np.arange(n))
        with torch.inference_mode():
            hidden = runner._forward(step.input_ids, step.positions, step.metadata)
            chunks.append(runner.compute_logits(hidden[step.logits_indices]))
    return torch.cat(chunks)


@in_process
def test_partial_rotary_model_on_triton_matches_torch(tiny_model_dirs: dict[str, Path]) -> None:
    """Phi-3 with partial rotary (12 of 16 dims) and longrope's scaled cos/sin: two prefill chunks through
    the Triton rotary + KV write and paged attention give the torch backend's logits."""
    prompt = [int(t) for t in np.random.default_rng(3).integers(3, 500, size=21)]
    logits = {}
    for use_triton in (False, True):
        runner = _runner(tiny_model_dirs["phi3_partial"], use_triton)
        assert runner.model.model.layers[0].self_attn.rotary_emb.cos_sin_cache.shape[-1] == 12
        logits[use_triton] = _chunked_prefill_logits(runner, prompt, [5, 0])
    assert (logits[True] - logits[False]).abs().max().item() < 1e-4


@in_process
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_widened_fp8_cache_reads_keep_the_models_logits(
    tiny_model_dirs: dict[str, Path], dtype: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """WEIR_FP8_KV_WIDEN=1 with an fp8 cache: a float16 model's logits are the bytes path's bit for bit
    (the same float16 values meet the same dots), and a bfloat16 model's (its dots now in float16) are
    the torch backend's within bfloat16's rounding, greedy tokens the same."""
    prompt = [int(t) for t in np.random.default_rng(2).integers(3, 500, size=21)]
    logits = {}
    for widen, use_triton in (("0", False), ("0", True), ("1", True)):
        monkeypatch.setenv("WEIR_FP8_KV_WIDEN", widen)
        monkeypatch.setattr(sys.modules["ops.triton.paged_attention"], "_PLANS", {})
        runner = _runner(tiny_model_dirs["qwen3"], use_triton, "fp8", dtype)
        assert runner.kv_caches[0][0].dtype == torch.float8_e4m3fn
        logits[widen, use_triton] = _chunked_prefill_logits(runner, prompt, [5, 0]).float()
    widened, torch_backend = logits["1", True], logits["0", False]
    if dtype == "float16":
        assert torch.equal(widened, logits["0", True])
    # (measured: 0.4% of the largest logit in float16, 3% in bfloat16, the model's own rounding; the
    # interpreter's bfloat16 dots are not exact, so the bytes path is not the bfloat16 reference here)
    assert (widened - torch_backend).abs().max().item() < 0.05 * torch_backend.abs().max().item()
    assert torch.equal(widened.argmax(-1), torch_backend.argmax(-1))


@in_process
@pytest.mark.parametrize("model", ["llama", "qwen3", "gemma2"])  # gemma2: decodes past its window, softcapped
def test_fused_decode_attention_leaves_every_logit_as_it_was(
    tiny_model_dirs: dict[str, Path], model: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """WEIR_FUSED_DECODE_ATTENTION=1: the decode steps of two sequences (one crossing into its second
    KV block) take decode_attention, and their greedy tokens and logits equal the separate launches'
    bit for bit; prefill chunks keep the separate path."""
    calls = []
    spy = impl.decode_attention

    def counted(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        calls.append(args[0].shape[0])
        return spy(*args, **kwargs)

    monkeypatch.setattr(impl, "decode_attention", counted)
    rng = np.random.default_rng(1)
    prompts = [[int(t) for t in rng.integers(3, 500, size=n)] for n in (13, 5)]
    blocks = [[5, 0], [3]]
    runs = {}
    for fused in ("0", "1"):
        monkeypatch.setenv("WEIR_FUSED_DECODE_ATTENTION", fused)
        runner = _runner(tiny_model_dirs[model], use_triton=True)
        tokens = [list(p) for p in prompts]
        logits = []
        with torch.inference_mode():
            for i, seq in enumerate(tokens):  # each prompt in one chunk
                step = runner._build_inputs([seq], [0], [len(seq)], [blocks[i]], np.array([len(seq) - 1]))
                hidden = runner._forward(step.input_ids, step.positions, step.metadata)
                row = runner.compute_logits(hidden[step.logits_indices])
                seq.append(int(row.argmax()))
                logits.append(row)
            for _ in range(5):  # decodes of both at once: positions 13..17 (block 0 from 16) and 5..9
                computed = [len(s) - 1 for s in tokens]
                step = runner._build_inputs(tokens, computed, [1, 1], blocks, np.arange(2))
                hidden = runner._forward(step.input_ids, step.positions, step.metadata)
                rows = runner.compute_logits(hidden[step.logits_indices])
                for seq, row in zip(tokens, rows, strict=True):
                    seq.append(int(row.argmax()))
                logits.append(rows)
        runs[fused] = (tokens, torch.cat(logits))
    num_layers = runner.model_config.num_layers
    assert calls == [2] * 5 * num_layers  # the fused run's decode steps only, every layer
    assert runs["1"][0] == runs["0"][0]
    assert torch.equal(runs["1"][1], runs["0"][1])


@in_process
@pytest.mark.parametrize("quantization", [None, "fp8"])
def test_moe_model_forward_on_triton_matches_torch(
    tiny_model_dirs: dict[str, Path], quantization: str | None
) -> None:
    """A mixture-of-experts model (Qwen2-MoE: every layer routed, plus the shared expert) takes the Triton
    fused MoE kernel in every MoE layer, and its logits over two prefill chunks match the torch backend's;
    with online fp8 the kernel's FP8-expert variant against the reference's dequantized experts."""
    from engine.model.layers.fused_moe import FusedMoE

    prompt = [int(t) for t in np.random.default_rng(3).integers(3, 500, size=21)]
    logits = {}
    for use_triton in (False, True):
        runner = _runner(tiny_model_dirs["qwen2_moe"], use_triton, quantization=quantization)
        experts = [m for m in runner.model.modules() if isinstance(m, FusedMoE)]
        assert len(experts) == 2
        assert all(
            m.kernels.fused_moe is (impl.fused_moe if use_triton else ops.reference.fused_moe)
            for m in experts
        )
        assert all((m.w13_weight.dtype == torch.float8_e4m3fn) == (quantization == "fp8") for m in experts)
        logits[use_triton] = _chunked_prefill_logits(runner, prompt, [5, 0])
    assert logits[True].shape == (21, 512)
    assert (logits[True] - logits[False]).abs().max().item() < 1e-4


@pytest.mark.parametrize("model", ["gemma2", "gemma3"])
def test_gemma_on_triton_matches_transformers(tiny_model_dirs: dict[str, Path], model: str) -> None:
    """Gemma's norms, GeGLU and windowed (gemma2: softcapped) attention on the Triton kernels: a 21-token
    prompt in two prefill chunks (the second past the 12- / 8-token windows) gives transformers' logits."""
    prompt = [int(t) for t in np.random.default_rng(3).integers(3, 500, size=21)]
    runner = _runner(tiny_model_dirs[model], use_triton=True)
    assert {type(m).__name__ for m in runner.model.modules()} >= {"GemmaRMSNorm", "GeluTanhAndMul"}
    logits = _chunked_prefill_logits(runner, prompt, [5, 0])
    hf = hf_causal_lm(str(tiny_model_dirs[model]), dtype=torch.float32).eval()
    with torch.no_grad():
        expected = hf(torch.tensor([prompt])).logits[0].float()
    assert (logits.cpu() - expected).abs().max().item() < 1e-4


@in_process
@pytest.mark.parametrize(
    "model",
    [
        "granite",
        "olmo2",
        "olmo",
        "stablelm",
        "starcoder2",
        "phi",
        "gpt_neox",
        "smollm3",
        "glm4",
        "cohere2",
        "exaone4",
        "olmoe",
        "gpt2",
    ],
)
def test_granite_and_olmo_on_triton_match_transformers(tiny_model_dirs: dict[str, Path], model: str) -> None:
    """Granite's attention multiplier as the paged attention's softmax scale, OLMo 2's q/k RMSNorm
    over rows of every head (64 and 32 wide, not head_dim) through the Triton rms_norm, OLMo 1's
    clamped q/k/v and weightless LayerNorms around the Triton attention, StableLM's quarter-head rotary
    with LayerNorms, StarCoder2's window of 12 on every layer with its plain GELU MLP, and Phi's parallel
    block with 0.4 of each head rotated (6 of 16 dims) and a biased LM head, and GPT-NeoX's per-head fused
    q/k/v with a quarter of each head rotated, and SmolLM3's NoPE layers (an identity cos/sin cache through
    the same rotary kernels), GLM-4-0414's half-head rotary on reordered q/k rows with its post-norms, and
    Command R7B's parallel block with a window and rope on one layer, none on the other, and EXAONE 4.0's
    post-norms with per-head q/k norms, likewise windowed, and OLMoE's cross-head q/k norms and clamp
    before its experts (the fused MoE kernel), and GPT-2's learned positions with an identity rotary
    table: a 21-token prompt in two prefill chunks gives
    transformers' logits."""
    prompt = [int(t) for t in np.random.default_rng(3).integers(3, 500, size=21)]
    runner = _runner(tiny_model_dirs[model], use_triton=True)
    assert runner.attn_layers[0].scale == (0.09 if model == "granite" else 16**-0.5)
    logits = _chunked_prefill_logits(runner, prompt, [5, 0])
    hf = hf_causal_lm(str(tiny_model_dirs[model]), dtype=torch.float32).eval()
    with torch.no_grad():
        expected = hf(torch.tensor([prompt])).logits[0].float()
    assert (logits.cpu() - expected).abs().max().item() < 1e-4


@in_process
def test_head_dim_96_phi3_on_triton_matches_torch_and_transformers(
    tiny_tokenizer_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Phi-3-mini's head size, 96 (not a power of two: the kernels pad it to 128 lanes), on the Triton
    backend: a 21-token prompt in two prefill chunks, then three greedy decode steps (decode_attention:
    rotary, KV write and attention in one launch), give the torch backend's logits and transformers'."""
    from tests.tiny_models import build_model

    model_dir = build_model(
        "phi3", tmp_path / "phi3_head96", tiny_tokenizer_dir, hidden_size=192, num_attention_heads=2,
        num_key_value_heads=1,
    )  # fmt: skip
    monkeypatch.setenv("WEIR_FUSED_DECODE_ATTENTION", "1")
    calls = []
    fused = impl.decode_attention
    monkeypatch.setattr(impl, "decode_attention", lambda *a, **k: calls.append(1) or fused(*a, **k))
    prompt = [int(t) for t in np.random.default_rng(4).integers(3, 500, size=21)]
    runs = {}
    for use_triton in (False, True):
        runner = _runner(model_dir, use_triton)
        assert runner.model_config.head_dim == 96
        assert runner.attn_backend.name == ("triton" if use_triton else "torch")
        tokens = list(prompt)
        rows = [_chunked_prefill_logits(runner, tokens, [5, 0])]
        with torch.inference_mode():
            for _ in range(3):
                tokens.append(int(rows[-1][-1].argmax()))
                step = runner._build_inputs([tokens], [len(tokens) - 1], [1], [[5, 0]], np.arange(1))
                hidden = runner._forward(step.input_ids, step.positions, step.metadata)
                rows.append(runner.compute_logits(hidden[step.logits_indices]))
        runs[use_triton] = (tokens, torch.cat(rows))  # [21 + 3, vocab]
    assert calls == [1] * 3 * 2  # every decode step of both layers took the fused kernel
    assert runs[True][0] == runs[False][0]
    assert (runs[True][1] - runs[False][1]).abs().max().item() < 1e-4
    hf = hf_causal_lm(str(model_dir), dtype=torch.float32).eval()
    with torch.no_grad():
        expected = hf(torch.tensor([runs[True][0]])).logits[0].float()  # [21 + 3, vocab]
    assert (runs[True][1].cpu() - expected).abs().max().item() < 1e-4


def test_head_sizes_the_kernels_do_not_take_are_named(caplog: pytest.LogCaptureFixture) -> None:
    """96 now takes the Triton backend on a GPU; a size no kernel takes (20: not a multiple of 8) is
    refused when Triton is asked for and falls back to the torch ops, with a warning, when it is not."""
    f32 = torch.float32
    assert isinstance(get_attention_backend("cuda", f32, f32, 96, 16), TritonAttentionBackend)
    assert isinstance(
        get_attention_backend(DEVICE, f32, f32, 96, 16, use_triton=True), TritonAttentionBackend
    )
    supported = "a multiple of 8 from 16 to 256, or a power of two >= 16"
    with pytest.raises(
        ValueError, match=f"head_dim=20 is not supported by the Triton kernels; they take {supported}"
    ):
        get_attention_backend(DEVICE, f32, f32, 20, 16, use_triton=True)
    with caplog.at_level("WARNING", logger="weir.engine"):
        backend = get_attention_backend("cuda", f32, f32, 20, 16)
    assert backend.name == "torch"
    assert f"head_dim 20 is not one the Triton kernels take ({supported})" in caplog.text
