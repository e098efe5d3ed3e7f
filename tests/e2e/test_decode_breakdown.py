"""K1 (loadtest/decode_breakdown.py via profile_kernels --mode batch1): the batch-1 decode step part by
part. On a CPU the eager pass runs for real (CPU operator times); the graphed pass's labelling, gaps and
bandwidth arithmetic are checked on a synthetic kernel timeline shaped like a CUDA profile's."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from loadtest import decode_breakdown as db
from loadtest import profile_kernels
from tests.e2e.test_benchmarks_smoke import ENGINE, assert_in_summary, load_report


def test_batch1_profile_on_cpu(tiny_llama_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "k1.json"
    argv = ["--mode", "batch1", "--model", str(tiny_llama_dir), *ENGINE, "--input-len", "12"]
    argv += ["--output-len", "24", "--decode-steps", "3", "--temperature", "0", "--out", str(out)]
    assert profile_kernels.main(argv) == 0
    data = load_report(out, "K1")
    res = data["results"]["batch1"]
    assert res["batch"] == 1 and "graphed" not in res  # no CUDA graph on a CPU
    assert res["context_tokens"] == 12 + 4  # the prompt, then four decode steps before the profile
    table = res["eager_step"]
    config = json.loads((tiny_llama_dir / "config.json").read_text())
    hidden, layers, inter = config["hidden_size"], config["num_hidden_layers"], config["intermediate_size"]
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    head_dim = config.get("head_dim") or hidden // heads
    fp32 = 4
    # Bytes a step reads: each projection's weights in every layer, the LM head, the KV cache so far.
    assert table["qkv_proj"]["bytes_per_step"] == layers * hidden * (heads + 2 * kv_heads) * head_dim * fp32
    assert table["o_proj"]["bytes_per_step"] == layers * heads * head_dim * hidden * fp32
    assert table["gate_up_proj"]["bytes_per_step"] == layers * hidden * 2 * inter * fp32
    assert table["down_proj"]["bytes_per_step"] == layers * inter * hidden * fp32
    assert table["lm_head"]["bytes_per_step"] == config["vocab_size"] * hidden * fp32
    assert table["attention"]["bytes_per_step"] == 2 * layers * kv_heads * head_dim * fp32 * 16
    for part in (
        "qkv_proj",
        "o_proj",
        "gate_up_proj",
        "down_proj",
        "lm_head",
        "attention",
        "norm",
        "sampler",
    ):
        row = table[part]
        assert row["us_per_step"] > 0 and row["kernels_per_step"] >= 1, part
    for part in ("qkv_proj", "lm_head"):
        r = table[part]
        # gb_s comes from the unrounded time; the table rounds it to 0.1 GB/s and the time to 0.01 us
        slowest, fastest = ((r["us_per_step"] + d) * 1e-6 for d in (0.005, -0.005))
        assert (
            r["bytes_per_step"] / slowest / 1e9 - 0.0501
            <= r["gb_s"]
            <= r["bytes_per_step"] / fastest / 1e9 + 0.0501
        )
        assert r["fraction_of_copy_bw"] == round(r["gb_s"] / data["copy_bandwidth"]["GB_s"], 4)
    assert abs(sum(r["share"] for r in table.values()) - 1.0) < 0.01
    assert res["weight_bytes_per_step"] == data["model"]["weight_bytes"] - config[
        "vocab_size"
    ] * hidden * fp32 * (0 if config.get("tie_word_embeddings") else 1)
    assert_in_summary(tmp_path, "K1")


def test_a_quantized_projection_counts_its_buffers() -> None:
    """A 4-bit layer's words, scales and zero points are buffers after loading (wna16.py registers them), so a
    projection's bytes read a step are its parameters and its own buffers; an attached LoRA hook's adapter
    stacks and a rotary table (a buffer read one row a step) are not counted."""
    from types import SimpleNamespace

    from torch import nn

    proj = nn.Module()
    proj.register_buffer("qweight", torch.zeros(64, 96, dtype=torch.int32))  # [in / 8, out]
    proj.register_buffer("scales", torch.zeros(4, 96, dtype=torch.float16))  # [G, out]
    proj.lora = (
        nn.Module()
    )  # a LoRA hook's stacks: buffers of every adapter slot, not this projection's bytes
    proj.lora.register_buffer("a_stacked", torch.zeros(8, 16, 512))
    rotary = nn.Module()
    rotary.register_buffer("cos_sin_cache", torch.zeros(128, 16))
    attn = nn.Module()
    attn.qkv_proj = proj
    attn.rotary_emb = rotary
    layer = nn.Module()
    layer.self_attn = attn
    layer.input_layernorm = nn.Linear(4, 4, bias=False)  # stands in for a norm: a parameter of 16 floats
    model = nn.Module()
    model.layers = nn.ModuleList([layer])
    with db.labelled(SimpleNamespace(model=model)) as param_bytes:
        assert param_bytes["qkv_proj"] == 64 * 96 * 4 + 4 * 96 * 2
        assert param_bytes["norm"] == 16 * 4
        assert param_bytes.get("rotary", 0) == 0


def _kernel(name: str, start: float, dur: float, label: str | None, rng: int | None = None) -> dict:
    return {"name": name, "start": start, "end": start + dur, "label": label, "range": rng}


LAYER = [  # (kernel, part) of one layer as the eager step launches them
    ("rms_norm", "norm"),
    ("gemv_a", "qkv_proj"),
    ("rotary", "rotary"),
    ("write_kv_cache", "attention"),
    ("paged_attention_1seg", "attention"),
    ("gemv_a", "o_proj"),
    ("rms_norm", "norm"),
    ("gemv_b", "gate_up_proj"),
    ("silu_mul", "activation"),
    ("gemv_a", "down_proj"),
]


def test_the_unlabelled_part_lists_its_kernels_by_name() -> None:
    """Kernels no range or family labels (the Triton GEMVs of a quantized step were, on an H100 with torch 2.11)
    land in "other"; its row names them, longest first, so the next labelling rule can be written from a run."""
    rows = [
        {"name": "_w4_half2_gemv_kernel", "start": 0.0, "end": 9.0, "part": "other"},
        {"name": "_w4_half2_gemv_kernel", "start": 10.0, "end": 19.0, "part": "other"},
        {"name": "triton_poi_fused_0", "start": 20.0, "end": 21.0, "part": "other"},
        {"name": "rms_norm_kernel", "start": 22.0, "end": 24.0, "part": "norm"},
    ]
    table = db.part_table(rows, 2, {}, None)
    assert table["other"]["kernels_per_step"] == 1.5 and table["other"]["us_per_step"] == 9.5
    assert table["other"]["top_kernels"] == [
        {"name": "_w4_half2_gemv_kernel", "kernels_per_step": 1.0, "us_per_step": 9.0},
        {"name": "triton_poi_fused_0", "kernels_per_step": 0.5, "us_per_step": 0.5},
    ]
    assert "top_kernels" not in table["norm"]
    assert db.family_of("_w4_half2_gemv_kernel") == db.family_of("_fp8_gemv_kernel") == "matmul"


def test_graphed_breakdown_labels_graph_kernels_from_the_eager_step() -> None:
    layers, steps = 2, 2
    eager = [_kernel("memcpy_h2d", 0, 1, None), _kernel("embedding", 1, 1, "embedding")]
    t = 2.0
    for _ in range(layers):
        for name, part in LAYER:
            eager.append(_kernel(name, t, 1, part))
            t += 1
    eager += [_kernel("gemv_lm", t, 5, "lm_head"), _kernel("argmax", t + 5, 1, "sampler")]
    graph: list[dict] = []
    t = 1000.0
    for step in range(steps):
        graph.append(_kernel("memcpy_h2d", t, 2, None))  # inputs, before the replay
        t += 3
        seq = ["embedding"]
        for _ in range(layers):
            # The graph's attention is the split-KV variant (not in the eager step) plus its reduction.
            names = [n for n, _ in LAYER]
            i = names.index("paged_attention_1seg")
            seq += names[:i] + ["paged_attention_split", "reduce_segments"] + names[i + 1 :]
        for name in seq:
            dur = 10.0 if name.startswith("gemv") else 2.0
            graph.append(_kernel(name, t, dur, db.GRAPH, rng=step))
            t += dur + 0.5  # half a microsecond between kernels inside the graph
        graph += [_kernel("gemv_lm", t + 3, 40, "lm_head"), _kernel("argmax", t + 44, 4, "sampler")]
        t += 100
    nbytes = {"qkv_proj": 2_000_000, "lm_head": 8_000_000, "attention": 64_000}
    out = db.graphed_breakdown(graph, eager, steps, nbytes, copy_gb_s=1000.0)
    table, g = out["table"], out["graph"]
    per_replay = 1 + layers * (len(LAYER) + 1)
    assert g["replays"] == steps and g["kernels_per_replay"] == per_replay
    # Every graph kernel but the two attention variants the eager step lacks found its eager twin.
    assert g["labelled_from_eager"] == round(1 - 2 * layers / per_replay, 4)
    assert (
        g["gap_us_median"] == 0.5
        and g["gap_us_per_replay"] == 0.5 * (per_replay - 1)
        and g["gaps_over_2us"] == 0
    )
    assert g["span_us_median"] == g["kernel_us_median"] + g["gap_us_per_replay"]
    for part in ("qkv_proj", "o_proj", "gate_up_proj", "down_proj"):
        assert table[part]["kernels_per_step"] == layers and table[part]["us_per_step"] == 10.0 * layers, part
    assert table["attention"]["kernels_per_step"] == 2 * layers  # split kernel + reduction, by family
    assert table["kv_write"]["kernels_per_step"] == layers  # told apart inside the attention module
    assert table["norm"]["kernels_per_step"] == 2 * layers and table["embedding"]["kernels_per_step"] == 1
    assert table["lm_head"] == {
        "kernels_per_step": 1.0,
        "us_per_step": 40.0,
        "share": table["lm_head"]["share"],
        "us_per_kernel_median": 40.0,
        "bytes_per_step": 8_000_000,
        "gb_s": 200.0,  # 8 MB in 40 us
        "fraction_of_copy_bw": 0.2,
    }
    assert table["qkv_proj"]["gb_s"] == 100.0 and table["qkv_proj"]["fraction_of_copy_bw"] == 0.1
    assert table["copies"]["kernels_per_step"] == 1 and table["sampler"]["us_per_step"] == 4.0
    assert out["outside_graph_us_per_step"] == 2 + 40 + 4


def test_align_labels_skips_what_one_side_lacks() -> None:
    eager = [("a", "x"), ("b", "y"), ("r", "z"), ("a", "w")]
    assert db.align_labels(eager, ["a", "b", "a"]) == ["x", "y", "w"]  # the graph lacks r
    assert db.align_labels(eager, ["a", "q", "b"]) == ["x", None, "y"]  # q is not in the eager step


@pytest.mark.parametrize(
    ("name", "part"),
    [
        ("model.layers.3.self_attn.qkv_proj", "qkv_proj"),
        ("model.layers.3.self_attn.o_proj", "o_proj"),
        ("model.layers.0.mlp.gate_up_proj", "gate_up_proj"),
        ("model.layers.0.mlp.down_proj", "down_proj"),
        ("model.layers.0.input_layernorm", "norm"),
        ("model.norm", "norm"),
        ("model.embed_tokens", "embedding"),
        ("model.layers.1.self_attn.attn", "attention"),
        ("model.layers.1.self_attn", None),
        ("model.layers.1.mlp", None),
    ],
)
def test_module_parts(name: str, part: str | None) -> None:
    assert db.part_of_module(name) == part


def test_batch1_profile_with_a_lora_adapter_on_cpu(tiny_llama_dir: Path, tmp_path: Path) -> None:
    """A3's step: the request runs on a rank-8 adapter; the LoRA kernels are a part of their own even
    though they launch inside a projection's module."""
    out = tmp_path / "k1_lora.json"
    argv = ["--mode", "batch1", "--model", str(tiny_llama_dir), *ENGINE, "--input-len", "12"]
    argv += ["--output-len", "24", "--decode-steps", "3", "--temperature", "0", "--lora-rank", "8"]
    assert profile_kernels.main([*argv, "--out", str(out)]) == 0
    data = load_report(out, "K1")
    assert data["workload"]["lora_rank"] == 8
    assert data["results"]["batch1"]["loras_loaded"] == [1]  # the request ran on the adapter
    assert data["results"]["batch1"]["eager_step"]["qkv_proj"]["us_per_step"] > 0
    assert db.refine("qkv_proj", "_lora_shrink_kernel") == "lora"
    assert db.refine("down_proj", "_lora_expand_kernel") == "lora"
    assert db.refine("qkv_proj", "gemv_a") == "qkv_proj"


def test_a_batch_of_decodes_profiles_as_one_step_on_cpu(tiny_llama_dir: Path, tmp_path: Path) -> None:
    """L1's batch-8 step (--decode-batch): the sequences decode in one step; the weights count once, the
    KV caches once per sequence."""
    out = tmp_path / "k8.json"
    argv = ["--mode", "batch1", "--model", str(tiny_llama_dir), *ENGINE, "--input-len", "12"]
    argv += ["--output-len", "24", "--decode-steps", "3", "--temperature", "0", "--decode-batch", "3"]
    argv += ["--replay-sizes", "1,2"]  # graphs replayed alone: CUDA only, none here
    assert profile_kernels.main([*argv, "--out", str(out)]) == 0
    data = load_report(out, "K1")
    res = data["results"]["batch1"]
    assert "graph_replay_ms_by_size" not in res
    assert data["workload"]["batch"] == 3 and res["batch"] == 3 and res["sequences_running"] == 3
    assert res["context_tokens"] == 12 + 4
    config = json.loads((tiny_llama_dir / "config.json").read_text())
    hidden, layers = config["hidden_size"], config["num_hidden_layers"]
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    head_dim = config.get("head_dim") or hidden // heads
    table = res["eager_step"]
    assert table["lm_head"]["bytes_per_step"] == config["vocab_size"] * hidden * 4
    assert table["attention"]["bytes_per_step"] == 2 * layers * kv_heads * head_dim * 4 * 16 * 3


def test_the_graph_alone_is_timed_by_replaying_the_steps_graph(tiny_llama_dir: Path) -> None:
    """graph_replay_ms replays the decode graph a step of N sequences takes (its padded size; here the
    CPU stand-in graphs) back to back; no graph for a batch past the largest size, nor without graphs."""
    from engine import LLM, SamplingParams
    from loadtest.common import engine_runner

    llm = LLM(str(tiny_llama_dir), device="cpu", dtype="float32", max_num_seqs=8, max_model_len=64)
    runner = engine_runner(llm)
    assert db.graph_replay_ms(runner, 1) is None  # no graphs on a CPU until emulated
    runner.capture_cuda_graphs(emulate=True)
    graphs = runner.graph_runner
    llm.generate([[5, 6, 7]] * 3, SamplingParams(max_tokens=4, temperature=0), use_tqdm=False)
    size = graphs.padded_size(3)
    assert size is not None and size >= 3
    assert graphs.decode_replay(3) is graphs.decode_replay(size)  # the padded size's graph
    assert graphs.decode_replay(graphs.sizes[-1] + 1) is None
    before = graphs._graphs[size, None].output.clone()
    ms = db.graph_replay_ms(runner, 3, reps=3)
    assert ms is not None and ms > 0
    assert torch.equal(graphs._graphs[size, None].output, before)  # the same inputs, the same output
    assert db.graph_replay_ms(runner, graphs.sizes[-1] + 1) is None
    # --replay-sizes: another size's graph runs on its capture's padding-only batch, written first (what
    # the last step left in the shared static buffer is no batch of that size: on a GPU, an illegal address)
    written = []
    dummy_step = graphs.dummy_step
    graphs.dummy_step = lambda batch_size: written.append(batch_size) or dummy_step(batch_size)
    largest = graphs.sizes[-1]
    assert db.graph_replay_ms(runner, largest - 1, reps=2, on_dummy_step=True) > 0
    assert written == [largest]
    assert torch.isfinite(graphs._graphs[largest, None].output).all()
