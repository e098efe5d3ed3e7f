"""CPU smoke test of the benchmark scripts in loadtest/: each runs end to end on the tiny model with tiny
sizes, including the transformers peer (--peer hf), and writes a valid JSON report the summary can read.
The same scripts run at real shapes on the GPU (loadtest/run_gpu_suite.sh)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from engine.startup_phases import PHASES as STARTUP_PHASES
from loadtest import (
    bench_latency,
    bench_prefix,
    bench_serving,
    bench_startup,
    bench_throughput,
    profile_kernels,
)
from loadtest.common import (
    REPO_ROOT,
    Report,
    percentile,
    random_workload,
    resolve_model,
    step_loop_delta,
)
from loadtest.model_shapes import SHAPES, num_parameters, shape_dir
from loadtest.summary import summary_table

# Small everything: a KV cache of 4k tokens, short prompts and outputs.
ENGINE = ["--device", "cpu", "--num-kv-blocks", "256", "--copy-bytes", str(1 << 20), "--seed", "0"]


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread() -> Iterator[None]:
    """One intra-op thread here and in the servers these tests start: client, server and peer share two
    cores, and oversubscribed spinning threads make tiny CPU forwards ten times slower."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OMP_NUM_THREADS", "1")
        yield
    torch.set_num_threads(before)


def load_report(path: Path, benchmark: str) -> dict:
    data = json.loads(path.read_text())  # strict JSON: write_json refuses NaN
    assert data["benchmark"] == benchmark
    assert data["status"] == "ok", data["errors"]
    assert data["errors"] == []
    assert data["card"].startswith("cpu") and data["device"] == "cpu"
    assert data["date"] and "commit" in data
    assert data["copy_bandwidth"]["GB_s"] > 0
    assert data["results"]
    return data


def record_step_loop(monkeypatch: pytest.MonkeyPatch, module: object) -> list[dict[str, float]]:
    """The unrounded step-phase deltas behind each `step_loop_s` that `module` reports. The JSON rounds
    to 0.1 ms, and on CPU a whole run's device_wait (reading the sampled ids back) can be less."""
    raw: list[dict[str, float]] = []

    def spy(before: dict[str, float] | None, after: dict[str, float] | None) -> dict | None:
        if before and after:
            raw.append({k: after[k] - before.get(k, 0.0) for k in after})
        return step_loop_delta(before, after)

    monkeypatch.setattr(module, "step_loop_delta", spy)
    return raw


def assert_reports_phases(loop: dict, raw: dict[str, float]) -> None:
    """Every phase the engine counted is in the report, rounded as documented."""
    assert set(loop) - {"shares"} == set(raw)
    for k, v in raw.items():
        assert loop[k] == round(v, 4), k


def assert_in_summary(directory: Path, benchmark: str) -> None:
    table = summary_table(directory)
    assert any(line.startswith(f"{benchmark} ") for line in table.splitlines()), table


def test_throughput_t1_with_peer(tiny_llama_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "t1.json"
    argv = ["--workload", "t1", "--model", str(tiny_llama_dir), *ENGINE]
    argv += ["--num-requests", "6", "--input-len", "8:40", "--output-len", "4:12", "--warmup-requests", "2"]
    argv += ["--peer", "hf", "--peer-batch-size", "4", "--peer-max-steps", "3", "--out", str(out)]
    argv += ["--host-profile", "5"]
    assert bench_throughput.main(argv) == 0
    data = load_report(out, "T1")
    res, peer = data["results"], data["peer"]
    assert res["num_requests"] == 6 and res["failed_requests"] == 0
    assert res["output_tokens"] == res["expected_output_tokens"]  # ignore_eos honoured
    assert res["output_tok_s"] > 0 and res["req_s"] > 0
    # Two static batches (4 + 2), step-capped: the peer's time is extrapolated and says so.
    assert peer["batch_size"] == 4 and peer["requests_run"] == 6 and peer["extrapolated"] is True
    assert peer["output_tokens"] == res["expected_output_tokens"] and peer["output_tok_s"] > 0
    assert data["ratios"]["output_tok_s_vs_peer"] > 0
    assert data["workload"]["input_len"] == [8, 40]
    # --host-profile: the workload once more under cProfile, its top functions (the timed run unprofiled).
    prof = data["host_profile"]
    assert len(prof["by_own_time"]) == len(prof["by_cumulative_time"]) == 5
    assert prof["step_loop_s"]["steps"] == res["step_loop_s"]["steps"]  # the same workload again
    functions = [row["function"] for row in prof["by_cumulative_time"]]
    # LLM.generate and its loop lead by cumulative time.
    assert "engine/llm.py" in " ".join(functions), functions
    assert_in_summary(tmp_path, "T1")


def test_throughput_t2_dummy_shape(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The --shape path: dummy weights at a real vocabulary (128256), folder built by model_shapes."""
    out = tmp_path / "t2.json"
    raw_loops = record_step_loop(monkeypatch, bench_throughput)
    argv = ["--workload", "t2", "--shape", "tiny-llama3", *ENGINE, "--num-requests", "4", "--input-len", "24"]
    argv += ["--output-len", "6", "--warmup-requests", "1", "--peer", "hf", "--peer-max-requests", "2"]
    assert bench_throughput.main([*argv, "--out", str(out)]) == 0
    data = load_report(out, "T2")
    assert data["model"]["load_format"] == "dummy" and data["model"]["vocab_size"] == 128256
    assert data["engine_kwargs"]["max_model_len"] == 256  # the workload's longest sequence, rounded up
    assert data["results"]["output_tokens"] == 24 and data["results"]["total_tok_s"] > 0
    loop = data["results"]["step_loop_s"]  # the offline engine's step phases during the run
    raw = raw_loops[-1]  # [warm-up, run]
    assert_reports_phases(loop, raw)
    # One step prefills all four 24-token prompts (within the 512-token CPU budget), five decode.
    assert raw["steps"] == 6
    assert raw["schedule"] > 0 and raw["launch"] > 0 and raw["device_wait"] > 0 and raw["update"] > 0
    assert raw["idle"] == raw["loop_delay"] == 0  # server-loop phases: the offline engine has none
    # The phases are disjoint parts of the run: together no longer than its wall time.
    assert sum(v for k, v in raw.items() if k != "steps") <= data["results"]["elapsed_s"] + 1e-4
    assert data["peer"]["requests_run"] == 2 and data["peer"]["requests_total"] == 4
    assert any("peer extrapolated" in n for n in data["notes"])
    assert_in_summary(tmp_path, "T2")


@pytest.mark.parametrize(
    "script", ["bench_latency", "bench_throughput", "bench_serving", "bench_prefix", "bench_startup"]
)
def test_scripts_run_from_any_directory(script: str, tmp_path: Path) -> None:
    """`python loadtest/<script>.py` finds the repository's packages wherever it is started from."""
    cmd = [sys.executable, str(REPO_ROOT / "loadtest" / f"{script}.py"), "--help"]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "--peer" in proc.stdout and "--shape" in proc.stdout and "--out" in proc.stdout


def test_latency_with_peer(tiny_llama_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "l1.json"
    raw_loops = record_step_loop(monkeypatch, bench_latency)
    argv = ["--model", str(tiny_llama_dir), *ENGINE, "--batch-sizes", "1,3", "--input-len", "8"]
    argv += ["--output-len", "6", "--num-iters", "2", "--num-iters-warmup", "1", "--peer", "hf"]
    argv += ["--out", str(out)]
    assert bench_latency.main(argv) == 0
    data = load_report(out, "L1")
    for bs, raw in zip((1, 3), raw_loops, strict=True):
        # The measured iterations' step phases (not the warm-up's): each of the two, one prefill step
        # (its first token) and five decode steps.
        assert_reports_phases(data["results"][f"batch_{bs}"]["step_loop_s"], raw)
        assert raw["steps"] == 12 and raw["device_wait"] > 0 and raw["launch"] > 0
        ours, peer = data["results"][f"batch_{bs}"], data["peer"][f"batch_{bs}"]
        assert ours["output_tokens"] == bs * 6 and "warning" not in ours
        assert ours["itl_p50_ms"] > 0 and ours["tok_s"] > 0
        assert 0 < ours["roofline_fraction"]
        assert peer["itl_p50_ms"] > 0 and peer["extrapolated"] is False
        assert data["ratios"][f"batch_{bs}_tok_s_vs_peer"] > 0
    assert data["roofline"]["weight_bytes"] == data["model"]["weight_bytes"]
    # The config's parameter count matches the engine's own parameters.
    assert data["results"]["engine_weight_bytes"] == data["model"]["weight_bytes"]
    assert_in_summary(tmp_path, "L1")


def test_prefix_on_off_with_peer(tiny_llama_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "p1.json"
    argv = ["--model", str(tiny_llama_dir), *ENGINE, "--num-requests", "6", "--prefix-len", "48"]
    argv += ["--suffix-len", "8", "--output-len", "4", "--warmup-requests", "2", "--single-iters", "1"]
    argv += ["--peer", "hf", "--peer-max-requests", "3", "--out", str(out)]
    assert bench_prefix.main(argv) == 0
    data = load_report(out, "P1")
    on, off = data["results"]["on"], data["results"]["off"]
    assert data["isolation"] == "none"
    assert on["enable_prefix_caching"] is True and off["enable_prefix_caching"] is False
    # All six share a 48-token prefix (3 blocks of 16); the first computes it, the other five reuse it.
    assert on["requests_with_cache_hit"] == 5 and on["cached_tokens_mean"] == 5 * 48 / 6
    assert off["requests_with_cache_hit"] == 0 and off["cached_tokens_mean"] == 0
    assert on["output_tokens"] == off["output_tokens"] == 24
    assert on["ttft_p50_ms"] > 0 and off["ttft_p50_ms"] > 0
    assert data["results"]["ttft_p50_speedup"] > 0
    # Where the queued TTFT goes: the run's steps (1 + 4 output tokens each: at least 5) and when first
    # tokens fell, from the run's start: after the last request arrived, before the run ended.
    for r in (on, off):
        assert r["steps"] >= 5 and len(r["first_steps_ms"]) == min(12, r["steps"])
        assert all(ms > 0 for ms in r["first_steps_ms"])
        # Each of those trips split into its phases, within the trip's time; the first trip launched
        # the first step (on the CPU the launch runs it) and had no step before it to wait for.
        phases = r["first_trip_phases_ms"]
        assert len(phases) == len(r["first_steps_ms"])
        for trip, ms in zip(phases, r["first_steps_ms"], strict=True):
            assert set(trip) == {"schedule", "launch", "device_wait", "update"}
            assert min(trip.values()) >= 0 and sum(trip.values()) <= ms
        assert phases[0]["launch"] > 0 and phases[0]["device_wait"] == phases[0]["update"] == 0
        first = r["first_token_after_start"]
        assert 0 <= r["last_arrival_after_start_ms"] <= first["at_p50_ms"] <= r["elapsed_s"] * 1000
    assert data["peer"]["requests_run"] == 3
    assert_in_summary(tmp_path, "P1")


def test_serving_against_weir_serve(
    tiny_llama_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Starts `weir serve` on loopback, measures the offline figure here, streams at two rates."""
    out = tmp_path / "s1.json"
    raw_loops = record_step_loop(monkeypatch, bench_serving)
    argv = ["--model", str(tiny_llama_dir), *ENGINE, "--num-requests", "6", "--input-len", "8:24"]
    argv += ["--output-len", "5", "--request-rates", "inf,50", "--num-requests-finite-rate", "3"]
    argv += ["--warmup-requests", "1", "--server-log", str(tmp_path / "server.log"), "--out", str(out)]
    assert bench_serving.main(argv) == 0
    data = load_report(out, "S1")
    inf, finite = data["results"]["rate_inf"], data["results"]["rate_50"]
    assert inf["completed"] == 6 and inf["failed"] == 0 and inf["output_tokens"] == 30
    assert finite["completed"] == 3 and finite["failed"] == 0
    for r in (inf, finite):
        assert r["ttft_p50_ms"] > 0 and r["ttft_p99_ms"] >= r["ttft_p50_ms"]
        assert r["itl_p50_ms"] is not None and r["output_tok_s"] > 0
    loop = inf["step_loop_s"]  # the server's step-loop phases during the rate (from /metrics)
    raw = raw_loops[0]  # [rate inf, rate 50]
    assert_reports_phases(loop, raw)
    # Five tokens each for six requests: at least five steps, at most one per request per token.
    assert 5 <= raw["steps"] <= 30
    assert raw["schedule"] > 0 and raw["launch"] > 0 and raw["device_wait"] > 0 and raw["update"] > 0
    # Busy phases are disjoint and fall inside the rate's wall time (idle is booked when work arrives,
    # so it includes the wait before this rate began).
    busy = sum(v for k, v in raw.items() if k not in ("steps", "idle"))
    assert busy <= inf["duration_s"] + 0.01
    assert abs(sum(loop["shares"].values()) - 1.0) < 1e-3
    assert data["offline"]["source"] == "measured in this run"
    assert data["results"]["serving_offline_ratio"] > 0
    assert data["results"]["server_exit_code"] == 0  # SIGTERM drains and exits cleanly
    assert_in_summary(tmp_path, "S1")

    # The offline figure can come from T2's report instead (as in the GPU suite).
    t2 = tmp_path / "t2.json"
    t2.write_text(
        json.dumps({"benchmark": "T2", "results": {"output_tok_s": 10.0}, "peer": {"output_tok_s": 1.0}})
    )
    args = bench_serving.build_parser().parse_args([*argv, "--offline-json", str(t2), "--peer", "hf"])
    args._default_shape = None
    report = Report("S1", args, None)
    model = resolve_model(args)
    bench_serving.offline_figure(report, args, model, random_workload(6, (8, 24), (5, 5)), None)
    assert report["offline"]["output_tok_s"] == 10.0 and report["offline"]["source"] == str(t2)
    assert report["peer"]["output_tok_s"] == 1.0  # T2's peer is reused, not rerun
    assert any("differs" in n for n in report["notes"])  # the fake report has no workload description


def test_startup_with_peer(tiny_llama_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "u1.json"
    argv = ["--model", str(tiny_llama_dir), *ENGINE, "--prompt-len", "8", "--output-len", "4", "--no-imports"]
    argv += ["--peer", "hf", "--server-log", str(tmp_path / "server.log"), "--out", str(out)]
    assert bench_startup.main(argv) == 0
    data = load_report(out, "U1")
    res = data["results"]
    assert 0 < res["seconds_to_health"] <= res["seconds_to_first_request"]
    assert res["server_exit_code"] == 0
    # The server's own start-up phases, from its log line: every phase, and the server was listening
    # before /health could answer (give or take the 10 ms ticks of the process's start time).
    phases = res["startup_phases"]
    assert list(phases) == ["total_s", *(f"{name}_s" for name in STARTUP_PHASES), "other_s"]
    assert all(v >= 0 for v in phases.values())
    assert 0 < phases["total_s"] <= res["seconds_to_health"] + 0.02
    assert res["tokenizer_loader"] == "tokenizers"  # the tiny llama's tokenizer, read without transformers
    split = res["in_process"]
    load_s = split["timed_methods_s"]["ModelRunner.load_model"]  # building the model, reading its file
    assert load_s > 0 and split["split_s"]["weights"] == pytest.approx(load_s, abs=1e-3)
    assert split["split_s"]["cuda_graphs"] == 0.0  # none on CPU
    assert sum(split["split_s"].values()) == pytest.approx(split["engine_build_s"], abs=0.01)
    assert data["peer"]["seconds_to_first_request"] > 0
    assert_in_summary(tmp_path, "U1")


@pytest.mark.parametrize("shape", ["llama3-8b", "qwen3-0.6b"])
def test_model_shapes(shape: str, tmp_path: Path) -> None:
    """Real vocabularies and parameter counts (8.03B, 0.60B), readable by transformers and the engine."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from engine.model_config import ModelConfig

    path = shape_dir(shape, root=tmp_path)
    config = AutoConfig.from_pretrained(path)
    assert config.vocab_size == SHAPES[shape]["vocab_size"]
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    assert sum(p.numel() for p in model.parameters()) == num_parameters(SHAPES[shape])
    assert num_parameters(SHAPES[shape]) == {"llama3-8b": 8_030_261_248, "qwen3-0.6b": 596_049_920}[shape]
    mc = ModelConfig.from_pretrained(path, max_model_len=2048, device="cpu")
    assert mc.vocab_size == config.vocab_size and mc.qk_norm == (shape == "qwen3-0.6b")
    tok = AutoTokenizer.from_pretrained(path)
    assert len(tok) == config.vocab_size
    assert tok.decode([5, config.vocab_size - 1]) == f"t5 t{config.vocab_size - 1}"
    assert shape_dir(shape, root=tmp_path) == path  # cached


def test_workload_and_percentile() -> None:
    a = random_workload(256, (100, 1024), (100, 1024), seed=0)
    b = random_workload(256, (100, 1024), (100, 1024), seed=0)
    assert a.prompts == b.prompts and a.output_lens == b.output_lens  # seed 0: the same T1 every time
    assert all(100 <= len(p) <= 1024 for p in a.prompts) and all(100 <= o <= 1024 for o in a.output_lens)
    assert all(0 <= t < 10000 for p in a.prompts for t in p)
    assert percentile([], 50) is None
    assert percentile([3.0, 1.0, 2.0, 4.0], 50) == 2.5
    assert percentile([1.0, 2.0], 99) == pytest.approx(1.99)
    assert math.isclose(percentile(list(range(101)), 90), 90.0)


def test_bench_sse_sends_weir_bytes_in_every_variant(tmp_path: Path) -> None:
    """bench_sse checks that every variant puts weir's exact frames on the wire before timing them."""
    from loadtest import bench_sse

    out = tmp_path / "sse.json"
    assert bench_sse.main(["--events", "3,20", "--rounds", "2", "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["benchmark"] == "sse" and data["card"].startswith("cpu")
    assert data["variants"] == bench_sse.available_variants()
    assert data["variants"][:2] == ["weir_sse", "starlette_streaming"]
    for n in (3, 20):
        res = data["results"][f"events_{n}"]
        assert list(res) == data["variants"]
        assert res["weir_sse"]["cpu_vs_weir_sse"] == 1.0
        for r in res.values():
            assert r["cpu_us_per_response_median"] == pytest.approx(
                r["cpu_us_per_event_median"] * n, rel=1e-3
            )


@pytest.mark.parametrize("extra", [[], ["--sync", "--final-only"]])
def test_bench_host_reports_every_phase(tmp_path: Path, extra: list[str]) -> None:
    from loadtest import bench_host

    out = tmp_path / "host.json"
    assert bench_host.main(["--batch-size", "4", "--steps", "3", "--out", str(out), *extra]) == 0
    data = json.loads(out.read_text())
    assert data["benchmark"] == "host" and data["args"]["batch_size"] == 4
    assert data["step_ms"] > data["host_ms_per_step"] > 0
    for phase in ("schedule", "update (engine)", "runner input building", "sampling metadata", "forward"):
        assert data["phases"][phase]["ms_per_step"] > 0, phase
    # final_only: no per-step outputs are built while the requests run
    made_outputs = data["phases"]["  of which outputs"]["ms_per_step"]
    assert (made_outputs == 0) if "--final-only" in extra else (made_outputs > 0)


def test_kernel_profile(tiny_llama_dir: Path, tmp_path: Path) -> None:
    """profile_kernels: a prefill window at the chunk budget, then a decode window at the full batch."""
    out = tmp_path / "profile.json"
    argv = ["--model", str(tiny_llama_dir), *ENGINE, "--num-requests", "4", "--input-len", "24"]
    argv += ["--output-len", "12", "--max-num-batched-tokens", "32", "--prefill-steps", "2"]
    argv += ["--decode-steps", "3", "--out", str(out)]
    assert profile_kernels.main(argv) == 0
    data = load_report(out, "K")
    prefill, decode = data["results"]["prefill"], data["results"]["decode"]
    assert prefill["tokens_per_step"] == 32  # full chunks of the 32-token budget
    assert decode["tokens_per_step"] == 4 and decode["batch"] == 4  # one token per request
    assert 24 <= decode["mean_context_tokens"] <= 36
    for w in (prefill, decode):
        assert w["steps"] > 0 and w["wall_ms_per_step"] > 0 and w["kernel_ms_per_step"] > 0
        assert w["family_ms_per_step"].get("matmul", 0) > 0, w["family_ms_per_step"]
        assert w["top_kernels"]
        assert w["runtime_calls_per_step"] == []  # CUDA runtime calls and device gaps: a GPU's only
        assert "device_idle" not in w
    assert_in_summary(tmp_path, "K")


@pytest.mark.parametrize(("flag", "rows_per_request"), [("--beam-width", 2), ("--n", 3)])
def test_kernel_profile_of_beam_and_parallel_sampling_steps(
    tiny_llama_dir: Path, tmp_path: Path, flag: str, rows_per_request: int
) -> None:
    """profile_kernels --beam-width / --n: the decode window holds every beam (or sample) of each request."""
    out = tmp_path / "profile.json"
    argv = ["--model", str(tiny_llama_dir), *ENGINE, "--num-requests", "2", "--input-len", "16"]
    argv += ["--output-len", "16", "--prefill-steps", "1", "--decode-steps", "2", flag, str(rows_per_request)]
    argv += ["--out", str(out)]
    assert profile_kernels.main(argv) == 0
    data = load_report(out, "K")
    assert data["workload"][flag.lstrip("-").replace("-", "_")] == rows_per_request
    # Beam groups ranked on the device (past their first step) and sampled rows never wait for the host.
    assert data["results"]["decode"]["stalls"] == 0
    decode = data["results"]["decode"]
    assert decode["batch"] == 2 * rows_per_request
    assert decode["kernel_ms_per_step"] > 0 and decode["family_ms_per_step"].get("matmul", 0) > 0


def test_kernel_profile_of_beam_groups_admitted_apart(tiny_llama_dir: Path, tmp_path: Path) -> None:
    """Groups admitted in different steps (one prompt per step's budget here), ranked on the device,
    share every decode step of the window: both groups' beams in each, no stalls. (Ranked on the
    host they took turns, one group's step on the device while the other's results were ranked.)"""
    out = tmp_path / "profile.json"
    argv = ["--model", str(tiny_llama_dir), *ENGINE, "--num-requests", "2", "--input-len", "16"]
    argv += ["--output-len", "16", "--prefill-steps", "1", "--decode-steps", "4", "--beam-width", "2"]
    argv += ["--max-num-batched-tokens", "16", "--out", str(out)]
    assert profile_kernels.main(argv) == 0
    decode = load_report(out, "K")["results"]["decode"]
    assert decode["stalls"] == 0
    assert decode["tokens_per_step"] == 4  # both groups' two beams per step


def test_kernel_profile_of_a_multi_lora_step(tiny_llama_dir: Path, tmp_path: Path) -> None:
    """profile_kernels --lora-rank --lora-adapters (A1/A2's step): requests spread over the adapters,
    every adapter in a slot of the profiled engine."""
    out = tmp_path / "profile.json"
    argv = ["--model", str(tiny_llama_dir), *ENGINE, "--num-requests", "4", "--input-len", "16"]
    argv += ["--output-len", "12", "--prefill-steps", "1", "--decode-steps", "2"]
    argv += ["--lora-rank", "4", "--lora-adapters", "3", "--out", str(out)]
    assert profile_kernels.main(argv) == 0
    data = load_report(out, "K")
    assert data["workload"]["lora_rank"] == 4 and data["workload"]["lora_adapters"] == 3
    assert data["results"]["lora"] == {"adapters_loaded": 3, "slot_loads": 3}
    decode = data["results"]["decode"]
    assert decode["batch"] == 4 and decode["kernel_ms_per_step"] > 0


def test_every_lora_kernel_counts_in_the_lora_family() -> None:
    from loadtest.kernel_families import family_of

    for name in (
        "_lora_shrink_kernel",
        "_lora_expand_kernel",
        "_segment_shrink_kernel",
        "_segment_expand_kernel",
    ):
        assert family_of(name) == "lora", name
    assert family_of("_paged_attention_kernel") == "attention"


def test_bench_quant_t2_cases(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Q3, Q4 and Q3KV (FP8 weights and the FP8 KV cache together) on the tiny Llama-3 shape: each
    variant's T2 run records what it ran (the cache as allocated, the weights' method), and a case
    name bench_quant does not know is refused rather than skipped."""
    from loadtest import bench_quant

    monkeypatch.setenv("WEIR_FP8_KV_WIDEN", "1")
    out = tmp_path / "q.json"
    argv = [
        "--shape",
        "tiny-llama3",
        *ENGINE,
        "--cases",
        "Q3,Q4,q3kv",
        "--t2-requests",
        "2",
        "--out",
        str(out),
    ]
    assert bench_quant.main(argv) == 0
    data = load_report(out, "Q")
    ran = {k: (v["kv_cache_dtype"], v["quantization"], v["output_tokens"]) for k, v in data["results"].items()
           if k.startswith("t2_")}  # fmt: skip
    assert ran == {
        "t2_bf16": ("float32", None, 256),  # (the model's dtype on CPU)
        "t2_fp8_weights": ("float32", "fp8", 256),
        "t2_fp8_kv": ("float8_e4m3fn", None, 256),
        "t2_fp8_weights_kv": ("float8_e4m3fn", "fp8", 256),
    }
    assert data["results"]["t2_fp8_kv"]["fp8_kv_widen"] is True
    assert set(data["ratios"]) == {
        "Q3_fp8_weights_throughput_vs_bf16",
        "Q4_fp8_kv_throughput_vs_bf16",
        "Q4_kv_blocks_vs_bf16",
        "Q3_fp8_weights_kv_throughput_vs_bf16",
    }
    with pytest.raises(SystemExit) as refused:
        bench_quant.main(["--shape", "tiny-llama3", *ENGINE, "--cases", "Q3,Q7", "--out", str(out)])
    assert refused.value.code == 2


def test_profile_serving_reports_server_cpu_per_token_and_request(tmp_path: Path) -> None:
    """loadtest/profile_serving.py end to end, tiny: the real app over its fast fake engine (a FakeEngine
    subclass, held to the engine client protocol) in a child process, and a cProfile of one phase."""
    out, prof = tmp_path / "serving.json", tmp_path / "serving-profile.txt"
    n, t = 8, 32
    cmd = [sys.executable, str(REPO_ROOT / "loadtest" / "profile_serving.py"), "--concurrency", str(n)]
    cmd += ["--prompt-len", "16", "--max-tokens", str(t), "--max-num-seqs", "4", "--max-model-len", "256"]
    cmd += ["--repeats", "3", "--json", str(out), "--profile", "cprofile", "--profile-out", str(prof)]
    cmd += ["--profile-max-tokens", "4"]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(out.read_text())
    assert json.loads(proc.stdout[: proc.stdout.rindex("}") + 1]) == data  # printed as written
    assert (data["concurrency"], data["max_tokens"]) == (n, t)
    for key in ("per_request_us", "per_token_us", "per_token_all_in_us", "engine_cpu_per_token_us"):
        assert data[key] > 0, key
    assert data["stream_wall_s"] > 0 and data["stream_tok_s"] > 0
    for phase, max_tokens in (("setup", 1), ("stream", t)):
        runs = data["phases"][phase]
        assert len(runs) == 3
        for r in runs:
            # every token streamed, plus the usage chunk of each request
            assert (r["requests"], r["tokens"], r["events"]) == (n, n * max_tokens, n * (max_tokens + 1))
            assert r["app_cpu_s"] > 0 and r["engine_cpu_s"] > 0
    assert "function calls" in prof.read_text() and str(prof) in proc.stdout


def test_bench_quant_q1_on_moe_experts(tmp_path: Path) -> None:
    """Q1 with GPTQ alone (--q1-methods) on the tiny Qwen3-MoE shape at L1's batch 2 (--l1-batch): its
    experts load as W4A16 (dummy codes), both engines decode two sequences (every token counted) and the
    ratio to bf16's ITL is reported; an unknown format is refused."""
    from loadtest import bench_quant

    out = tmp_path / "q.json"
    argv = ["--shape", "tiny-qwen3-moe", *ENGINE, "--cases", "Q1", "--q1-methods", "gptq", "--group-size", "32",
            "--input-len", "4", "--output-len", "4", "--l1-batch", "2", "--out", str(out)]  # fmt: skip
    assert bench_quant.main(argv) == 0
    data = load_report(out, "Q")
    assert sorted(k for k in data["results"] if k.startswith("l1_")) == ["l1_bf16", "l1_gptq_w4a16"]
    assert data["workload"]["l1_batch"] == 2
    for label in ("l1_bf16", "l1_gptq_w4a16"):
        assert data["results"][label]["output_tokens"] == 2 * 4 and "warning" not in data["results"][label]
    assert data["ratios"]["Q1_gptq_w4a16_itl_vs_bf16"] > 0
    with pytest.raises(SystemExit):
        bench_quant.main([*argv[:-6], "--q1-methods", "exl2", "--out", str(out)])
