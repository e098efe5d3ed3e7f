"""Beam search's per-step host work: what the engine does on the host between a beam step's results
and the next launch is the ranking and the forks, not work for outputs no one reads."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine import LLM, BeamSearchParams, SamplingParams

PROMPT = [1, 50, 60, 70, 80, 90, 100]


@pytest.fixture(scope="module")
def llm(tiny_llama_dir: Path) -> LLM:
    return LLM(str(tiny_llama_dir), device="cpu", dtype="float32", block_size=8)


def test_beam_candidates_are_not_detokenized_while_shown_logprobs_are(llm: LLM) -> None:
    """A beam's top candidates come back as logprobs for the ranking only: decoding their texts each
    step (a tokenizer call per new id) was most of a beam step's host time. A request that shows its
    logprobs, run beside the beams, still gets every token's text."""
    engine = llm.llm_engine
    texts = engine.output_processor.token_texts.texts
    texts.clear()
    engine.add_request("beams", PROMPT, BeamSearchParams(4, 8, ignore_eos=True).to_sampling_params())
    engine.add_request(
        "shown", PROMPT[::-1], SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True, logprobs=3)
    )
    finals = {}
    while engine.has_unfinished_requests():
        finals.update((o.request_id, o) for o in engine.step() if o.finished)
    shown = finals["shown"].outputs[0].logprobs
    assert shown is not None and len(shown) == 8
    shown_ids = {token_id for position in shown for token_id in position}
    tok = llm.get_tokenizer()
    assert all(lp.decoded_token == tok.decode([t]) for position in shown for t, lp in position.items())
    # Exactly the shown request's ids were decoded, none of the beams' 8 x 8 candidates per step.
    assert set(texts) == shown_ids
    assert len(finals["beams"].outputs) == 4
