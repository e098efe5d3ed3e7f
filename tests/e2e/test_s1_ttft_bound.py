"""loadtest/s1_ttft_bound.py: the idealized engine's queue against queueing theory and by hand."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from loadtest import s1_ttft_bound


def test_prefills_alone_are_the_md1_queue_of_theory() -> None:
    """Decodes free and one output token: the prefills form an M/D/1 queue, whose mean time in the
    system is D + rho * D / (2 * (1 - rho)) (Pollaczek-Khinchine): 25 ms at 16 req/s, rho 0.4 ->
    33.33 ms. 20 runs of 2,000 requests land within 2% of it."""
    args = s1_ttft_bound.build_parser().parse_args(
        ["--prefill-ms", "25", "--decode-ms", "0", "--decode-ms-per-seq", "0", "--output-len", "1",
         "--requests", "2000", "--runs", "20"]
    )  # fmt: skip
    result = s1_ttft_bound.bound(args)
    rho = 16 * 0.025
    expected = 25 + rho * 25 / (2 * (1 - rho))
    assert result["ttft_mean_ms"] == pytest.approx(expected, rel=0.02)
    assert result["itl_p50_ms_over_runs"] is None  # one token: no gaps


def test_one_request_by_hand() -> None:
    """A lone request: its first token after its prefill step, then decode steps of decode_ms plus one
    sequence's share each."""
    run = s1_ttft_bound.simulate(
        22.0, 4.0, 0.5, rate=16.0, requests=1, output_len=4, prompts_per_step=1, seed=3
    )
    assert run["ttft"] == pytest.approx([22.0])
    assert run["itl"] == pytest.approx([4.5, 4.5, 4.5])


def test_two_prompts_in_one_step_end_together() -> None:
    """Three prompts a nanosecond apart: the first is alone in its step; with two prompts a step the
    other two share the next (2 x prefill: both out at 30 ms), with one a step they come out at 20
    and 30 ms. Batching prompts does not shorten the wait of the last."""
    args = dict(decode_ms=0.0, decode_ms_per_seq=0.0, rate=1e9, requests=3, output_len=1, seed=0)
    two = s1_ttft_bound.simulate(10.0, prompts_per_step=2, **args)["ttft"]
    one = s1_ttft_bound.simulate(10.0, prompts_per_step=1, **args)["ttft"]
    assert two == pytest.approx([10.0, 30.0, 30.0], abs=1e-3)
    assert one == pytest.approx([10.0, 20.0, 30.0], abs=1e-3)


def test_cli_writes_json_and_refuses_bad_values(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "bound.json"
    assert s1_ttft_bound.main(["--runs", "3", "--requests", "40", "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["params"]["rate"] == 16.0 and 0 <= data["share_of_runs_meeting_target"] <= 1
    assert set(data["ttft_p99_ms_over_runs"]) == {"p10", "median", "p90"}
    for bad in (["--rate", "0"], ["--prefill-ms", "-1"]):
        with pytest.raises(SystemExit) as refused:
            s1_ttft_bound.main(bad)
        assert refused.value.code == 2
        assert bad[0] in capsys.readouterr().err
