"""Start-up phases (engine/startup_phases.py) are exclusive wall seconds: a nested phase's time leaves
the phase around it, so the phases sum to at most the total and `other` is the rest."""

from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path

import pytest

from engine import startup_phases
from engine.startup_phases import PHASES, StartupPhases, process_start


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture()
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    fake = Clock()
    monkeypatch.setattr(startup_phases.time, "perf_counter", fake)
    return fake


def test_nested_phases_are_exclusive(clock: Clock) -> None:
    phases = StartupPhases(origin=99.0)  # one second before "now": the imports before the recorder
    phases.add("imports", 1.0)
    with phases.phase("config"):
        clock.now += 0.5
        with phases.phase("imports"):  # an import inside config counts as imports only
            clock.now += 2.0
        clock.now += 0.25
    with phases.phase("model_build"):
        clock.now += 3.0
        phases.add("weights", 1.0)  # timed by the runner inside model_build
    server = phases.begin("server")
    clock.now += 0.5
    with phases.phase("warmup"):
        clock.now += 4.0
    clock.now += 0.5
    phases.end(server)
    clock.now += 0.25  # between the last phase and finish: other
    report = phases.finish()
    assert report == {
        "total_s": 12.0,
        "imports_s": 3.0,
        "config_s": 0.75,
        "tokenizer_s": 0.0,
        "model_build_s": 2.0,
        "weights_s": 1.0,
        "kv_cache_s": 0.0,
        "cuda_graphs_s": 0.0,
        "warmup_s": 4.0,
        "server_s": 1.0,
        "other_s": 0.25,
    }
    assert list(report)[1:-1] == [f"{name}_s" for name in PHASES]


def test_finish_closes_open_phases_and_fixes_the_total(clock: Clock) -> None:
    phases = StartupPhases()
    phases.begin("server")
    clock.now += 2.0
    assert phases.finish()["server_s"] == 2.0
    clock.now += 5.0
    # After finish nothing moves: a second app over the same engine is not a start-up.
    assert phases.begin("server") is None
    phases.add("weights", 1.0)
    assert phases.finish() == phases.report()
    assert phases.report()["total_s"] == 2.0 and phases.report()["weights_s"] == 0.0


def test_an_added_phase_cannot_exceed_the_open_one(clock: Clock) -> None:
    phases = StartupPhases()
    with phases.phase("model_build"):
        clock.now += 1.0
        phases.add("weights", 5.0)  # a worker's clock may disagree; the open phase bounds it
    assert phases.seconds["weights"] == 1.0 and phases.seconds["model_build"] == 0.0


def test_unknown_phase_names_the_phases() -> None:
    with pytest.raises(ValueError, match=r"unknown start-up phase 'load'; the phases are imports, config, "):
        StartupPhases().begin("load")


def test_process_start_is_before_now() -> None:
    started = process_start()
    if not sys.platform.startswith("linux"):  # no /proc: the recorder starts at its creation
        assert started is None
        return
    assert started is not None
    assert 0.0 <= time.perf_counter() - started < 3600.0


def test_a_tokenizer_that_cannot_load_is_the_error_even_beside_broken_weights(
    tiny_llama_dir: Path, tmp_path: Path
) -> None:
    """The tokenizer loads beside the model (on its own thread); when both fail, the tokenizer's
    error is the one raised, as when it loaded first."""
    from engine.config import EngineConfig
    from engine.llm_engine import LLMEngine

    shutil.copy(tiny_llama_dir / "config.json", tmp_path / "config.json")  # no tokenizer files
    (tmp_path / "model.safetensors").write_bytes(b"not a safetensors file")
    config = EngineConfig(model=str(tmp_path), device="cpu", dtype="float32", num_kv_blocks=16)
    with pytest.raises(ValueError, match=rf"^cannot load a tokenizer from '{tmp_path}': "):
        LLMEngine(config)


def test_engine_phases_on_cpu(tiny_llama_dir: Path) -> None:
    """An engine built alone records its own phases: the tokenizer is waited for (if at all) after
    the model is ready, and CPU captures no CUDA graphs."""
    from transformers import AutoTokenizer

    from engine.config import EngineConfig
    from engine.llm_engine import LLMEngine

    engine = LLMEngine(
        EngineConfig(model=str(tiny_llama_dir), device="cpu", dtype="float32", num_kv_blocks=16)
    )
    try:
        seconds = dict(engine.startup_phases.seconds)  # unrounded: 16 blocks take microseconds
        tokenizer = AutoTokenizer.from_pretrained(str(tiny_llama_dir))
        assert engine.tokenizer.encode("Hello there") == tokenizer.encode("Hello there")  # the model's
    finally:
        engine.shutdown()
    for name in ("config", "model_build", "weights", "kv_cache"):
        assert seconds[name] > 0, name
    assert seconds["tokenizer"] >= 0 and seconds["cuda_graphs"] == 0.0
    assert seconds["imports"] == seconds["warmup"] == seconds["server"] == 0.0  # not the engine's
