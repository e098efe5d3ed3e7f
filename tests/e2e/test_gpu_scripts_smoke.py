"""CPU smoke runs of the GPU scripts, so they do not rot between device calls: loadtest/bench_sampler.py
(the sampler's draw checked against its spec, kernel under the Triton interpreter),
loadtest/trace_compiles.py (the engine built with the compile hooks and warm-up marks in place; on CPU
nothing compiles), and the steps for the MoE / Phi-3 / Gemma families (loadtest/device_call.sh's famk,
moek, fam, moet2, moel1): gpu_kernel_check.py's families and moe parts at tiny shapes under the
interpreter, gpu_family_check.py --dry-run, the new model shapes and the MoE latency roofline."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _run(args: list[str]) -> None:
    done = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


def test_bench_sampler_cpu(tmp_path: Path) -> None:
    out = tmp_path / "sampler.json"
    _run(["loadtest/bench_sampler.py", "--device", "cpu", "--batch-sizes", "1,3", "--vocab-size", "3000",
          "--out", str(out)])  # fmt: skip
    rows = json.loads(out.read_text())["results"]
    assert [r["rows"] for r in rows] == [1, 3]
    assert all(r["triton_equals_spec"] and r["greedy_equals_torch"] for r in rows), rows
    assert all(r["softmax_path_differs_rows"] == 0 for r in rows), rows


def test_trace_compiles_cpu(tmp_path: Path) -> None:
    out = tmp_path / "compiles.json"
    _run(["loadtest/trace_compiles.py", "--device", "cpu", "--shape", "tiny-llama3", "--out", str(out)])
    report = json.loads(out.read_text())
    assert report["compiles"] == []  # the torch kernels on CPU: nothing for Triton to compile
    names = [name for _, name in report["marks"]]
    assert names[:2] == ["before graphs", "after graphs"] and names[2].startswith("first request"), names


# ------------------------------------------------------------------ the new families' GPU steps


def _run_env(args: list[str], env: dict[str, str]) -> None:
    """One intra-op thread: on the two shared CI cores, oversubscribed torch threads make these tiny
    forwards several times slower."""
    import os

    env = {**os.environ, "OMP_NUM_THREADS": "1", **env}
    done = subprocess.run(
        [sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=300, env=env
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


def test_gpu_kernel_check_families_and_moe_smoke(tmp_path: Path) -> None:
    """gpu_kernel_check.py's families and moe parts at tiny shapes under the Triton interpreter: every
    check passes (the integer experts' in both column orders too), the sweep's own launch is the op's bit
    for bit, every timing row is there."""
    # one more decode tile for the grouped GEMM and one more GEMV launch (device step moei)
    env = {"OUT": str(tmp_path), "WEIR_MOE_INT_TILES": "16,32,2", "WEIR_MOE_GEMV_LAUNCHES": "32,2,4"}
    _run_env(["loadtest/gpu_kernel_check.py", "--smoke", "families", "moe"], env)
    report = json.loads((tmp_path / "kernels.json").read_text())
    assert report["errors"] == []
    names = [c["name"] for c in report["checks"]]
    assert all(c["ok"] for c in report["checks"]), [c for c in report["checks"] if not c["ok"]]
    for expected in (
        "tiny-gemma2 window 24 softcap 50: paged_attention decode, 8 KV segments",
        "tiny-gemma2: windowed softcapped decode_attention == rotary_and_write_kv, paged_attention (bit for bit)",
        "tiny-gemma2: CUDA-graph replay of the windowed softcapped decode (new lengths, tables)",
        "tiny-phi4-mini (head 32, rotary 24): the dims past rotary_dim pass through unchanged",
        "tiny gemma_rms_norm+residual 64 residual",
        "tiny gelu_tanh_and_mul 48",
        "tiny-qwen3-moe fused_moe 70 tok vs float32 reference",
        "tiny-mixtral fused_moe 8 tok skewed vs reference in float32",
        "tiny-qwen3-moe fused_moe 8 tok: CUDA graph replay 2 (new routing)",
        "tiny-mixtral 70 tok: the sweep's launch at ops' tiles == ops.triton.fused_moe (bit for bit)",
        "tiny-qwen3-moe moe_align 70 tok skewed: kernel == torch ops (bit for bit, BLOCK_M 16 and 64)",
        "tiny-mixtral moe_align 1 tok: kernel == torch ops (bit for bit, BLOCK_M 16 and 64)",
        "tiny-mixtral fused_moe int4 checkpoint order 8 tok vs float32 reference",
        "tiny-qwen3-moe fused_moe int4 act order 8 tok vs float32 reference",
        "tiny-mixtral fused_moe int4 checkpoint order n16 k32 s2 8 tok vs float32 reference",
        "tiny-qwen3-moe fused_moe int4 k-major act order 8 tok vs float32 reference",
        "tiny-qwen3-moe fused_moe int4 k-major grouped GEMM 8 tok vs float32 reference",
        "tiny-mixtral fused_moe int4 k-major gemv n32 s2 w4 8 tok vs float32 reference",
    ):
        assert expected in names, (expected, names)
    # the integer experts in both column orders and layouts, on the grouped GEMM, with the tile
    # WEIR_MOE_INT_TILES adds and the GEMV launch WEIR_MOE_GEMV_LAUNCHES adds
    int4 = report["timings"]["moe_int4"]
    orders = (
        "checkpoint order", "act order", "k-major", "k-major act order", "checkpoint order grouped GEMM",
        "k-major grouped GEMM", "checkpoint order n16 k32 s2", "k-major gemv n32 s2 w4",
    )  # fmt: skip
    assert [(r["shape"], r["order"]) for r in int4] == [
        (s, o) for s in ("tiny-mixtral", "tiny-qwen3-moe") for o in orders
    ]
    assert all(r["ms_graph"] > 0 and r["min_bytes"] > 0 for r in int4)
    rows = report["timings"]["moe"]
    assert [(r["shape"], r["tokens"]) for r in rows] == [
        (s, t) for s in ("tiny-mixtral", "tiny-qwen3-moe") for t in (1, 70)
    ]
    assert rows[0]["touched_experts"] == 2 and all(r["ms_graph"] > 0 and r["torch_loop_ms"] > 0 for r in rows)
    assert all(r["ms_graph_torch_align"] > 0 for r in rows)  # the layer with the alignment kernel on and off
    align = report["timings"]["moe_align"]
    assert [(r["shape"], r["pairs"]) for r in align] == [
        ("tiny-mixtral", 2), ("tiny-mixtral", 16), ("tiny-mixtral", 140),
        ("tiny-qwen3-moe", 4), ("tiny-qwen3-moe", 32), ("tiny-qwen3-moe", 280),
    ]  # fmt: skip
    assert all(r["kernel_ms"] > 0 and r["torch_ms"] > 0 and not r["kernel_used_by_fused_moe"] for r in align)
    sweep = report["timings"]["moe_sweep"]
    assert sum(r["default"] for r in sweep) == 2  # one default launch per (shape, token count)
    assert all(r["ok"] for r in sweep), [r for r in sweep if not r["ok"]]
    assert {r["block_m"] for r in sweep} == {32, 64} and len(sweep) == 8  # 2 shapes x 2 BLOCK_M x 2 tiles


def test_family_check_tells_router_flips_from_a_kernel_error() -> None:
    """gpu_family_check's decoded-token drift rule, on drifts shaped as measured on an H100 (Mixtral-8x7B-2l,
    2d0586f: 2 of 80 tokens over 0.3, median 0.0003): an MoE model passes with two flipped tokens, a dense
    one does not; an MoE model whose every token drifts (a kernel error) or with 5 of 80 flipped fails.
    In a subprocess: the script imports the engine, which must not bring triton into this process."""
    code = """
from loadtest.gpu_family_check import judge_drift
flips = [[0.0003] * 16 for _ in range(5)]
flips[1][15], flips[3][2] = 3.98, 0.47
assert judge_drift(flips, moe=True)[1], judge_drift(flips, moe=True)
assert not judge_drift(flips, moe=False)[1]
assert judge_drift(flips, moe=True)[2]["decode_tokens_over_bound"] == "2/80: [(1, 15, 3.98), (3, 2, 0.47)]"
assert not judge_drift([[0.05] * 16 for _ in range(5)], moe=True)[1]  # median 0.05 >= 0.03
many = [row[:] for row in flips]
many[0][0] = many[0][1] = many[2][5] = 1.0  # 5 of 80 over: past 5%
assert not judge_drift(many, moe=True)[1]
assert judge_drift([[0.29] * 4], moe=False)[1]
"""
    _run_env(["-c", code], {})


def test_gpu_family_check_dry_run(tmp_path: Path) -> None:
    """gpu_family_check.py on CPU: a tiny MoE family in fp32 and bf16 against transformers, and the
    real-shape part on tiny-gemma2 (dummy weights, the torch-ops swap, the logits tap)."""
    _run_env(["loadtest/gpu_family_check.py", "--dry-run"], {"OUT": str(tmp_path)})
    report = json.loads((tmp_path / "family_check.json").read_text())
    assert report["errors"] == [] and all(c["ok"] for c in report["checks"])
    assert set(report["info"]["tiny_families"]["qwen3_moe"]) == {"float32", "bfloat16"}
    info = report["info"]["real_shapes"]["tiny-gemma2"]
    assert info["logits_rel_err"] == 0.0 and info["argmax_agree"] == "3/3"  # torch ops both ways on CPU
    assert len(report["checks"]) == 5


def test_new_shapes_match_transformers_and_the_engine(tmp_path: Path) -> None:
    """The MoE and Gemma shapes' parameter counts equal transformers' (meta device), the engine reads their
    configs, and the active parameters of an MoE step grow from top_k experts toward all of them."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from engine.model_config import ModelConfig
    from loadtest.model_shapes import SHAPES, active_parameters, num_parameters

    expected = {"mixtral-8x7b-2l": 3_164_688_384, "qwen3-30b-a3b": 30_532_122_624, "gemma2-9b": 9_241_705_984}
    for shape in (*expected, "tiny-mixtral", "tiny-qwen3-moe", "tiny-gemma2"):
        path = tmp_path / shape
        path.mkdir()
        (path / "config.json").write_text(json.dumps(SHAPES[shape]))
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path))
        assert sum(p.numel() for p in model.parameters()) == num_parameters(SHAPES[shape]), shape
        assert num_parameters(SHAPES[shape]) == expected.get(shape, num_parameters(SHAPES[shape]))
        ModelConfig.from_pretrained(path, max_model_len=2048, device="cpu")
    qwen = SHAPES["qwen3-30b-a3b"]
    assert round(active_parameters(qwen, 1) / 1e9, 2) == 3.35  # "A3B": top-8 of 128 experts
    assert (
        active_parameters(qwen, 1)
        < active_parameters(qwen, 8)
        < active_parameters(qwen, 64)
        < num_parameters(qwen)
    )
    assert abs(active_parameters(qwen, 4096) - num_parameters(qwen)) < 1  # every expert
    assert active_parameters(SHAPES["gemma2-9b"], 8) == num_parameters(SHAPES["gemma2-9b"])  # dense


def test_moe_latency_roofline_counts_the_experts_a_step_reads(tmp_path: Path) -> None:
    """moel1's script on a tiny Qwen3-MoE shape: the engine's own parameters equal the config's count,
    each batch's roofline reads the experts that batch's tokens choose (more at batch 4 than at 1), and
    the peer runs after weir (--peer-last) with its figures in the report."""
    from loadtest import bench_latency
    from loadtest.model_shapes import SHAPES, active_parameters

    out = tmp_path / "l1.json"
    argv = [
        "--shape",
        "tiny-qwen3-moe",
        "--device",
        "cpu",
        "--num-kv-blocks",
        "64",
        "--copy-bytes",
        str(1 << 20),
    ]
    argv += ["--batch-sizes", "1,4", "--input-len", "8", "--output-len", "4", "--num-iters", "1"]
    argv += [
        "--num-iters-warmup",
        "0",
        "--peer",
        "hf",
        "--peer-max-steps",
        "2",
        "--peer-last",
        "--out",
        str(out),
    ]
    assert bench_latency.main(argv) == 0
    data = json.loads(out.read_text())
    assert data["status"] == "ok" and data["errors"] == []
    assert data["results"]["engine_weight_bytes"] == data["model"]["weight_bytes"]
    cfg = SHAPES["tiny-qwen3-moe"]
    assert data["roofline"]["weight_bytes"] == round(4 * active_parameters(cfg, 1))
    r1, r4 = data["results"]["batch_1"]["roofline_ms"], data["results"]["batch_4"]["roofline_ms"]
    ratio = active_parameters(cfg, 4) / active_parameters(cfg, 1)
    assert r4 > r1 and abs(r4 / r1 - ratio) < 0.01, (r1, r4, ratio)
    assert data["peer"]["batch_4"]["itl_p50_ms"] > 0


def test_device_call_new_steps_are_wired() -> None:
    """Each new STEPS name has its own case in loadtest/device_call.sh (not the eval fallback), is in the
    header, and its benchmark command line parses with the script's own parser."""
    import re
    import shlex

    from loadtest import bench_latency, bench_throughput

    text = (ROOT / "loadtest" / "device_call.sh").read_text()
    header = "\n".join(line for line in text.splitlines() if line.startswith("#"))
    for name in ("famk", "moek", "fam", "moet2", "moel1"):
        assert re.search(rf"^  {name}\) ", text, re.M), name
        assert f"{name}:" in header, name
    parsers = {"moet2": bench_throughput.build_parser(), "moel1": bench_latency.build_parser()}
    for name, parser in parsers.items():
        line = re.search(rf"^  {name}\) step {name} \d+ python3 \S+ (.*);;$", text, re.M)
        assert line, name
        args = re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", line.group(1)).replace("$O/", "/tmp/")
        parsed = parser.parse_args(shlex.split(args))
        assert parsed.shape == "qwen3-30b-a3b" and parsed.peer == "hf" and parsed.peer_last
    assert re.search(r"gpu_kernel_check\.py moe;;", text) and re.search(
        r"gpu_kernel_check\.py families;;", text
    )


def test_moe_throughput_with_the_peer_last(tmp_path: Path) -> None:
    """moet2's script on a tiny Qwen3-MoE shape with --peer-last: weir's figure first, then the peer's, and
    the ratio between them."""
    from loadtest import bench_throughput

    out = tmp_path / "t2.json"
    argv = ["--workload", "t2", "--shape", "tiny-qwen3-moe", "--device", "cpu", "--num-kv-blocks", "64"]
    argv += ["--copy-bytes", str(1 << 20), "--num-requests", "3", "--input-len", "8", "--output-len", "3"]
    argv += [
        "--warmup-requests",
        "1",
        "--peer",
        "hf",
        "--peer-max-requests",
        "2",
        "--peer-last",
        "--out",
        str(out),
    ]
    assert bench_throughput.main(argv) == 0
    data = json.loads(out.read_text())
    assert data["status"] == "ok" and data["results"]["output_tokens"] == 9
    assert data["peer"]["requests_run"] == 2 and data["ratios"]["output_tok_s_vs_peer"] > 0


def test_diagnose_divergence_on_cpu(tmp_path: Path) -> None:
    """diagnose_divergence.py (device_call.sh's diag step) on the CPU (the Triton kernels under the
    interpreter where this process has set TRITON_INTERPRET: ~20-40 s a setting there, so one op swapped
    back, attention, not all ten; the loop over ops is the same code for each): every setting gives
    transformers' tokens and log p within the parity tests' 1e-4;
    with --layers every module's output (3 layers: attention, MLP, the stream), alone and in the batch,
    within 1e-4 of transformers'."""
    out = tmp_path / "diag.json"
    _run_env(
        [
            "loadtest/diagnose_divergence.py",
            "--family",
            "gemma2",
            "--device",
            "cpu",
            "--layers",
            "--ops",
            "attention",
            "--out",
            str(out),
        ],
        {},
    )
    rows = json.loads(out.read_text())["rows"]
    layer_rows = [r for r in rows if "module" in r]
    rows = [r for r in rows if "setting" in r]
    assert [r["setting"] for r in rows[:2]] == ["engine, as built", "engine, every op on torch"]
    assert [r["setting"] for r in rows[2:]] == ["engine, attention on torch"]
    assert all(r["first_divergence"] == [] and r["max_abs_logprob_diff"] < 1e-4 for r in rows), rows
    assert len(layer_rows) == 2 * 3 * 3  # (alone, in the batch) x 3 layers x (attn, mlp, stream)
    assert all(r["max_abs_diff"] < 1e-4 and r["first_position_over_1e-4"] is None for r in layer_rows), (
        layer_rows
    )


def test_probe_fp8_gemm_smoke(tmp_path: Path) -> None:
    """loadtest/probe_fp8_gemm.py (device_call's fp8mm) on CPU: every variant ran and timed, the FP8
    ones within FP8's error of the unquantized product, bf16 within bf16's."""
    out = tmp_path / "fp8_gemm.json"
    _run(["loadtest/probe_fp8_gemm.py", "--smoke", "--out", str(out)])
    row = json.loads(out.read_text())["results"]["tiny m=16"]
    assert row["bf16"]["rel_err"] < 0.01, row
    for name in ("rowwise", "rowwise_fast", "tensorwise", "tensorwise_fast"):
        assert row[name]["ms"] > 0 and 0 < row[name]["rel_err"] < 0.1, (name, row)
    text = (ROOT / "loadtest" / "device_call.sh").read_text()
    assert "probe_fp8_gemm.py" in text and "fp8mm:" in text


def test_back_to_back_ms_times_the_calls_after_the_warm_up() -> None:
    """loadtest/gpu_timing.back_to_back_ms (the probe's, K1's graph replay and the engine check's forward
    timings): `warmup` calls, then `reps` samples of `calls` calls, the median sample's mean per call."""
    import time

    from loadtest.gpu_timing import back_to_back_ms

    calls = []

    def fn() -> None:
        calls.append(1)
        time.sleep(0.002)

    ms = back_to_back_ms(fn, "cpu", calls=3, reps=2, warmup=4)
    assert len(calls) == 4 + 3 * 2
    assert 2.0 <= ms < 50.0  # each call sleeps 2 ms


def test_probe_carveout_says_it_needs_a_gpu_and_is_a_device_step(tmp_path: Path) -> None:
    """loadtest/probe_carveout.py (device_call's prb0 / prb1) times CUDA graphs after driver-API calls:
    on CPU it exits 1 with that reason in its report, and device_call.sh runs it."""
    out = tmp_path / "carveout.json"
    run = subprocess.run(
        [sys.executable, "loadtest/probe_carveout.py", "--shape", "llama3-8b", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode == 1, run.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["status"] == "error"
    assert report["errors"] == ["probe: RuntimeError: needs a CUDA GPU (CUDA graphs, the driver API)"]
    text = (ROOT / "loadtest" / "device_call.sh").read_text()
    assert "probe_carveout.py" in text and "prb0*|prb1*)" in text


def test_this_sessions_device_steps_parse() -> None:
    """device_call.sh's q12b8 / q12moe8 (bench_quant at L1's batch 8) and peer4
    (loadtest/peer_w4_gemv.py, Q5's peer): each has its case and header line, and its command line parses
    with the script's own parser (peer4's --variants as the JSON list the script reads)."""
    import re
    import shlex

    from loadtest import bench_quant, peer_w4_gemv

    text = (ROOT / "loadtest" / "device_call.sh").read_text()
    header = "\n".join(line for line in text.splitlines() if line.startswith("#"))
    for name in ("q12b8", "q12moe8", "peer4"):
        assert re.search(rf"^  {name}\) ", text, re.M), name
        assert name in header, name
    for name in ("q12b8", "q12moe8"):
        line = re.search(rf"^  {name}\) step {name} \d+ python3 \S+ (.*);;$", text, re.M)
        assert line, name
        args = re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", line.group(1)).replace("$O/", "/tmp/")
        parsed = bench_quant.build_parser().parse_args(shlex.split(args))
        assert parsed.l1_batch == 8 and parsed.q1_methods == "gptq", name
    line = re.search(r"^  peer4\) step peer4 \S+ python3 \S+ (.*);;$", text, re.M)
    assert line
    variants = '[{"block_n":64,"block_k":128,"split_k":4,"num_warps":4,"ahead":2}]'
    args = line.group(1).replace('${P4V:+--variants "$P4V"}', f"--variants '{variants}'")
    args = re.sub(r"\$\{\w+:?-([^}]*)\}", r"\1", args).replace("$O/", "/tmp/")
    parsed = peer_w4_gemv.build_parser().parse_args(shlex.split(args))
    assert (
        parsed.batches == "1"
        and parsed.max_registers == "96,80"
        and json.loads(parsed.variants)[0]["split_k"] == 4
    )


def test_stall_summary_sums_reasons_over_source_lines() -> None:
    """loadtest/probe_gemv_stalls.summarize (device step `stalls`): a proton PC-sampling tree's leaves are
    source lines; their stall counts add up into shares (the count of stalled samples is not a reason, but
    gives the stalled share), and the lines come out by samples, top reasons first. find_scope picks one
    case's scope out of the run's one session (its warm-up scope apart)."""
    from loadtest.probe_gemv_stalls import find_scope, summarize

    def leaf(name: str, samples: int, stalled: int, **stalls: int) -> dict:
        metrics = {"num_samples": samples, "num_stalled_samples": stalled, **stalls}
        return {"frame": {"name": name}, "metrics": metrics}

    def scope(name: str, *leaves: dict) -> dict:
        kernel = {"frame": {"name": "_w4_kernel"}, "metrics": {}, "children": list(leaves)}
        return {"frame": {"name": name}, "metrics": {}, "children": [kernel]}

    tree = [
        {
            "frame": {"name": "ROOT"},
            "metrics": {"num_samples": 14},
            "children": [
                scope("w4_qkv_warmup", leaf("w4.py:120", 4, 4, stall_wait=4)),
                scope(
                    "w4_qkv",
                    leaf("w4.py:120", 3, 3, stall_wait=1, stall_long_scoreboard=2),
                    leaf("w4.py:140", 7, 5, stall_long_scoreboard=4, stall_barrier=1),
                ),
            ],
        }
    ]
    got = summarize(find_scope(tree, "w4_qkv"))
    assert got["leaves"] == 2
    assert got["stalls"] == {"stall_long_scoreboard": 0.75, "stall_wait": 0.125, "stall_barrier": 0.125}
    assert got["stalled"] == 0.8
    assert [r["where"] for r in got["top_lines"]] == [
        "w4_qkv / _w4_kernel / w4.py:140",
        "w4_qkv / _w4_kernel / w4.py:120",
    ]
    assert find_scope(tree, "w4_gate_up") is None
    assert got["top_lines"][0]["top_stalls"] == [("stall_long_scoreboard", 4.0), ("stall_barrier", 1.0)]
    text = (ROOT / "loadtest" / "device_call.sh").read_text()
    assert "probe_gemv_stalls.py" in text
