"""`weir bench latency|throughput|serve` (app/bench_cli.py) on a CPU: vLLM's flag names reach the loadtest/
scripts, the embedded default model is the default, and `bench serve` measures a real `weir serve` on
loopback as a client only. Also the transformers continuous-batching peer (--peer hf,hf-cb)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from app.bench_cli import serve_argv
from app.cli import build_parser
from app.cli import main as weir_main
from app.config import default_model_dir
from loadtest import bench_throughput
from loadtest.server_process import ServerProcess
from loadtest.summary import (
    _fmt,
    summary_table,
)

SMALL = ["--device", "cpu", "--num-kv-blocks", "64", "--copy-bytes", str(1 << 20)]


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread() -> Iterator[None]:
    """Client, server and peers share two cores: one intra-op thread each (as the benchmark smoke tests)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OMP_NUM_THREADS", "1")
        yield
    torch.set_num_threads(before)


def test_bench_help_lists_the_subcommands(capsys: pytest.CaptureFixture[str]) -> None:
    assert "bench" in build_parser().format_help()
    assert weir_main(["bench", "--help"]) == 0
    out = capsys.readouterr().out
    for name in ("latency", "throughput", "serve"):
        assert f"    {name}  " in out, out
    with pytest.raises(SystemExit) as exc:
        weir_main(["bench", "latency", "--help"])
    assert exc.value.code == 0
    help_text = capsys.readouterr().out
    assert help_text.startswith("usage: weir bench latency")
    for flag in (
        "--batch-size",
        "--input-len",
        "--output-len",
        "--num-iters",
        "--num-iters-warmup",
        "--output-json",
    ):
        assert flag in help_text, flag


def test_serve_flags_mean_what_they_mean_in_vllm() -> None:
    """--model / --served-model-name name the model in requests; the server defaults to 127.0.0.1:8000."""
    assert serve_argv(["--model", "m1", "--num-prompts", "3"]) == [
        "--num-prompts",
        "3",
        "--model-name",
        "m1",
        "--port",
        "8000",
    ]
    assert serve_argv(["--model=m1", "--served-model-name", "alias", "--base-url", "http://h:1"]) == [
        "--base-url",
        "http://h:1",
        "--model-name",
        "alias",
    ]
    assert serve_argv(["--host", "10.0.0.2"]) == ["--host", "10.0.0.2"]


def test_bench_latency_default_model(tmp_path: Path) -> None:
    out = tmp_path / "latency.json"
    argv = ["bench", "latency", *SMALL, "--batch-size", "2", "--input-len", "8", "--output-len", "4"]
    argv += ["--num-iters", "2", "--num-iters-warmup", "1", "--output-json", str(out)]
    assert weir_main(argv) == 0
    data = json.loads(out.read_text())
    assert data["status"] == "ok" and data["errors"] == []
    assert data["model"]["dir"] == default_model_dir()
    assert data["workload"]["batch_sizes"] == [2] and data["workload"]["num_iters"] == 2
    res = data["results"]["batch_2"]
    assert res["output_tokens"] == 2 * 4 and res["itl_p50_ms"] > 0 and len(res["latency_s_all"]) == 2


def test_bench_throughput_random_dataset(tmp_path: Path) -> None:
    out = tmp_path / "throughput.json"
    argv = ["bench", "throughput", *SMALL, "--dataset-name", "random", "--num-prompts", "4"]
    argv += ["--random-input-len", "16", "--random-output-len", "4", "--random-range-ratio", "0.5"]
    argv += ["--warmup-requests", "1", "--output-json", str(out)]
    assert weir_main(argv) == 0
    data = json.loads(out.read_text())
    assert data["status"] == "ok" and data["model"]["dir"] == default_model_dir()
    # vLLM's range ratio: 16 -> [8, 24] prompt tokens, 4 -> [2, 6] output tokens.
    assert data["workload"]["input_len"] == [8, 24] and data["workload"]["output_len"] == [2, 6]
    res = data["results"]
    assert res["num_requests"] == 4 and res["output_tokens"] == res["expected_output_tokens"]
    assert res["req_s"] > 0


def test_bench_serve_against_weir_serve(tmp_path: Path) -> None:
    """A client only: it streams to the server it is pointed at and names the model as told."""
    flags = ["--device", "cpu", "--num-kv-blocks", "64", "--served-model-name", "m-under-test"]
    with ServerProcess(default_model_dir(), flags, log_path=tmp_path / "server.log") as server:
        server.wait_healthy(180)
        argv = ["bench", "serve", "--port", str(server.port), "--model", "m-under-test", "--num-prompts", "4"]
        argv += ["--random-input-len", "8", "--random-output-len", "4", "--request-rate", "inf"]
        argv += ["--save-result", "--result-dir", str(tmp_path), "--result-filename", "serve.json"]
        assert weir_main(argv) == 0
        # A wrong model name is the server's 404, and the run says it failed.
        bad = ["bench", "serve", "--base-url", server.url, "--model", "nope", "--num-prompts", "2"]
        bad += ["--random-input-len", "8", "--random-output-len", "2", "--num-warmups", "0"]
        bad += ["--output-json", str(tmp_path / "bad.json")]
        assert weir_main(bad) == 1
    data = json.loads((tmp_path / "serve.json").read_text())
    assert data["status"] == "ok" and data["errors"] == [] and data["model"] is None
    assert data["target"] == {"url": server.url, "endpoint": "/v1/completions"}
    assert data["workload"]["model_name"] == "m-under-test" and data["copy_bandwidth"] is None
    res = data["results"]["rate_inf"]
    assert res["completed"] == 4 and res["failed"] == 0 and res["output_tokens"] == 16
    assert res["ttft_p50_ms"] > 0 and len(res["itl_quantiles_ms"]) == 101
    assert res["itl_quantiles_ms"] == sorted(res["itl_quantiles_ms"])
    failed = json.loads((tmp_path / "bad.json").read_text())["results"]["rate_inf"]
    assert failed["failed"] == 2 and "HTTP 404" in failed["errors_sample"][0]


def test_throughput_with_both_transformers_peers(tiny_llama_dir: Path, tmp_path: Path) -> None:
    """--peer hf,hf-cb: generate() and transformers' continuous batching on the same workload, each with its
    ratio; the CB peer reports the setting it ran (CUDA graphs asked for, but a CPU has no graph backend)."""
    out = tmp_path / "t1.json"
    argv = ["--workload", "t1", "--model", str(tiny_llama_dir), *SMALL, "--num-requests", "5"]
    argv += ["--input-len", "8:24", "--output-len", "3:7", "--warmup-requests", "1", "--peer", "hf-cb,hf"]
    argv += ["--peer-batch-size", "4", "--peer-max-steps", "3", "--hf-cb-page-size", "16"]
    argv += ["--hf-cb-num-blocks", "16", "--hf-cb-max-batch-tokens", "64", "--hf-cb-warmup-requests", "1"]
    assert bench_throughput.main([*argv, "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["status"] == "ok" and data["errors"] == []
    assert set(data["peers"]) == {"hf", "hf-cb"} and data["peer"] == data["peers"]["hf"]
    cb = data["peers"]["hf-cb"]
    assert cb["output_tokens"] == cb["expected_output_tokens"] == data["results"]["expected_output_tokens"]
    assert cb["requests_run"] == 5 and cb["extrapolated"] is False and cb["best_variant"] == "tuned"
    assert cb["output_tok_s"] > 0 and cb["itl_p50_ms"] > 0 and cb["ttft_p50_ms"] > 0
    assert cb["requests_completed"] == 5 and cb["time_limited"] is False
    # 5 requests over the run: elapsed_s is rounded to 4 decimals (a tiny run takes milliseconds), so the
    # product is off by at most req_s x half a unit of that digit
    assert abs(cb["req_s"] * cb["elapsed_s"] - 5) <= cb["req_s"] * 0.00005 + 0.01
    setting = cb["setting"]
    assert setting["requested"]["use_cuda_graph"] is True and "use_async_batching" not in setting["requested"]
    resolved = setting["resolved"]
    assert resolved["num_blocks"] == 16 and resolved["max_batch_tokens"] == 64 and resolved["page_size"] == 16
    assert resolved["use_cuda_graph"] == [False, False]
    assert setting["attn_implementation"] in ("sdpa", "paged|sdpa")
    assert data["ratios"]["output_tok_s_vs_hf_cb"] > 0 and data["ratios"]["output_tok_s_vs_hf"] > 0
    row = next(line for line in summary_table(tmp_path).splitlines() if "vs HF CB" in line)
    assert row.split()[-3:-1] == [_fmt(data["results"]["output_tok_s"]), _fmt(cb["output_tok_s"])], row


def test_hf_cb_time_limit_with_nothing_finished_is_a_peer_error_naming_it(
    tiny_llama_dir: Path, tmp_path: Path
) -> None:
    """--hf-cb-time-limit: a run that finishes no request within it fails the peer's phase (weir's own
    figures still stand) with how many of how many were done, instead of hanging the suite."""
    out = tmp_path / "t1.json"
    argv = ["--workload", "t1", "--model", str(tiny_llama_dir), *SMALL, "--num-requests", "3"]
    argv += ["--input-len", "8:24", "--output-len", "3:7", "--warmup-requests", "1", "--peer", "hf-cb"]
    argv += ["--hf-cb-page-size", "16", "--hf-cb-num-blocks", "16", "--hf-cb-max-batch-tokens", "64"]
    argv += ["--hf-cb-warmup-requests", "0", "--hf-cb-time-limit", "0"]
    bench_throughput.main([*argv, "--out", str(out)])
    data = json.loads(out.read_text())
    assert data["results"]["output_tok_s"] > 0  # weir's run is unaffected
    assert "hf-cb" not in (data.get("peers") or {})
    assert any("0/3 requests done after 0s" in e for e in data["errors"]), data["errors"]


def test_peer_flag_rejects_unknown_peers(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        bench_throughput.build_parser().parse_args(["--peer", "hf,vllm"])
    assert "expected none or a comma list of hf, hf-cb; got 'hf,vllm'" in capsys.readouterr().err


class _ScriptedCBManager:
    """A stand-in for transformers' ContinuousBatchingManager: results come from a script, then none."""

    def __init__(self, script: list[tuple[str, int, bool]], streaming_kwarg: bool) -> None:
        self.script = list(script)  # (request id, tokens so far, finished)
        self.streaming_requested: list[bool] = []
        if not streaming_kwarg:  # an older library: add_request takes no `streaming`
            self.add_request = self._add_request_without_streaming  # type: ignore[method-assign]

    def add_request(
        self, prompt, request_id, max_new_tokens, record_timestamps=False, eos_token_id=None, streaming=False
    ):  # noqa: ANN001, ANN201, E501
        self.streaming_requested.append(streaming)
        return request_id

    def _add_request_without_streaming(self, prompt, request_id, max_new_tokens, eos_token_id=None):  # noqa: ANN001, ANN202
        return request_id

    def get_result(self, timeout: float):  # noqa: ANN201
        import time
        from types import SimpleNamespace

        if not self.script:
            time.sleep(timeout)  # nothing more comes: the caller's deadline passes
            return None
        rid, tokens, finished = self.script.pop(0)
        return SimpleNamespace(request_id=rid, generated_tokens=[7] * tokens, is_finished=lambda: finished)

    def is_running(self) -> bool:
        return True


@pytest.mark.parametrize("streaming_kwarg", [True, False])
def test_a_time_limited_cb_run_counts_the_tokens_of_unfinished_requests_when_they_stream(
    streaming_kwarg: bool,
) -> None:
    """--hf-cb-time-limit cuts a slow peer's run short: with streaming (transformers 5.x) every token
    generated by the deadline counts, so the figure is its rate, not a lower bound from the few
    requests that finished; without it only finished requests count, and the JSON says which."""
    from types import SimpleNamespace

    from loadtest.hf_cb_peer import HFContinuousBatchingPeer

    peer = object.__new__(HFContinuousBatchingPeer)
    peer.device = "cpu"
    workload = SimpleNamespace(prompts=[[1, 2], [3], [4, 5, 6]], output_lens=[3, 9, 9])
    script = [("run-0", 1, False), ("run-1", 2, False), ("run-0", 3, True), ("run-1", 4, False)]
    manager = _ScriptedCBManager(script, streaming_kwarg)
    res = peer._run_requests(manager, workload, "run", timeout_s=0.05, partial_ok=True)
    assert res["timed_out"] is True and res["completed"] == 1 and res["output_tokens"] == 3
    assert res["streamed"] is streaming_kwarg
    assert res["generated_tokens"] == 3 + 4  # run-0 finished with 3, run-1 had 4 at the deadline
    if streaming_kwarg:
        assert manager.streaming_requested == [True, True, True]
