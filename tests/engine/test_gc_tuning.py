"""The engine's GC tuning: a higher young-generation threshold while it runs, put back after."""

from __future__ import annotations

import gc

import pytest

from engine.gc_tuning import DEFAULT_GEN0, gen0_threshold, young_collections_every


def test_threshold_raised_inside_and_restored_after() -> None:
    before = gc.get_threshold()
    with young_collections_every(12_345):
        assert gc.get_threshold() == (12_345, *before[1:])
    assert gc.get_threshold() == before


def test_restored_after_an_error() -> None:
    before = gc.get_threshold()
    with pytest.raises(RuntimeError), young_collections_every(9_999):
        raise RuntimeError("boom")
    assert gc.get_threshold() == before


def test_a_change_made_inside_stands() -> None:
    before = gc.get_threshold()
    try:
        with young_collections_every(5_000):
            gc.set_threshold(800, *before[1:])
        assert gc.get_threshold() == (800, *before[1:])
    finally:
        gc.set_threshold(*before)


def test_env_sets_the_threshold(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WEIR_GC_GEN0", raising=False)
    assert gen0_threshold() == DEFAULT_GEN0
    monkeypatch.setenv("WEIR_GC_GEN0", "700")
    assert gen0_threshold() == 700
    for bad in ("0", "-5", "many"):
        monkeypatch.setenv("WEIR_GC_GEN0", bad)
        with pytest.raises(ValueError, match=f"WEIR_GC_GEN0 must be a positive integer; got '{bad}'"):
            gen0_threshold()


def test_llm_generate_runs_with_the_raised_threshold(tiny_llama_dir, monkeypatch: pytest.MonkeyPatch) -> None:
    from engine import LLM, SamplingParams

    llm = LLM(str(tiny_llama_dir), device="cpu")
    seen = []
    step = llm.llm_engine.step

    def spying_step():
        seen.append(gc.get_threshold()[0])
        return step()

    monkeypatch.setattr(llm.llm_engine, "step", spying_step)
    before = gc.get_threshold()
    llm.generate(["hello"], SamplingParams(max_tokens=3, temperature=0.0), use_tqdm=False)
    llm.shutdown()
    assert seen and set(seen) == {DEFAULT_GEN0}
    assert gc.get_threshold() == before


def test_llm_refuses_a_bad_gc_gen0_when_built(tiny_llama_dir, monkeypatch: pytest.MonkeyPatch) -> None:
    """It was refused at the first generate(), after the model had loaded."""
    from engine import LLM

    def no_engine(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        raise AssertionError("the model must not load")

    monkeypatch.setattr("engine.llm.LLMEngine", no_engine)
    monkeypatch.setenv("WEIR_GC_GEN0", "abc")
    with pytest.raises(ValueError, match=r"^WEIR_GC_GEN0 must be a positive integer; got 'abc'$"):
        LLM(str(tiny_llama_dir), device="cpu")
