"""Start-up's Triton compiles in worker processes (engine/worker/compile_pool.py, compile_ahead.py).

What must hold for the pool to save anything: a kernel a worker compiled from a recorded launch is
the very cache entry the launch itself would compile, so the launch afterwards compiles nothing. Here
without a GPU: a fresh interpreter (no TRITON_INTERPRET) with a stand-in driver for sm_90 runs weir's
real kernel wrappers on CPU tensors; their launches are recorded (nothing compiled), two spawned
workers compile them for sm_90 into an empty TRITON_CACHE_DIR, and then the same launches, through
Triton's own JIT path with the launch itself skipped, must add nothing to that cache, while launches
of new specializations add their entries (the check can fail). The launchers (gcc, the CUDA driver
library) are only built on a GPU machine.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from engine.config import EngineConfig
from engine.worker import compile_pool
from engine.worker.compile_ahead import compile_ahead, representative_sizes
from engine.worker.cuda_graphs import capture_sizes
from engine.worker.model_runner import ModelRunner

ROOT = Path(__file__).resolve().parents[2]


def _run_script(tmp_path: Path, source: str, *args: str) -> dict:
    script = tmp_path / "pool_check.py"
    script.write_text(source)
    cache = tmp_path / "triton_cache"
    cache.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "WEIR_COMPILE_WORKERS")}
    env.update(PYTHONPATH=str(ROOT), TRITON_CACHE_DIR=str(cache))
    done = subprocess.run(
        [sys.executable, str(script), *args], env=env, cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    line = next(x for x in done.stdout.splitlines() if x.startswith("REPORT "))
    return json.loads(line.removeprefix("REPORT "))


_SCRIPT = """
import json, os, sys
import torch
import triton.runtime.jit as jit
from triton import knobs
from engine.config import EngineConfig
from engine.worker import compile_pool
from engine.worker.compile_ahead import compile_ahead


def main():
    cache = os.environ["TRITON_CACHE_DIR"]
    listing = lambda: sorted(os.listdir(cache))
    compile_pool.start(2)
    compile_pool._use_target(("cuda", 90, 32))  # this process too: no GPU here
    from ops.triton.activation import silu_and_mul
    from ops.triton.rms_norm import rms_norm

    def forward(hidden=256):
        x = torch.randn(4, hidden, dtype=torch.bfloat16)
        w = torch.randn(hidden, dtype=torch.bfloat16)
        out = rms_norm(x, w, 1e-6)
        rms_norm(x, w, 1e-6)  # the same specialization again
        rms_norm(x, w, 1e-6, residual=x.clone())
        silu_and_mul(torch.randn(4, 2 * hidden, dtype=torch.bfloat16))
        return out

    report = {}
    previous = knobs.runtime.jit_cache_hook
    with compile_pool.record_specializations() as specs:
        out = forward()
    report["recorded"] = [s.name for s in specs]
    report["output_shape"] = list(out.shape)
    report["cache_after_recording"] = listing()
    report["hook_restored"] = knobs.runtime.jit_cache_hook is previous

    meanwhile = []
    report["figures"] = compile_ahead("test", [forward], meanwhile=lambda: meanwhile.append(len(listing())))
    report["meanwhile_ran"] = len(meanwhile)
    after_pool = listing()
    report["cache_after_pool"] = len(after_pool)

    run = jit.JITFunction.run  # Triton's launch path, the launch itself skipped (no GPU)
    jit.JITFunction.run = lambda self, *a, grid, warmup, **k: run(self, *a, grid=grid, warmup=True, **k)
    forward()
    report["new_after_launches"] = sorted(set(listing()) - set(after_pool))
    forward(hidden=272)  # new specializations (each kernel's BLOCK follows hidden): compiled here
    report["new_after_new_shape"] = len(set(listing()) - set(after_pool))

    bogus = compile_pool.Specialization("ops.triton.no_such_module", "_kernel", "{}")
    result = compile_pool.compile_specializations([bogus], ("cuda", 90, 32))[0].result()
    report["bogus"] = [result.name, result.error]
    compile_pool.stop()
    report["running_after_stop"] = compile_pool.running()
    print("REPORT " + json.dumps(report))


if __name__ == "__main__":
    main()
"""


def test_a_kernel_compiled_by_the_pool_is_the_one_its_launch_would_compile(tmp_path: Path) -> None:
    report = _run_script(tmp_path, _SCRIPT)

    # Recording: one entry per specialization, nothing compiled, outputs still allocated.
    assert report["recorded"] == ["_rms_norm_kernel", "_rms_norm_kernel", "_silu_and_mul_kernel"]
    assert report["cache_after_recording"] == []
    assert report["output_shape"] == [4, 256]
    assert report["hook_restored"] is True
    # The pool compiled all three (no launcher without the CUDA driver library) while `meanwhile` ran.
    figures = report["figures"]
    assert (figures["kernels"], figures["failed"]) == (3.0, 0.0)
    assert report["meanwhile_ran"] == 1
    assert report["cache_after_pool"] == 3
    # The launches find every one of them in the cache; at a new hidden size all three compile.
    assert report["new_after_launches"] == []
    assert report["new_after_new_shape"] == 3
    # A specialization a worker cannot compile is reported, not raised.
    name, error = report["bogus"]
    assert name == "_kernel" and error.startswith("ModuleNotFoundError")
    assert report["running_after_stop"] == 0


_ENGINE_SCRIPT = """
import json, os, sys
import numpy as np
import triton.runtime.jit as jit
from engine.config import EngineConfig
from engine.worker import compile_pool
from engine.worker.model_runner import ModelRunner


def main():
    cache = os.environ["TRITON_CACHE_DIR"]
    listing = lambda: sorted(os.listdir(cache))
    compile_pool.start(2)
    compile_pool._use_target(("cuda", 90, 32))  # no GPU here
    config = EngineConfig(model=sys.argv[1], device="cpu", dtype="bfloat16", block_size=16, num_kv_blocks=64)
    runner = ModelRunner(config.resolve())
    runner.load_model(use_triton=True)
    runner._allocate_kv_cache(64)

    def forwards():  # a prefill step of two sequences (one spans two blocks), then padding decodes
        step = runner._build_inputs([[1] * 20, [2] * 7], [0, 0], [20, 7], [[0, 1], [2]], np.array([19, 26]))
        hidden = runner._forward(step.input_ids, step.positions, step.metadata)
        runner.compute_logits(hidden[step.logits_indices])
        for batch_size in (1, 2, 16):
            runner._padding_decode_forward(batch_size)

    with compile_pool.record_specializations() as specs:
        forwards()
    report = {"recorded": sorted(s.name for s in specs), "cache_after_recording": listing()}
    results = [f.result() for f in compile_pool.compile_specializations(specs, ("cuda", 90, 32))]
    report["errors"] = [r.error for r in results if r.error]
    after_pool = listing()
    run = jit.JITFunction.run  # Triton's launch path, the launch itself skipped (no GPU)
    jit.JITFunction.run = lambda self, *a, grid, warmup, **k: run(self, *a, grid=grid, warmup=True, **k)
    forwards()
    report["new_after_launches"] = sorted(set(listing()) - set(after_pool))
    compile_pool.stop()
    print("REPORT " + json.dumps(report))


if __name__ == "__main__":
    main()
"""


def test_the_models_forwards_recorded_compile_in_the_pool_as_their_launches_would(
    tmp_path: Path, tiny_model_dirs: dict[str, Path]
) -> None:
    """The engine's own forwards, dry: a tiny Llama's prefill and padding decodes (the runner's
    `_padding_decode_forward`, which start-up runs dry) record every kernel variant they launch; the
    pool's compiles of them are exactly what the launches then look up."""
    report = _run_script(tmp_path, _ENGINE_SCRIPT, str(tiny_model_dirs["llama"]))
    assert report["recorded"] == [
        "_paged_attention_kernel",  # prefill
        "_paged_attention_kernel",  # decode
        "_rms_norm_kernel",  # without residual (the first layer's input norm)
        "_rms_norm_kernel",  # with
        "_rotary_write_kv_kernel",
        "_silu_and_mul_kernel",
    ]
    assert report["cache_after_recording"] == []
    assert report["errors"] == []
    assert report["new_after_launches"] == []


_INDEX_KERNEL_SCRIPT = """
import json, os
import torch
import triton.runtime.jit as jit
from engine.worker import compile_pool
from ops.triton.moe_align import moe_align_block_size_kernel
from ops.triton.moe_route import moe_route
from ops.triton.rms_norm import rms_norm


def main():
    cache = os.environ["TRITON_CACHE_DIR"]
    compile_pool._use_target(("cuda", 90, 32))  # no GPU here
    run = jit.JITFunction.run  # Triton's launch path, the launch itself skipped (no GPU)
    jit.JITFunction.run = lambda self, *a, grid, warmup, **k: run(self, *a, grid=grid, warmup=True, **k)
    topk_ids = torch.tensor([[0, 3], [1, 3], [2, 0]], dtype=torch.int32)  # 3 tokens, top-2 of 4 experts
    with compile_pool.record_specializations() as specs:
        moe_route(torch.randn(3, 4, dtype=torch.bfloat16), top_k=2, renormalize=True)
        moe_align_block_size_kernel(topk_ids, num_experts=4, block_m=16)
        rms_norm(torch.randn(3, 64, dtype=torch.bfloat16), torch.randn(64, dtype=torch.bfloat16), 1e-6)
    print("REPORT " + json.dumps({"recorded": [s.name for s in specs], "compiled": len(os.listdir(cache))}))


if __name__ == "__main__":
    main()
"""


def test_a_kernel_whose_outputs_are_indices_runs_even_in_a_dry_forward(tmp_path: Path) -> None:
    """The MoE routing kernel's expert ids feed the alignment, whose outputs index the fused MoE kernel's
    expert weights: left as allocated by a dry forward they would send those out of bounds. Inside
    record_specializations both are compiled in the process and launched (the launch skipped here, no
    GPU), while the norm is recorded."""
    report = _run_script(tmp_path, _INDEX_KERNEL_SCRIPT)
    assert compile_pool.RUN_EVEN_DRY == {
        ("ops.triton.moe_align", "_moe_align_kernel"),
        ("ops.triton.moe_route", "_moe_route_kernel"),
    }
    assert report["recorded"] == ["_rms_norm_kernel"]
    assert report["compiled"] == 2  # the routing and alignment kernels' cache entries, compiled here


@pytest.mark.parametrize(("raw", "expected"), [("", 0), ("0", 0), (" 2 ", 2), ("1000", 16)])
def test_workers_from_env(monkeypatch: pytest.MonkeyPatch, raw: str, expected: int) -> None:
    monkeypatch.setenv("WEIR_COMPILE_WORKERS", raw)
    monkeypatch.setattr(compile_pool, "usable_cpus", lambda: 64)
    assert compile_pool.workers_from_env() == expected
    monkeypatch.setattr(compile_pool, "usable_cpus", lambda: 2)  # never more than the CPUs
    assert compile_pool.workers_from_env() == min(expected, 2)


@pytest.mark.parametrize("raw", ["-1", "two", "1.5"])
def test_workers_from_env_refuses(monkeypatch: pytest.MonkeyPatch, raw: str) -> None:
    monkeypatch.setenv("WEIR_COMPILE_WORKERS", raw)
    with pytest.raises(
        ValueError, match=rf"WEIR_COMPILE_WORKERS must be a whole number >= 0 \(0: off\); got '{raw}'"
    ):
        compile_pool.workers_from_env()


def test_usable_cpus_follow_the_affinity(monkeypatch: pytest.MonkeyPatch) -> None:
    """A container limited to 3 of the host's 64 cores gets 3 workers at most, not 8."""
    monkeypatch.setattr(compile_pool.os, "sched_getaffinity", lambda pid: {0, 5, 9}, raising=False)
    monkeypatch.setattr(compile_pool.os, "cpu_count", lambda: 64)
    assert compile_pool.usable_cpus() == 3
    monkeypatch.delenv("WEIR_COMPILE_WORKERS", raising=False)
    assert compile_pool.workers_from_env(default=compile_pool.SERVE_DEFAULT_WORKERS) == 3


def test_off_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    """Off for an LLM in a script (its spawned workers would need `if __name__ == "__main__":`); `weir
    serve` passes its own default, 8 (app/cli.py)."""
    monkeypatch.delenv("WEIR_COMPILE_WORKERS", raising=False)
    monkeypatch.setattr(compile_pool, "usable_cpus", lambda: 64)
    assert compile_pool.workers_from_env() == 0
    assert compile_pool.workers_from_env(default=compile_pool.SERVE_DEFAULT_WORKERS) == 8
    monkeypatch.setenv("WEIR_COMPILE_WORKERS", "0")
    assert compile_pool.workers_from_env(default=compile_pool.SERVE_DEFAULT_WORKERS) == 0  # off when asked
    monkeypatch.delenv("WEIR_COMPILE_WORKERS")
    assert compile_pool.start(0) is False and compile_pool.running() == 0
    # Without a pool a phase runs nothing dry and reports nothing.
    ran = []
    assert compile_ahead("test", [lambda: ran.append(1)]) == {} and ran == []


def test_representative_sizes() -> None:
    assert representative_sizes(capture_sizes(1024, 1024)) == [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024]
    assert representative_sizes(capture_sizes(200, 1024)) == [1, 2, 4, 8, 16, 32, 64, 128, 200]
    assert representative_sizes([16, 24]) == [16, 24]
    assert representative_sizes([]) == []


def test_the_graph_warm_ups_run_dry_at_each_representative_size(tiny_model_dirs: dict[str, Path]) -> None:
    """compile_ahead's dry forwards of the CUDA-graph phase (emulated on CPU): one warm-up forward of
    the graph runner's own padding step per representative decode and mixed size, in that order."""
    config = EngineConfig(
        model=str(tiny_model_dirs["llama"]),
        device="cpu",
        num_kv_blocks=64,
        max_cuda_graph_batch_size=16,
        max_num_batched_tokens=32,
        max_cuda_graph_mixed_tokens=32,
    )
    runner = ModelRunner(config.resolve())
    runner.load_model()
    runner.initialize_kv_cache(runner.determine_num_kv_blocks())
    runner.capture_cuda_graphs(emulate=True)
    graphs = runner.graph_runner
    assert graphs is not None and graphs.sizes == [1, 2, 4, 8, 16] and graphs.mixed_sizes == [16, 32]
    seen = []
    forward = graphs.forward
    graphs.forward = lambda ids, pos, md: (
        seen.append((md.cuda_graph_size, md.cuda_graph_mixed)) or forward(ids, pos, md)
    )
    for warm_up in graphs._dry_warmups():
        warm_up()
    assert seen == [(1, False), (2, False), (4, False), (8, False), (16, False), (16, True), (32, True)]
    assert not runner._compiles_ahead()  # CPU: the pool is never used


def test_gpu_likely_guesses_without_torch(monkeypatch: pytest.MonkeyPatch) -> None:
    """`weir serve` decides before importing torch: cuda and cpu say so; auto follows the NVIDIA device
    node, unless CUDA_VISIBLE_DEVICES hides every GPU."""
    assert compile_pool.gpu_likely("cuda") and not compile_pool.gpu_likely("cpu")
    monkeypatch.setattr(compile_pool.os.path, "exists", lambda path: path == "/dev/nvidiactl")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert compile_pool.gpu_likely("auto")
    for hidden in ("", "-1"):
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", hidden)
        assert not compile_pool.gpu_likely("auto")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    assert compile_pool.gpu_likely("auto")
    monkeypatch.setattr(compile_pool.os.path, "exists", lambda path: False)
    assert not compile_pool.gpu_likely("auto")


def test_a_pool_that_cannot_compile_leaves_the_phase_to_compile_in_process(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A worker that could not start breaks the executor: the phase logs it, ends the pool and runs
    on (its kernels compile in-process, as without a pool)."""
    from concurrent.futures.process import BrokenProcessPool

    stopped = []
    monkeypatch.setattr(compile_pool, "running", lambda: 2)
    monkeypatch.setattr(compile_pool, "current_target", lambda: ("cuda", 90, 32))
    monkeypatch.setattr(compile_pool, "stop", lambda terminate=False: stopped.append(terminate))

    def broken(specs: list, target: tuple) -> list:
        raise BrokenProcessPool("a child process terminated abruptly")

    monkeypatch.setattr(compile_pool, "compile_specializations", broken)
    ran = []
    with caplog.at_level("WARNING", logger="weir.engine"):
        assert (
            compile_ahead("memory profile", [lambda: ran.append("dry")], meanwhile=lambda: ran.append("x"))
            == {}
        )
    assert ran == ["dry"] and stopped == [True]
    assert "compile ahead (memory profile): the compile pool is not usable" in caplog.text
