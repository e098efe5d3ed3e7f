"""The offline API as a user meets it: LLM.generate / chat, bad input, n > 1, stops, seeds, aborts."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine import LLM, SamplingParams


@pytest.fixture(scope="module")
def llm(tiny_llama_dir: Path) -> LLM:
    return LLM(str(tiny_llama_dir), device="cpu", dtype="float32", max_model_len=128)


def _usage(llm: LLM) -> float:
    return llm.llm_engine.scheduler.kv_cache_usage


def test_text_prompt_outputs_in_input_order(llm: LLM) -> None:
    prompts = ["Return the sum", "Hello", "The quick brown fox jumps over the lazy dog"]
    outs = llm.generate(
        prompts, SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True), use_tqdm=False
    )
    assert [o.prompt for o in outs] == prompts
    tok = llm.get_tokenizer()
    for o, p in zip(outs, prompts, strict=True):
        assert o.prompt_token_ids == tok.encode(p)
        assert len(o.outputs[0].token_ids) == 5
        assert o.outputs[0].text == tok.decode(o.outputs[0].token_ids, skip_special_tokens=True)
        assert o.finished


def test_offline_step_phases_are_counted(llm: LLM) -> None:
    before = llm.llm_engine.stats().step_loop
    llm.generate(["Hello"], SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True), use_tqdm=False)
    after = llm.llm_engine.stats().step_loop
    assert before is not None and after is not None
    assert after["steps"] >= before["steps"] + 6  # one forward pass per generated token
    for phase in ("schedule", "launch", "device_wait", "update"):  # async scheduling is the default
        assert after[phase] > before[phase], phase
    assert after["loop_delay"] == before["loop_delay"] == 0.0  # no event loop offline


@pytest.mark.parametrize(
    ("prompt", "params", "message"),
    [
        ("", SamplingParams(), "prompt must not be empty"),
        ([], SamplingParams(), "prompt must not be empty"),
        ([1, 2, 512], SamplingParams(), "prompt contains token id 512, outside the vocabulary [0, 512)"),
        ([1, -3], SamplingParams(), "prompt contains token id -3, outside the vocabulary [0, 512)"),
        ([1, True], SamplingParams(), "prompt token ids must be integers; got True (bool)"),
        ([1, 2.0], SamplingParams(), "prompt token ids must be integers; got 2.0 (float)"),
        (b"hi", SamplingParams(), "prompt must be a string or a list of token ids; got bytes"),
        (None, SamplingParams(), "prompt must be a string or a list of token ids; got NoneType"),
        ({"prompt": "hi"}, SamplingParams(), "prompt must be a string or a list of token ids; got dict"),
        ([5] * 128, SamplingParams(), "prompt (128 tokens) is longer than max_model_len (128) allows"),
        ([5] * 100, SamplingParams(max_tokens=40), "exceeds max_model_len (128)"),
        ([5, 6], SamplingParams(stop_token_ids=[9999]), "stop_token_ids contains 9999"),
    ],
)
def test_bad_input_raises_value_error(llm: LLM, prompt, params: SamplingParams, message: str) -> None:
    with pytest.raises(ValueError) as exc:
        llm.generate([prompt], params, use_tqdm=False)
    assert message in str(exc.value)
    assert not llm.llm_engine.has_unfinished_requests()
    assert _usage(llm) == 0.0


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"temperature": -1.0}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": -2}, "top_k"),
        ({"min_p": 1.5}, "min_p"),
        ({"n": 0}, "n"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"min_tokens": 5, "max_tokens": 2}, "min_tokens"),
        ({"presence_penalty": 3.0}, "presence_penalty"),
        ({"frequency_penalty": -2.5}, "frequency_penalty"),
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
        ({"logprobs": 21}, "logprobs"),
        ({"prompt_logprobs": -1}, "prompt_logprobs"),
        ({"stop": [""]}, "stop"),
        ({"logit_bias": {5: 101.0}}, "logit_bias"),
        ({"seed": "x"}, "seed"),
        ({"output_kind": "partial"}, "output_kind"),
    ],
)
def test_invalid_sampling_params_name_the_field(kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError) as exc:
        SamplingParams(**kwargs)
    assert str(exc.value).startswith(field)


def test_parallel_sampling_n(llm: LLM) -> None:
    params = SamplingParams(n=3, temperature=1.0, seed=7, max_tokens=6, ignore_eos=True)
    (out,) = llm.generate([[5, 6, 7, 8]], params, use_tqdm=False)
    assert [c.index for c in out.outputs] == [0, 1, 2]
    assert all(len(c.token_ids) == 6 for c in out.outputs)
    assert len({tuple(c.token_ids) for c in out.outputs}) > 1  # different seeds per child
    (again,) = llm.generate([[5, 6, 7, 8]], params, use_tqdm=False)
    assert [c.token_ids for c in again.outputs] == [c.token_ids for c in out.outputs]
    assert _usage(llm) == 0.0


def test_seeded_request_is_independent_of_batch(llm: LLM) -> None:
    seeded = SamplingParams(temperature=1.0, seed=1234, max_tokens=8, ignore_eos=True)
    alone = llm.generate([[9, 10, 11]], seeded, use_tqdm=False)[0].outputs[0].token_ids
    others = SamplingParams(temperature=1.0, max_tokens=8, ignore_eos=True)
    batch = llm.generate([[3, 4], [9, 10, 11], [7] * 20], [others, seeded, others], use_tqdm=False)
    assert batch[1].outputs[0].token_ids == alone


def test_stop_token_and_stop_string(llm: LLM) -> None:
    base = llm.generate(
        [[5, 6, 7]], SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True), use_tqdm=False
    )
    tokens = base[0].outputs[0].token_ids
    text = base[0].outputs[0].text
    stop_tok = tokens[3]
    first = tokens.index(stop_tok)
    out = llm.generate(
        [[5, 6, 7]],
        SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, stop_token_ids=[stop_tok]),
        use_tqdm=False,
    )[0].outputs[0]
    assert out.token_ids == tokens[: first + 1]
    assert out.finish_reason == "stop"
    assert out.stop_reason == stop_tok
    stop_str = text[len(text) // 2 : len(text) // 2 + 2]
    if stop_str.strip():
        out = llm.generate(
            [[5, 6, 7]],
            SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, stop=[stop_str]),
            use_tqdm=False,
        )[0].outputs[0]
        assert out.finish_reason == "stop"
        assert out.stop_reason == stop_str
        assert out.text == text[: text.index(stop_str)]


def test_abort_frees_blocks(llm: LLM) -> None:
    engine = llm.llm_engine
    engine.add_request("a", [5] * 40, SamplingParams(max_tokens=50, ignore_eos=True))
    engine.add_request("b", [6] * 10, SamplingParams(max_tokens=50, ignore_eos=True))
    engine.step()
    engine.step()
    assert _usage(llm) > 0.0
    engine.abort_request(["a", "b"])
    assert not engine.has_unfinished_requests()
    engine.step()
    assert _usage(llm) == 0.0


@pytest.mark.parametrize(
    ("request_ids", "got"),
    [(5, "int"), (None, "NoneType"), (b"a", "bytes"), (["a", 5], "int at index 1")],
)
def test_abort_request_names_request_id_for_a_bad_id(llm: LLM, request_ids, got: str) -> None:
    """5 or None raised Python's bare "'int' object is not iterable"; an int in a list, or bytes, matched
    no request and aborted nothing without a word. A bad list aborts none of its ids."""
    engine = llm.llm_engine
    engine.add_request("a", [5] * 10, SamplingParams(max_tokens=50, ignore_eos=True))
    with pytest.raises(TypeError) as exc:
        engine.abort_request(request_ids)
    assert str(exc.value) == f"request_id must be a str or an iterable of str; got {got}"
    assert engine.has_unfinished_requests()
    with pytest.raises(TypeError, match=r"^request_id must be a str; got int$"):
        engine.abort_request_with_output(5)
    engine.abort_request(iter(["a"]))
    assert not engine.has_unfinished_requests()


def test_output_kinds(llm: LLM) -> None:
    """cumulative: an output per step that adds a token; final_only: the finished output alone, the same."""
    engine = llm.llm_engine
    seen: dict[str, list] = {"c": [], "f": []}
    for rid, kind in (("c", "cumulative"), ("f", "final_only")):
        engine.add_request(
            rid, [7, 8, 9], SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True, output_kind=kind)
        )
    while engine.has_unfinished_requests():
        for out in engine.step():
            seen[out.request_id].append(out)
    assert len(seen["c"]) == 6 and [len(o.outputs[0].token_ids_delta) for o in seen["c"]] == [1] * 6
    (final,) = seen["f"]
    assert final.finished and final.outputs[0].token_ids == seen["c"][-1].outputs[0].token_ids
    assert final.outputs[0].text == seen["c"][-1].outputs[0].text
    assert final.outputs[0].token_ids_delta == final.outputs[0].token_ids  # everything since the start
    assert final.outputs[0].text_delta == final.outputs[0].text
    assert _usage(llm) == 0.0


def test_one_params_object_serves_prompts_of_different_lengths(llm: LLM) -> None:
    """max_tokens=None means "up to max_model_len" for each prompt on its own; the caller's object
    is not modified."""
    params = SamplingParams(temperature=0.0, max_tokens=None, ignore_eos=True)
    outs = llm.generate([[5] * 120, [6] * 20], params, use_tqdm=False)
    assert [len(o.outputs[0].token_ids) for o in outs] == [128 - 120, 128 - 20]
    assert params.max_tokens is None and params.all_stop_token_ids == set()


def test_chat_applies_template(llm: LLM) -> None:
    messages = [{"role": "user", "content": "hi"}]
    out = llm.chat(messages, SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True), use_tqdm=False)[
        0
    ]
    tok = llm.get_tokenizer()
    expected = tok.encode("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False)
    assert out.prompt_token_ids == expected


@pytest.mark.parametrize(
    ("messages", "param", "message"),
    [
        (
            [{"role": "user", "content": 5}],
            "messages[0].content",
            "messages[0].content must be a string, a list of text parts or null; got int",
        ),
        (
            [{"role": "user", "content": "hi"}, {"role": "wizard", "content": "hi"}],
            "messages[1].role",
            "messages[1].role must be one of system, developer, user, assistant; got 'wizard'",
        ),
        ([{"content": "hi"}], "messages[0].role", "messages[0].role is required"),
        ([{"role": "user"}], "messages[0].content", "messages[0].content must not be null"),
        (
            [{"role": "user", "content": [{"type": "text", "text": 3}]}],
            "messages[0].content[0].text",
            "messages[0].content[0].text must be a string; got int",
        ),
        (["hi"], "messages[0]", "messages[0] must be a message (a dict with role and content); got str"),
        ([], "messages", "messages must not be empty"),
        (
            [[{"role": "user", "content": "a"}], [{"role": "user", "content": None}]],
            "messages[1][0].content",
            "messages[1][0].content must not be null",
        ),
    ],
)
def test_chat_names_the_bad_message_and_field(llm: LLM, messages, param: str, message: str) -> None:
    """An int content failed inside the template ("'int' object is not iterable"), a missing role as
    jinja's "'dict object' has no attribute 'role'", and an unknown role or no content rendered as is.
    The words are the server's chat route's for the same input (engine/inputs/chat_messages.py)."""
    from engine.errors import InvalidRequestError

    with pytest.raises(InvalidRequestError) as exc:
        llm.chat(messages, SamplingParams(max_tokens=2), use_tqdm=False)
    assert (exc.value.param, str(exc.value)) == (param, message)
    assert not llm.llm_engine.has_unfinished_requests()


def test_chat_takes_developer_turns_and_text_parts_as_the_server_does(llm: LLM) -> None:
    params = SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True)
    plain = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi\nthere"}]
    parts = [
        {"role": "developer", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "hi"}, {"type": "text", "text": "there"}]},
    ]
    a, b = llm.chat([plain, parts], params, use_tqdm=False)
    assert a.prompt_token_ids == b.prompt_token_ids


def test_generation_config_supplies_default_sampling_params(tiny_llama_dir: Path, tmp_path: Path) -> None:
    import json
    import shutil

    model_dir = tmp_path / "model"
    shutil.copytree(tiny_llama_dir, model_dir)
    gen = json.loads((model_dir / "generation_config.json").read_text())
    gen.update({"temperature": 0.0, "top_p": 0.5, "max_new_tokens": 7})
    (model_dir / "generation_config.json").write_text(json.dumps(gen))
    llm = LLM(str(model_dir), device="cpu", dtype="float32")
    defaults = llm.get_default_sampling_params()
    assert (defaults.temperature, defaults.top_p, defaults.max_tokens) == (0.0, 0.5, 7)
    (out,) = llm.generate([[5, 6, 7]], use_tqdm=False)
    greedy = llm.generate([[5, 6, 7]], SamplingParams(temperature=0.0, max_tokens=7), use_tqdm=False)[0]
    assert out.outputs[0].token_ids == greedy.outputs[0].token_ids


def test_a_bad_priority_is_refused_and_the_engine_goes_on(llm: LLM) -> None:
    """A str priority used to enter the waiting heap: the next comparison raised TypeError in the
    scheduler and every later generate() failed the same way."""
    params = SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True)
    with pytest.raises(ValueError, match=r"^priority must be an integer; got 'x'$"):
        llm.generate(["a", "b"], params, use_tqdm=False, priority=[0, "x"])
    assert not llm.llm_engine.has_unfinished_requests()
    assert len(llm.generate(["a", "b"], params, use_tqdm=False, priority=[1, 0])) == 2


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (
            lambda llm: llm.generate(5),
            "prompts must be a string, a list of strings or a list of token-id lists; got int",
        ),
        (
            lambda llm: llm.generate(["a"], {"max_tokens": 3}),
            "sampling_params must be a SamplingParams or a list of them; got dict",
        ),
        (
            lambda llm: llm.generate(["a"], [{"max_tokens": 3}]),
            "sampling_params must be a SamplingParams or a list of them; got dict",
        ),
        (
            lambda llm: llm.generate(["a"], SamplingParams(max_tokens=2), lora_request="sql"),
            "lora_request must be a LoRARequest, None or a list of them; got str",
        ),
    ],
)
def test_wrong_argument_types_raise_type_error_naming_the_argument(llm: LLM, call, message: str) -> None:
    with pytest.raises(TypeError) as exc:
        call(llm)
    assert str(exc.value) == message
    assert not llm.llm_engine.has_unfinished_requests()


def test_beam_search_takes_a_string_as_one_prompt_and_names_its_fields(llm: LLM) -> None:
    from engine import BeamSearchParams
    from engine.errors import InvalidRequestError

    params = BeamSearchParams(beam_width=2, max_tokens=3)
    (out,) = llm.beam_search("Hello", params)  # was one beam search per letter
    assert out.sequences[0].tokens[:-3] == llm.get_tokenizer().encode("Hello")
    with pytest.raises(InvalidRequestError) as exc:
        llm.beam_search([{"text": "Hello"}], params)  # was a KeyError
    assert (exc.value.param, str(exc.value)) == (
        "prompt",
        "prompts[0] is a dict without 'prompt' or 'prompt_token_ids'",
    )
    with pytest.raises(InvalidRequestError) as exc:
        llm.beam_search(["Hello"], BeamSearchParams(beam_width=0, max_tokens=3))
    assert (exc.value.param, str(exc.value)) == ("beam_width", "beam_width must be in [1, 128]; got 0")


def test_an_id_taken_by_a_beam_is_refused_without_a_stuck_request(llm: LLM) -> None:
    """A request whose id was one of a beam group's sequence ids (`ID#beam0`) passed the output
    processor's check, was taken by it, then refused by the scheduler: it stayed unfinished forever,
    so LLM.generate and every step loop spun without end."""
    engine = llm.llm_engine
    engine.add_request(
        "b", [5, 6, 7], SamplingParams(use_beam_search=True, n=2, temperature=0.0, max_tokens=3)
    )
    with pytest.raises(ValueError, match=r"^request_id 'b#beam0' is already in use$"):
        engine.add_request("b#beam0", [5, 6], SamplingParams(max_tokens=3))
    steps = 0
    while engine.has_unfinished_requests():
        engine.step()
        steps += 1
        assert steps < 50
    assert _usage(llm) == 0.0
