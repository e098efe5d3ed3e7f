"""Beam search: token-exact with transformers' generate(num_beams=k), its KV shared copy-on-write."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from engine import LLM, BeamSearchParams, SamplingParams
from engine.errors import InvalidRequestError
from tests.tiny_models import hf_causal_lm

PROMPT = [1, 50, 60, 70, 80, 90, 100]  # 7 tokens: a partial first block of 8
EOS = 2
MAX_TOKENS = 8
FAMILIES = ["llama", "qwen3"]
# (width, length_penalty, early_stopping): every width, every early_stopping rule.
CASES = [(1, 1.0, False), (2, 0.5, True), (4, 2.0, "never"), (4, 1.0, False)]


def _eos_prone_copy(src: Path, dst: Path) -> Path:
    """The tiny checkpoint with EOS's output row set to that of the token greedy decoding repeats
    most: EOS then is close to the top at times, so some beams end early and others run to max_tokens."""
    shutil.copytree(src, dst)
    (weights,) = dst.glob("*.safetensors")
    state = load_file(str(weights))
    model = hf_causal_lm(str(src), dtype=torch.float32)
    greedy = model.generate(
        torch.tensor([PROMPT]), do_sample=False, max_new_tokens=MAX_TOKENS, pad_token_id=EOS
    )
    head = state["lm_head.weight"] if "lm_head.weight" in state else state["model.embed_tokens.weight"]
    head[EOS] = 0.995 * head[int(greedy[0, len(PROMPT) :].mode().values)]  # no exact ties
    save_file(state, str(weights), metadata={"format": "pt"})
    return dst


@pytest.fixture(scope="module")
def models(tiny_model_dirs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple]:
    """family -> (checkpoint dir, transformers model, weir LLM)."""
    root = tmp_path_factory.mktemp("eos_prone")
    out = {}
    for family in FAMILIES:
        path = _eos_prone_copy(tiny_model_dirs[family], root / family)
        hf = hf_causal_lm(str(path), dtype=torch.float32).eval()
        out[family] = (path, hf, LLM(str(path), device="cpu", dtype="float32", block_size=8))
    return out


def _transformers_beams(hf, width: int, length_penalty: float, early_stopping) -> tuple[list, list]:
    out = hf.generate(
        torch.tensor([PROMPT]),
        num_beams=width,
        num_return_sequences=width,
        do_sample=False,
        max_new_tokens=MAX_TOKENS,
        length_penalty=length_penalty,
        early_stopping=early_stopping,
        pad_token_id=EOS,
        output_scores=True,
        return_dict_in_generate=True,
    )
    beams = []
    for seq in out.sequences.tolist():
        gen = seq[len(PROMPT) :]
        beams.append(gen[: gen.index(EOS) + 1] if EOS in gen else gen)  # padded with EOS after it
    scores = out.sequences_scores.tolist() if width > 1 else None
    return beams, scores


def _count_fork_diffs(engine) -> dict[str, int]:
    """Counts, over the engine's steps from now on, the beams sent to the runner as a fork of a beam
    it holds ("forked") and the beams with outputs sent whole ("whole")."""
    sent = {"forked": 0, "whole": 0}
    schedule = engine.scheduler.schedule

    def counting_schedule():
        so = schedule()
        sent["forked"] += len(so.forked_requests)
        sent["whole"] += sum(
            1 for r in so.new_requests if r.is_beam and len(r.token_ids) > r.num_prompt_tokens
        )
        return so

    engine.scheduler.schedule = counting_schedule
    return sent


def _weir_beams(llm: LLM, width: int, length_penalty: float, early_stopping) -> list:
    params = BeamSearchParams(width, MAX_TOKENS, length_penalty=length_penalty, early_stopping=early_stopping)
    (out,) = llm.beam_search([PROMPT], params)
    assert llm.llm_engine.scheduler.kv_cache_usage == 0.0  # every beam's blocks came back
    return out.sequences


@pytest.fixture(scope="module")
def host_ranked(models) -> dict[str, LLM]:
    """family -> a weir LLM whose beam groups are all ranked on the host (beam_device_ranking off)."""
    return {
        family: LLM(str(path), device="cpu", dtype="float32", block_size=8, beam_device_ranking=False)
        for family, (path, _, _) in models.items()
    }


@pytest.mark.parametrize("ranking", ["device", "host"])
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize(("width", "length_penalty", "early_stopping"), CASES)
def test_beam_search_matches_transformers(
    models, host_ranked, ranking, family, width, length_penalty, early_stopping
) -> None:
    _, hf, llm = models[family]
    if ranking == "host":
        llm = host_ranked[family]
    engine = llm.llm_engine
    handed = _count_device_groups(engine)
    expected, scores = _transformers_beams(hf, width, length_penalty, early_stopping)
    got = _weir_beams(llm, width, length_penalty, early_stopping)
    assert [s.tokens[len(PROMPT) :] for s in got] == expected
    assert all(s.tokens[: len(PROMPT)] == PROMPT for s in got)
    if (width, length_penalty) == (4, 1.0):  # what the checkpoint is built for: EOS ends some beams early
        assert any(len(b) < MAX_TOKENS for b in expected) and any(len(b) == MAX_TOKENS for b in expected)
    for s in got:
        ended_on_eos = s.tokens[-1] == EOS
        assert s.finish_reason == ("stop" if ended_on_eos else "length")
        assert s.cum_logprob < 0.0
    if scores is not None:
        assert [s.score for s in got] == pytest.approx(scores, abs=1e-4)
    # Device ranking took the group after its first step; host ranking never did.
    assert handed == {"groups": 1 if ranking == "device" else 0}


def _count_device_groups(engine) -> dict[str, int]:
    """Counts the beam groups handed to the device from now on."""
    counted = {"groups": 0}
    start = engine.scheduler.start_device_group

    def counting_start(*args, **kwargs):
        group_id = start(*args, **kwargs)
        counted["groups"] += group_id is not None
        return group_id

    engine.scheduler.start_device_group = counting_start
    return counted


def test_forks_sent_as_parent_row_plus_tokens_give_transformers_beams(models) -> None:
    """A beam that takes another's sequence reaches the runner as (parent, new tokens): the runner
    copies the parent's row. The beams are transformers' and no beam with outputs went whole."""
    path, hf, _ = models["llama"]
    llm = LLM(str(path), device="cpu", dtype="float32", block_size=8, beam_device_ranking=False)
    sent = _count_fork_diffs(llm.llm_engine)
    expected, _ = _transformers_beams(hf, 4, 1.0, False)
    assert [s.tokens[len(PROMPT) :] for s in _weir_beams(llm, 4, 1.0, False)] == expected
    assert sent["forked"] > 0 and sent["whole"] == 0
    llm.shutdown()


def test_width_one_is_greedy(models) -> None:
    _, _, llm = models["llama"]
    (greedy,) = llm.generate([PROMPT], SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS), use_tqdm=False)
    (beam,) = _weir_beams(llm, 1, 1.0, False)
    assert beam.tokens[len(PROMPT) :] == list(greedy.outputs[0].token_ids)
    assert beam.text == greedy.outputs[0].text


def test_same_beams_under_preemption_and_prefix_caching(models) -> None:
    """8 blocks of 8: the four beams (2 blocks each at their longest) beside an earlier request that
    grows to 5 blocks do not fit, so beams are preempted and recompute (forking a running beam's
    prompt); the beams do not change and every block comes back."""
    path, hf, _ = models["llama"]
    expected, _ = _transformers_beams(hf, 4, 1.0, False)
    tight = LLM(
        str(path),
        device="cpu",
        dtype="float32",
        block_size=8,
        num_kv_blocks=8,
        enable_prefix_caching=True,
        beam_device_ranking=False,
    )
    engine = tight.llm_engine
    sent = _count_fork_diffs(engine)
    engine.add_request("long", PROMPT[::-1], SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True))
    engine.add_request("beam", PROMPT, BeamSearchParams(4, MAX_TOKENS).to_sampling_params())
    finals = {}
    while engine.has_unfinished_requests():
        finals.update((o.request_id, o) for o in engine.step() if o.finished)
    assert [list(c.token_ids) for c in finals["beam"].outputs] == expected
    assert engine.scheduler.num_preemptions > 0
    # Forks went to the runner as (parent, new tokens), and beams with outputs also went whole (a
    # preempted beam recomputing, or a fork whose parent was preempted).
    assert sent["forked"] > 0 and sent["whole"] > 0
    kv = engine.scheduler.kv_cache_manager
    assert kv.num_free_blocks == kv.num_blocks
    tight.shutdown()


def test_blocks_in_use_stay_within_prompt_plus_each_live_beam(host_ranked) -> None:
    """Ranked on the host, beams share their parents' blocks copy-on-write step by step."""
    llm = host_ranked["llama"]
    engine = llm.llm_engine
    sched = engine.scheduler
    kv = sched.kv_cache_manager
    bs = kv.block_size
    engine.add_request("b", PROMPT, BeamSearchParams(4, MAX_TOKENS).to_sampling_params())
    shared_any = False
    while engine.has_unfinished_requests():
        engine.step()
        beams = [r for r in sched.running.values() if r.is_beam]
        used = kv.num_blocks - kv.num_free_blocks
        # The prompt's full blocks once, then each live beam's own blocks (its copy of the partial one).
        bound = len(PROMPT) // bs + sum(-(-r.num_tokens // bs) - len(PROMPT) // bs for r in beams)
        assert used <= bound
        shared_any |= used < sum(len(kv.req_to_blocks.get(r.req_id, ())) for r in beams)
    assert shared_any  # beams did share blocks (a forked beam's table points at its parent's)
    assert kv.num_free_blocks == kv.num_blocks


@pytest.mark.parametrize("max_tokens", [MAX_TOKENS, 40])
def test_device_ranked_blocks_stay_within_prompt_plus_each_live_beam_and_a_tail(models, max_tokens) -> None:
    """Ranked on the device, each beam writes its token into one of two tails of its own in turn,
    and at each block boundary copies its parent's full tail into a fresh block; the copies no beam
    holds any more go back as the host replays each step. So a group holds the prompt's blocks and
    each live beam's own, plus one more tail per beam and the prompt's partial last block: at most
    width + 1 blocks more than the host's formula."""
    _, _, llm = models["llama"]
    engine = llm.llm_engine
    sched = engine.scheduler
    kv = sched.kv_cache_manager
    bs = kv.block_size
    width = 4
    params = BeamSearchParams(width, max_tokens, ignore_eos=True).to_sampling_params()
    engine.add_request("b", PROMPT, params)
    excess = []
    freed_copies = False
    while engine.has_unfinished_requests():
        engine.step()
        groups = list(sched._device_groups.values())
        if not groups:
            continue
        (group,) = groups
        # Every beam holds position tokens once the step in flight is done (the host's formula).
        own = width * (-(-group.position // bs) - len(PROMPT) // bs)
        used = kv.num_blocks - kv.num_free_blocks
        excess.append(used - (len(PROMPT) // bs + own))
        freed_copies |= len(group.copies) < width * (group.position // bs - len(PROMPT) // bs)
    # One more tail per beam, and the prompt's partial last block, which the beams copied (the
    # leader holds it): [5, 5, 5, 3, 2, ...] at max_tokens 8; negative later at 40, beams sharing blocks.
    assert excess and max(excess) == width + 1, excess
    if max_tokens == 40:  # 5 boundaries: beams died and their copies came back
        assert freed_copies
    assert kv.num_free_blocks == kv.num_blocks


def test_device_ranked_group_takes_blocks_from_host_ranked_requests(models) -> None:
    """12 blocks of 8: a 14-token request (2 blocks), the group's prompt (1), its 8 tails and its 4
    boundary copies at position 8 leave no room for the request to grow to 3 blocks beside the group:
    the request is the one preempted (it waits and recomputes), not the group; the beams are
    transformers' and every block comes back."""
    path, hf, _ = models["llama"]
    expected, _ = _transformers_beams(hf, 4, 1.0, False)
    tight = LLM(str(path), device="cpu", dtype="float32", block_size=8, num_kv_blocks=12)
    engine = tight.llm_engine
    handed = _count_device_groups(engine)
    long_params = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True)
    long_prompt = (PROMPT * 2)[::-1]
    engine.add_request("long", long_prompt, long_params)
    engine.add_request("beam", PROMPT, BeamSearchParams(4, MAX_TOKENS).to_sampling_params())
    finals = {}
    while engine.has_unfinished_requests():
        finals.update((o.request_id, o) for o in engine.step() if o.finished)
    assert handed == {"groups": 1}
    assert [list(c.token_ids) for c in finals["beam"].outputs] == expected
    assert engine.scheduler.num_preemptions > 0
    (alone,) = tight.generate([long_prompt], long_params, use_tqdm=False)
    assert list(finals["long"].outputs[0].token_ids) == list(alone.outputs[0].token_ids)
    kv = engine.scheduler.kv_cache_manager
    assert kv.num_free_blocks == kv.num_blocks
    tight.shutdown()


def test_mixed_requests_finished_or_aborted_free_every_block(models) -> None:
    _, _, llm = models["llama"]
    engine = llm.llm_engine
    beam = BeamSearchParams(4, MAX_TOKENS).to_sampling_params()
    engine.add_request("beam", PROMPT, beam)
    engine.add_request("beam-aborted", PROMPT[:5], beam)
    engine.add_request("n", PROMPT, SamplingParams(n=3, temperature=1.0, seed=1, max_tokens=6))
    engine.add_request(
        "best-of", PROMPT, SamplingParams(n=1, best_of=3, temperature=1.0, seed=2, max_tokens=6)
    )
    engine.add_request(
        "n-aborted", PROMPT, SamplingParams(n=2, temperature=1.0, max_tokens=50, ignore_eos=True)
    )
    finished = {}
    for i in range(200):
        if i == 3:
            engine.abort_request(["beam-aborted", "n-aborted"])
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = out
        if not engine.has_unfinished_requests():
            break
    assert sorted(finished) == ["beam", "best-of", "n"]
    assert len(finished["beam"].outputs) == 4
    kv = engine.scheduler.kv_cache_manager
    assert kv.num_free_blocks == kv.num_blocks
    assert not engine.scheduler.requests


def _beam_run(llm: LLM, params: SamplingParams) -> list:
    (out,) = llm.generate([PROMPT], params, use_tqdm=False)
    return out.outputs


@pytest.mark.parametrize("include", [False, True])
def test_a_stop_string_ends_a_hypothesis(models, include: bool) -> None:
    """A candidate whose last token completes a stop string is a finished hypothesis, its text cut
    before the string (or after it, with include_stop_str_in_output), stop_reason the string. No length
    penalty (0): a short finished hypothesis then outranks longer ones and is among those returned."""
    _, _, llm = models["llama"]
    tokenizer = llm.get_tokenizer()
    base = {
        "n": 2,
        "use_beam_search": True,
        "temperature": 0.0,
        "max_tokens": MAX_TOKENS,
        "length_penalty": 0.0,
    }
    free = _beam_run(llm, SamplingParams(**base))
    texts = [tokenizer.decode([t]).strip() for t in free[0].token_ids[1:]]
    stop = next(t for t in texts if len(t) >= 2)  # a piece of the best beam's text
    got = _beam_run(llm, SamplingParams(**base, stop=[stop], include_stop_str_in_output=include))
    stopped = [c for c in got if c.stop_reason == stop]
    assert stopped and all(c.finish_reason == "stop" for c in stopped)
    for c in got:
        full = tokenizer.decode(list(c.token_ids))
        if c in stopped:
            assert c.text.endswith(stop) if include else stop not in c.text
            assert full.startswith(c.text) and stop in full
        else:
            assert stop not in full


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"temperature": 0.7}, "temperature"),
        ({"top_p": 0.9}, "top_p"),
        ({"top_k": 5}, "top_k"),
        ({"min_p": 0.1}, "min_p"),
        ({"best_of": 3}, "best_of"),
        ({"logprobs": 2}, "logprobs"),
        ({"early_stopping": "sometimes"}, "early_stopping"),
    ],
)
def test_bad_beam_search_fields_are_named(fields: dict, param: str) -> None:
    base = {"n": 2, "use_beam_search": True, "temperature": 0.0, "max_tokens": 4}
    with pytest.raises(InvalidRequestError) as info:
        SamplingParams(**{**base, **fields})
    assert info.value.param == param


def test_beam_width_above_the_configured_maximum(models) -> None:
    _, _, llm = models["llama"]
    with pytest.raises(
        InvalidRequestError, match=r"at most 16 \(the server's max_beam_width\); got 17"
    ) as info:
        llm.beam_search([PROMPT], BeamSearchParams(17, 4))
    assert info.value.param == "n"
