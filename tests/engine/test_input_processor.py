"""The input processor: every request is validated and normalized once, with typed errors whose
messages are the ones callers (and the HTTP layer's error bodies) have always seen."""

from __future__ import annotations

import dataclasses

import pytest

from engine.core.sampling_params import SamplingParams
from engine.errors import ContextLengthError, InvalidRequestError
from engine.inputs.input_processor import InputProcessor


def make_processor(max_model_len: int = 256, num_kv_blocks: int = 64, block_size: int = 8) -> InputProcessor:
    # Token-id prompts only: no tokenizer needed.
    return InputProcessor(None, 1000, max_model_len, block_size, num_kv_blocks, eos_token_ids=[2])


def test_context_length_error_carries_both_numbers() -> None:
    proc = make_processor(max_model_len=100)
    with pytest.raises(ContextLengthError) as e:
        proc.process("a", [1] * 100)
    assert str(e.value) == "prompt (100 tokens) is longer than max_model_len (100) allows"
    assert (e.value.prompt_tokens, e.value.max_model_len, e.value.max_tokens) == (100, 100, None)
    assert e.value.param == "prompt"
    assert isinstance(e.value, ValueError)  # callers that catch ValueError keep working


def test_prompt_plus_max_tokens_over_max_model_len_carries_the_numbers() -> None:
    proc = make_processor(max_model_len=1024, num_kv_blocks=1000)
    with pytest.raises(ContextLengthError) as e:
        proc.process("a", [1] * 1000, SamplingParams(max_tokens=100))
    assert str(e.value) == "prompt (1000 tokens) + max_tokens (100) = 1100 exceeds max_model_len (1024)"
    assert (e.value.prompt_tokens, e.value.max_model_len, e.value.max_tokens) == (1000, 1024, 100)
    assert e.value.param == "max_tokens"
    assert proc.process("b", [1] * 1000, SamplingParams(max_tokens=24)).max_tokens == 24  # at the limit


def test_max_tokens_none_fills_the_context_on_the_processors_own_copy() -> None:
    proc = make_processor(max_model_len=100, num_kv_blocks=100)
    params = SamplingParams(max_tokens=None, stop_token_ids=[7])
    request = proc.process("a", [1] * 30, params)
    assert request.max_tokens == 70 and request.sampling_params.max_tokens == 70
    assert request.sampling_params.all_stop_token_ids == {7, 2}  # EOS added
    # The caller's object is untouched, so it can serve a prompt of another length.
    assert params.max_tokens is None and params.all_stop_token_ids == {7}
    assert proc.process("b", [1] * 60, params).max_tokens == 40
    ignore = proc.process("c", [1] * 5, SamplingParams(ignore_eos=True, stop_token_ids=[7]))
    assert ignore.sampling_params.all_stop_token_ids == {7}


def test_engine_request_is_immutable() -> None:
    request = make_processor().process("a", [1, 2, 3])
    with pytest.raises(dataclasses.FrozenInstanceError):
        request.prompt_token_ids = [4]  # type: ignore[misc]


def test_request_that_could_never_fit_the_kv_cache_is_rejected() -> None:
    proc = make_processor(num_kv_blocks=4, max_model_len=256)
    with pytest.raises(InvalidRequestError) as e:
        proc.process("a", [1] * 30, SamplingParams(max_tokens=3))
    assert str(e.value) == (
        "prompt (30 tokens) + max_tokens (3) needs 5 KV cache blocks of 8 tokens, "
        "but the KV cache has only 4 blocks"
    )
    assert proc.process("b", [1] * 30, SamplingParams(max_tokens=2)).max_tokens == 2  # exactly 4 blocks


@pytest.mark.parametrize(
    ("prompt", "params", "param", "message"),
    [
        ([], None, "prompt", "prompt must not be empty"),
        ("", None, "prompt", "prompt must not be empty"),
        ([1, 1000], None, "prompt", "prompt contains token id 1000, outside the vocabulary [0, 1000)"),
        ([1, -1], None, "prompt", "prompt contains token id -1, outside the vocabulary [0, 1000)"),
        ([1, True], None, "prompt", "prompt token ids must be integers; got True (bool)"),
        (
            [1],
            SamplingParams(stop_token_ids=[1000]),
            "stop_token_ids",
            "stop_token_ids contains 1000, outside the vocabulary [0, 1000)",
        ),
        (
            [1],
            SamplingParams(logit_bias={1005: 1.0}),
            "logit_bias",
            "logit_bias contains token id 1005, outside the vocabulary [0, 1000)",
        ),
    ],
)
def test_invalid_input_names_the_field(prompt, params, param: str, message: str) -> None:
    with pytest.raises(InvalidRequestError) as e:
        make_processor().process("a", prompt, params)
    assert (e.value.param, str(e.value)) == (param, message)


@pytest.mark.parametrize(
    ("args", "param", "message"),
    [
        ((5, [1], None, 0), "request_id", "request_id must be a string; got int 5"),
        (
            ("a", [1], {"max_tokens": 3}, 0),
            "sampling_params",
            "sampling_params must be a SamplingParams; got dict",
        ),
        (("a", [1], None, "high"), "priority", "priority must be an integer; got 'high'"),
        (("a", [1], None, None), "priority", "priority must be an integer; got None"),
        (("a", [1], None, 1.5), "priority", "priority must be an integer; got 1.5"),
        (("a", b"hi", None, 0), "prompt", "prompt must be a string or a list of token ids; got bytes"),
    ],
)
def test_argument_types_are_refused_up_front(args: tuple, param: str, message: str) -> None:
    """A str priority reached the scheduler's heap, where it broke every later comparison: the engine
    could never schedule again. Each is refused naming the argument."""
    with pytest.raises(InvalidRequestError) as e:
        make_processor().process(*args)
    assert (e.value.param, str(e.value)) == (param, message)


def test_sampling_params_errors_are_typed() -> None:
    with pytest.raises(InvalidRequestError) as e:
        SamplingParams(top_p=0.0)
    assert (e.value.param, str(e.value)) == ("top_p", "top_p must be in (0.0, 1.0]; got 0.0")
    with pytest.raises(InvalidRequestError) as e:
        SamplingParams(logit_bias={5: 101.0})
    assert (e.value.param, str(e.value)) == (
        "logit_bias",
        "logit_bias[5] must be in [-100.0, 100.0]; got 101.0",
    )
