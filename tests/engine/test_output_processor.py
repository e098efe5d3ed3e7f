"""The output processor: per-step outputs carry deltas, the final output is assembled once, cumulative
outputs read as snapshots, and logprob token strings match tokenizer.decode([id])."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from engine import SamplingParams
from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.outputs.prefix_view import PrefixView
from engine.outputs.request_output import RequestOutput
from engine.outputs.token_texts import TokenTexts

MAX_TOKENS = 150  # past the length where cumulative outputs switch from copies to views


@pytest.fixture(scope="module")
def engine(tiny_llama_dir: Path) -> LLMEngine:
    return LLMEngine(
        EngineConfig(model=str(tiny_llama_dir), device="cpu", dtype="float32", max_model_len=256)
    )


def _run(engine: LLMEngine, kinds: dict[str, str], **sp: object) -> dict[str, list[RequestOutput]]:
    for rid, kind in kinds.items():
        params = SamplingParams(output_kind=kind, **sp)  # type: ignore[arg-type]
        engine.add_request(rid, "def main():", params)
    seen: dict[str, list[RequestOutput]] = {rid: [] for rid in kinds}
    while engine.has_unfinished_requests():
        for out in engine.step():
            seen[out.request_id].append(out)
    return seen


def test_long_generation_streams_deltas_whose_concatenation_is_the_final_output(engine: LLMEngine) -> None:
    sp = {
        "temperature": 0.0,
        "max_tokens": MAX_TOKENS,
        "ignore_eos": True,
        "logprobs": 2,
        "stop": ["STOP_HERE!"],
    }
    seen = _run(engine, {"d": "delta", "c": "cumulative"}, **sp)
    deltas, cumulative = seen["d"], seen["c"]
    final = deltas[-1].outputs[0]
    assert deltas[-1].finished and len(final.token_ids) == MAX_TOKENS and final.finish_reason == "length"
    assert len(deltas) == MAX_TOKENS
    for out in deltas[:-1]:
        (o,) = out.outputs
        # A running delta output carries this step's token, text and logprobs, and nothing else.
        assert not out.finished and len(o.token_ids_delta) == 1 and len(o.logprobs_delta or []) == 1
        assert o.token_ids == [] and o.text == "" and o.logprobs == []
    joined_ids = list(itertools.chain.from_iterable(o.outputs[0].token_ids_delta for o in deltas))
    joined_lp = list(itertools.chain.from_iterable(o.outputs[0].logprobs_delta or [] for o in deltas))
    assert joined_ids == final.token_ids
    assert "".join(o.outputs[0].text_delta for o in deltas) == final.text
    assert joined_lp == list(final.logprobs or [])
    # The same request as a cumulative stream ends the same, and every output it gave along the way,
    # read after the run, still shows the sequence as it was at that step.
    c_final = cumulative[-1].outputs[0]
    assert (c_final.token_ids, c_final.text, c_final.logprobs) == (
        final.token_ids,
        final.text,
        final.logprobs,
    )
    for step, out in enumerate(cumulative, start=1):
        (o,) = out.outputs
        assert o.token_ids == final.token_ids[:step] and len(o.logprobs or []) == step
        assert o.token_ids_delta == [final.token_ids[step - 1]]
        assert o.text == "".join(c.outputs[0].text_delta for c in cumulative[:step])
    # Logprob strings are the tokenizer's own decode of each token alone.
    tok = engine.tokenizer
    for position in final.logprobs or []:
        for token_id, lp in position.items():
            assert lp.decoded_token == tok.decode([token_id])


def test_final_only_output_holds_everything_in_its_deltas(engine: LLMEngine) -> None:
    seen = _run(engine, {"f": "final_only", "d": "delta"}, temperature=0.0, max_tokens=20, ignore_eos=True)
    (f,) = seen["f"]
    (o,) = f.outputs
    assert f.finished and o.token_ids_delta == o.token_ids and o.text_delta == o.text
    assert o.token_ids == seen["d"][-1].outputs[0].token_ids and o.text == seen["d"][-1].outputs[0].text


@pytest.mark.parametrize("which", ["tiny", "default_model"])
def test_token_texts_match_per_token_decode_over_the_whole_vocabulary(
    tiny_tokenizer_dir: Path, which: str
) -> None:
    path = tiny_tokenizer_dir if which == "tiny" else Path(__file__).parents[2] / "engine" / "default_model"
    tok = AutoTokenizer.from_pretrained(str(path))
    texts = TokenTexts(tok)
    ids = list(range(len(tok)))
    texts.add(ids[::2])  # two batches, the second partly cached
    texts.add(ids)
    assert [texts.texts[i] for i in ids] == [tok.decode([i]) for i in ids]


def test_prefix_view_reads_like_the_list_prefix() -> None:
    items = [1, 2, 3]
    view = PrefixView(items, 3)
    items += [4, 5]
    assert len(view) == 3 and list(view) == [1, 2, 3] and view == [1, 2, 3] and view != [1, 2, 3, 4]
    assert view[-1] == 3 and view[1:] == [2, 3] and view[::-1] == [3, 2, 1] and view[5:] == []
    with pytest.raises(IndexError):
        view[3]
