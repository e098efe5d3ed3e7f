"""The compile pool only where it saves time (engine/worker/compile_marker.py): a start-up's marker in
the Triton cache, named by what decides its kernels, and the runner's choice by it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from engine.config import EngineConfig
from engine.worker import compile_marker, compile_pool
from engine.worker.kv_cache_setup import KVCacheSetup

ROOT = Path(__file__).resolve().parents[2]

_KEY_SCRIPT = """
import sys
from engine.config import EngineConfig
from engine.worker.compile_marker import startup_key
config = EngineConfig(model=sys.argv[1], device="cpu", max_num_seqs=int(sys.argv[2])).resolve()
print("KEY", startup_key(config, (9, 0)))
"""


def _key_in_a_fresh_process(model: Path, max_num_seqs: int, env: dict[str, str] | None = None) -> str:
    run = subprocess.run(
        [sys.executable, "-c", _KEY_SCRIPT, str(model), str(max_num_seqs)],
        cwd=ROOT,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT), **(env or {})},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    return next(line for line in run.stdout.splitlines() if line.startswith("KEY ")).removeprefix("KEY ")


def test_the_key_is_the_same_for_the_same_start_up_and_differs_otherwise(
    tiny_model_dirs: dict[str, Path],
) -> None:
    """Two processes resolving the same config get the same key (no object addresses in it); another
    config, a WEIR_ switch or another GPU generation gets another."""
    model = tiny_model_dirs["llama"]
    first = _key_in_a_fresh_process(model, 8)
    assert _key_in_a_fresh_process(model, 8) == first
    assert _key_in_a_fresh_process(model, 8, {"WEIR_COMPILE_WORKERS": "4"}) == first  # the pool's size is not
    assert _key_in_a_fresh_process(model, 16) != first
    assert _key_in_a_fresh_process(model, 8, {"WEIR_PDL": "0"}) != first
    config = EngineConfig(model=str(model), device="cpu", max_num_seqs=8).resolve()
    assert compile_marker.startup_key(config, (9, 0)) == first
    assert compile_marker.startup_key(config, (8, 9)) != first


def _runner_like(key: str) -> SimpleNamespace:
    """What KVCacheSetup._compiles_ahead reads of a CUDA runner with Triton kernels (no GPU needed:
    the key is already computed)."""
    return SimpleNamespace(
        config=SimpleNamespace(parallel=SimpleNamespace(tensor_parallel_size=1)),
        device=torch.device("cuda"),
        attn_backend=SimpleNamespace(kernels=SimpleNamespace(name="triton")),
        _startup_kernels_key=key,
        _launches_triton_on_cuda=lambda: True,
        _kernels_key=lambda: key,
    )


def test_a_start_up_with_its_marker_skips_the_pool(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "cache"))
    stops: list[bool] = []
    monkeypatch.setattr(compile_pool, "running", lambda: 8)
    monkeypatch.setattr(compile_pool, "stop", lambda terminate=False: stops.append(terminate))
    runner = _runner_like("abc123")
    assert compile_marker.marker_path("abc123") == tmp_path / "cache" / "weir-startups" / "abc123"
    assert not compile_marker.compiled_before("abc123")
    assert KVCacheSetup._compiles_ahead(runner) is True  # an empty cache: the pool compiles
    assert stops == []

    compile_marker.mark_compiled("abc123")  # what a start-up leaves once its graphs are captured
    assert compile_marker.compiled_before("abc123") and not compile_marker.compiled_before("other")
    assert KVCacheSetup._compiles_ahead(runner) is False  # nothing to compile: the workers end now
    assert stops == [True]
    assert KVCacheSetup._compiles_ahead(_runner_like("other")) is True  # another start-up's kernels


def test_an_unwritable_cache_only_costs_the_marker(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    monkeypatch.setenv("TRITON_CACHE_DIR", str(blocker))
    compile_marker.mark_compiled("abc")  # no exception
    assert not compile_marker.compiled_before("abc")


def test_a_cpu_start_up_leaves_no_marker(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny_model_dirs: dict[str, Path]
) -> None:
    """Only a start-up that launched Triton kernels on a GPU can say the cache holds them."""
    from engine.worker.model_runner import ModelRunner

    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "cache"))
    config = EngineConfig(model=str(tiny_model_dirs["llama"]), device="cpu", num_kv_blocks=16)
    runner = ModelRunner(config.resolve())
    runner.load_model()
    runner.initialize_kv_cache(runner.determine_num_kv_blocks())
    assert not runner._launches_triton_on_cuda()
    assert not (tmp_path / "cache" / "weir-startups").exists()


def test_without_triton_knobs_the_marker_goes_where_triton_caches_by_default(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import triton

    monkeypatch.delattr(triton, "knobs")
    monkeypatch.setitem(sys.modules, "triton.knobs", None)  # `from triton import knobs` fails
    monkeypatch.delenv("TRITON_CACHE_DIR", raising=False)
    monkeypatch.setenv("TRITON_HOME", str(tmp_path))
    assert compile_marker.marker_path("k") == tmp_path / ".triton" / "cache" / "weir-startups" / "k"
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "c"))
    assert compile_marker.marker_path("k") == tmp_path / "c" / "weir-startups" / "k"
