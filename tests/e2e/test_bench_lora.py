"""CPU smoke test of loadtest/bench_lora.py (A1-A4) on the tiny Llama: every figure present, the ratios
against the mean of the base's first and last runs, the base's drift between them, and each adapter run
actually running its adapters."""

from __future__ import annotations

import json
from pathlib import Path

from loadtest import bench_lora
from loadtest.common import ratio
from tests.e2e.test_benchmarks_smoke import ENGINE


def test_lora_benchmark_runs_the_base_twice_and_rates_against_the_mean(
    tiny_llama_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "a.json"
    argv = [
        "--model",
        str(tiny_llama_dir),
        *ENGINE,
        "--num-requests",
        "4",
        "--input-len",
        "8",
        "--output-len",
        "4",
    ]
    argv += ["--rank", "4", "--adapter-counts", "2", "--l1-input-len", "6", "--l1-output-len", "4"]
    argv += ["--l1-iters", "1", "--temperature", "0", "--adapter-dir", str(tmp_path / "adapters")]
    assert bench_lora.main([*argv, "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["benchmark"] == "A" and data["status"] == "ok" and data["errors"] == [], data["errors"]
    r = data["results"]
    first, last = r["base_t2"]["output_tok_s"], r["base_t2_last"]["output_tok_s"]
    assert r["base_t2_drift"] == ratio(last, first)
    for key in ("A1_2_adapters",):
        res = r[key]
        assert res["num_requests"] == 4 and res["output_tok_s"] > 0
        assert res["vs_base"] == ratio(res["output_tok_s"], (first + last) / 2)
        assert res["vs_base_first"] == ratio(res["output_tok_s"], first)
    l1_first, l1_last = r["base_l1"]["itl_p50_ms"], r["base_l1_last"]["itl_p50_ms"]
    assert r["A3"]["vs_base"] == ratio(r["A3"]["itl_p50_ms"], (l1_first + l1_last) / 2)
    assert r["A3"]["base_on_lora_engine"]["itl_p50_ms"] > 0
    assert r["A4"]["trials"] == 3 and r["A4"]["first_request_s"] > 0
    # the host's part of each new adapter's first request: its read, then its slot image
    assert len(r["A4"]["read_ms"]) == 3 and all(ms > 0 for ms in r["A4"]["read_ms"])
    assert len(r["A4"]["slot_write_ms"]) == 3 and all(ms > 0 for ms in r["A4"]["slot_write_ms"])
    # 2 adapters for A1 plus one per A4 trial, each a PEFT directory
    written = sorted(p.name for p in (tmp_path / "adapters").iterdir())
    assert len(written) == 2 + 3 and all(
        (tmp_path / "adapters" / n / "adapter_config.json").exists() for n in written
    )
