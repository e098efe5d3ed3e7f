"""loadtest/bench_beam.py end to end on the tiny llama (CPU): B1-B3 and the beam-search peer."""

from __future__ import annotations

import json
from pathlib import Path

from loadtest import bench_beam


def test_bench_beam_reports_b1_to_b3(tiny_llama_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "b.json"
    argv = ["--model", str(tiny_llama_dir), "--device", "cpu", "--num-kv-blocks", "256", "--seed", "0"]
    argv += ["--num-prompts", "3", "--input-len", "12", "--output-len", "6", "--beam-width", "2"]
    argv += ["--b3-prompt-len", "40", "--b3-n", "4", "--b3-output-len", "6", "--b3-iters", "1"]
    argv += ["--peer", "hf", "--peer-max-requests", "2", "--peer-max-steps", "3", "--out", str(out)]
    assert bench_beam.main(argv) == 0
    data = json.loads(out.read_text())
    assert data["benchmark"] == "B" and data["status"] == "ok" and not data["errors"]
    b1, b2, b2_seeded, b3 = (data["results"][k] for k in ("B1", "B2", "B2_seeded", "B3"))
    assert b1["output_tokens"] == b2["output_tokens"] == b2_seeded["output_tokens"] == 3 * 2 * 6
    assert (b2["seeded"], b2_seeded["seeded"]) == (False, True)
    # The three 12-token prompts fit one step's budget, so the three beam groups move together: 6
    # forward passes (one per output token). The host ranks the prompts' candidates (one trip waits
    # for them), then the device ranks the rest without waiting; the last trip only collects.
    assert (b1["step_loop"]["steps"], b1["step_loop"]["stalls"]) == (6, 2)
    # Ranked on the host, every step waits for the ranking: 6 steps, 6 stalls. Same beams' tokens.
    b1_host = data["results"]["B1_host_ranking"]
    assert (b1_host["step_loop"]["steps"], b1_host["step_loop"]["stalls"]) == (6, 6)
    assert b1_host["output_tokens"] == b1["output_tokens"]
    assert b2["step_loop"]["steps"] >= 6 and set(b2["step_loop"]["host_s"]) == {
        "schedule",
        "launch",
        "update",
    }
    # 40-token prompt (block 16): 2 full blocks once, then each of 4 children its copy of the third
    # block (it computes the last prompt token itself) and nothing more (46 tokens fit in 3 blocks).
    assert b3["kv_blocks_prompt_once_plus_children"] == 2 + 4 * 1
    assert b3["kv_blocks_peak_n4"] == b3["kv_blocks_prompt_once_plus_children"]
    assert b3["kv_blocks_without_sharing"] == 4 * 3
    assert data["peer"]["requests_run"] == 2 and data["peer"]["extrapolated"] is True
    assert set(data["ratios"]) == {
        "B1_beam_vs_peer",
        "B2_beam_vs_n_sampling",
        "B2_beam_vs_seeded_n_sampling",
        "B1_device_vs_host_ranking",
        "B3_ttft_n_over_n1",
        "B3_kv_blocks_over_prompt_once_plus_children",
    }
