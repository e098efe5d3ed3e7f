"""GLM-4, GLM-4-0414, Cohere Command R and Command R7B beyond the tiny families' parity matrix
(tests/e2e/test_parity.py): their rope turns interleaved pairs of dims, which weir's kernels (halves) serve
after reordering q/k rows at load. Shown here: the reordering is exact on its own (the rotations agree row
for row), it is what the parity rests on (without it the tokens change), adapters on q/k take the same
reordering of their B rows, FP8 checkpoints (per tensor, channel or block) and online FP8 take it too, and the
refusals: an integer-quantized checkpoint at start, FP8 blocks that split heads, Command R+'s q/k norms, each
naming what is refused."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from engine import LLM, LoRARequest, SamplingParams
from engine.model.models.glm import interleaved_to_halves
from tests.e2e.test_parity import _prompts, hf_greedy
from tests.peft_adapters import peft_greedy, random_peft_adapter


def _greedy() -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)


def _rotate_halves(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """weir's rotation (neox style): [.., rotary_dim] with pairs (i, i + rotary_dim / 2)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def test_reordered_rows_rotate_as_transformers_interleaved_pairs() -> None:
    from transformers.models.glm.modeling_glm import apply_rotary_pos_emb

    head_dim, rotary_dim, heads, positions = 16, 8, 3, 5
    w = torch.randn(heads * head_dim, 12, dtype=torch.float64)  # a q_proj weight
    x = torch.randn(positions, 12, dtype=torch.float64)
    inv_freq = 1.0 / (10000 ** (torch.arange(0, rotary_dim, 2, dtype=torch.float64) / rotary_dim))
    freqs = torch.arange(positions, dtype=torch.float64)[:, None] * inv_freq  # [positions, rotary_dim / 2]
    emb = torch.cat([freqs, freqs], dim=-1)  # transformers' cos/sin layout, which GLM interleaves itself
    q = (x @ w.T).view(positions, heads, head_dim).transpose(0, 1)[None]  # [1, heads, positions, head_dim]
    theirs, _ = apply_rotary_pos_emb(q, q, emb.cos()[None], emb.sin()[None])
    ours = (x @ interleaved_to_halves(w, head_dim, rotary_dim).T).view(positions, heads, head_dim)
    rot = _rotate_halves(ours[..., :rotary_dim], freqs.cos()[:, None], freqs.sin()[:, None])
    ours = torch.cat([rot, ours[..., rotary_dim:]], dim=-1).transpose(0, 1)[None]
    order = interleaved_to_halves(torch.arange(head_dim), head_dim, rotary_dim)  # where each dim went
    torch.testing.assert_close(ours, theirs[..., order], rtol=0, atol=1e-12)


@pytest.mark.parametrize("family", ["glm", "glm4", "cohere", "cohere2", "gptj"])
def test_without_the_reordering_the_tokens_change(
    tiny_model_dirs: dict[str, Path], family: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    model_dir = tiny_model_dirs[family]
    prompts = _prompts()[:4]
    expected, _ = hf_greedy(model_dir, _prompts())
    llm = LLM(str(model_dir), device="cpu", dtype="float32")
    assert [o.outputs[0].token_ids for o in llm.generate(prompts, _greedy(), use_tqdm=False)] == expected[:4]
    llm.shutdown()
    # the checkpoint's rows as they are: each head's interleaved pairs rotated as halves
    monkeypatch.setattr(
        "engine.model.models.glm.interleaved_to_halves", lambda rows, head_dim, rotary_dim: rows
    )
    outs = LLM(str(model_dir), device="cpu", dtype="float32").generate(prompts, _greedy(), use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] != expected[:4]


@pytest.mark.parametrize(
    ("family", "fmt"),
    [
        ("glm", "fp8-channel"),
        ("glm4", "fp8-block-16"),
        ("cohere", "fp8-tensor"),
        ("cohere2", "online-fp8"),
        ("gptj", "fp8-channel"),
    ],
)
def test_fp8_checkpoints_take_the_reordering(
    tiny_model_dirs: dict[str, Path], tmp_path: Path, family: str, fmt: str
) -> None:
    """FP8 weights are rows too: an FP8 checkpoint (per channel, its [rows, 1] scales reordered with the rows;
    per tensor; blocks of 16 rows, one head each, whose scale grid keeps its order) and online
    `--quantization fp8` run token for token like transformers on the dequantized weights."""
    from tests.engine.quantization.checkpoints import FORMATS, write_fp8, write_fp8_online_reference
    from tests.engine.quantization.parity import assert_parity

    src = tiny_model_dirs[family]
    if fmt == "online-fp8":
        quantized, reference, options = (
            src,
            write_fp8_online_reference(src, tmp_path),
            {"quantization": "fp8"},
        )
    elif fmt == "fp8-block-16":
        (quantized, reference), options = write_fp8(src, tmp_path, "block", block=(16, 16)), {}
    else:
        (quantized, reference), options = FORMATS[fmt][1](src, tmp_path), {}
    assert_parity(quantized, reference, "default", "fp8", **options)


def test_fp8_blocks_that_split_heads_are_refused(tiny_model_dirs: dict[str, Path], tmp_path: Path) -> None:
    from tests.engine.quantization.checkpoints import write_fp8

    quantized, _ = write_fp8(tiny_model_dirs["glm"], tmp_path, "block", block=(8, 16))  # heads of 16 rows
    with pytest.raises(ValueError, match="FP8 weight blocks of 8 rows split heads of 16"):
        LLM(str(quantized), device="cpu", dtype="float32")


def test_integer_quantized_glm_is_refused_at_start(tiny_model_dirs: dict[str, Path], tmp_path: Path) -> None:
    from tests.engine.quantization.checkpoints import FORMATS

    _, writer = FORMATS["gptq-4-g32"]
    quantized, _ = writer(tiny_model_dirs["glm"], tmp_path)
    with pytest.raises(ValueError) as err:
        LLM(str(quantized), device="cpu", dtype="float32")
    assert "is not supported for GlmForCausalLM: its q/k rows are reordered at load" in str(err.value)
    assert "serve an unquantized or FP8 checkpoint" in str(err.value)


@pytest.mark.parametrize("family", ["glm", "cohere"])
def test_adapter_on_q_and_k_matches_peft(
    tiny_model_dirs: dict[str, Path], tmp_path: Path, family: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An adapter on q/k/v and o_proj: its q and k B rows reordered as the weights were, the tokens PEFT's;
    loaded as they are (no reordering) they are not."""
    from engine.model.models import glm

    model_dir = tiny_model_dirs[family]
    qkvo = random_peft_adapter(
        model_dir, tmp_path / "qkvo", ["q_proj", "k_proj", "v_proj", "o_proj"], seed=7, std=0.3
    )
    prompts = _prompts()[:3]
    want = peft_greedy(model_dir, qkvo, prompts, 20)
    adapter = LoRARequest("qkvo", 1, str(tmp_path / "qkvo"))

    def run() -> list[list[int]]:
        with LLM(str(model_dir), device="cpu", dtype="float32", enable_lora=True, max_lora_rank=8) as llm:
            outs = llm.generate(prompts, _greedy(), lora_request=adapter, use_tqdm=False)
            return [o.outputs[0].token_ids for o in outs]

    assert run() == want
    # the checkpoint's rows as they are
    monkeypatch.setattr(glm.InterleavedRopeQKVLinear, "lora_b_row_order", lambda self, index: None)
    assert run() != want


def test_command_r_plus_qk_norm_is_refused(tiny_model_dirs: dict[str, Path], tmp_path: Path) -> None:
    import json

    model_dir = tmp_path / "cohere_qk"
    model_dir.mkdir()
    for f in tiny_model_dirs["cohere"].iterdir():
        (model_dir / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((model_dir / "config.json").read_text())
    (model_dir / "config.json").write_text(json.dumps({**cfg, "use_qk_norm": True}))
    with pytest.raises(
        ValueError, match="unsupported use_qk_norm true in .*config.json for CohereForCausalLM"
    ):
        LLM(str(model_dir), device="cpu", dtype="float32")
