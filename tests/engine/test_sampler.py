"""Sampler behaviour a user notices: greedy parity, reproducible seeds, filters that hold, penalties and
logprobs exactly as defined (vLLM's order: logprobs from raw logits, then bias/min_tokens/penalties,
then temperature/top-k/top-p/min-p)."""

from __future__ import annotations

import math

import pytest
import torch

from engine.core.sampling_params import SamplingParams
from engine.worker.sampler import (
    Sampler,
    SamplingRow,
    build_sampling_metadata,
    compute_prompt_logprobs,
    process_logits,
    seed_for_step,
)

V = 64
sampler = Sampler()


def row(prompt: list[int] | None = None, output: list[int] | None = None, **kw) -> SamplingRow:
    kw.setdefault("max_tokens", None)
    return SamplingRow(SamplingParams(**kw), list(prompt or []), list(output or []))


def sample(logits: torch.Tensor, rows: list[SamplingRow]):
    return sampler(logits, build_sampling_metadata(rows, logits.shape[-1], "cpu"))


def draws(logits_row: torch.Tensor, n: int, **kw) -> set[int]:
    """Tokens sampled from `n` copies of one row in a single batch."""
    logits = logits_row.unsqueeze(0).repeat(n, 1)
    return set(sample(logits, [row(**kw) for _ in range(n)]).sampled_token_ids)


# ---------------------------------------------------------------------------- greedy
def test_greedy_is_argmax_with_first_max_on_ties() -> None:
    torch.manual_seed(0)
    logits = torch.randn(5, V)
    logits[3, 7] = logits[3, 11] = 100.0  # tie: the first one wins, as transformers' argmax
    out = sample(logits, [row(temperature=0.0) for _ in range(5)])
    assert out.sampled_token_ids == logits.argmax(-1).tolist()
    assert out.sampled_token_ids[3] == 7
    assert out.logprobs == [None] * 5


def test_mixed_batch_greedy_rows_stay_argmax() -> None:
    torch.manual_seed(1)
    logits = torch.randn(6, V)
    rows = [row(temperature=0.0) if i % 2 == 0 else row(temperature=1.5) for i in range(6)]
    for _ in range(5):
        ids = sample(logits, rows).sampled_token_ids
        assert [ids[i] for i in (0, 2, 4)] == logits[[0, 2, 4]].argmax(-1).tolist()


# ---------------------------------------------------------------------------- seeds
def test_seeded_row_is_independent_of_batch_and_repeatable() -> None:
    torch.manual_seed(2)
    target = torch.randn(V)
    seeded = dict(temperature=1.0, seed=1234)
    alone = [
        sample(target.unsqueeze(0), [row(output=[0] * step, **seeded)]).sampled_token_ids[0]
        for step in range(20)
    ]
    for trial in range(3):
        others = torch.randn(4, V)
        batched = []
        for step in range(20):
            logits = torch.cat([others[:2], target.unsqueeze(0), others[2:]])
            rows = [row(temperature=0.8), row(temperature=1.2, seed=trial)]
            rows += [row(output=[0] * step, **seeded), row(temperature=0.0), row(temperature=1.0, top_k=5)]
            batched.append(sample(logits, rows).sampled_token_ids[2])
        assert batched == alone
    # The draw changes with the step, so a seeded request is not stuck on one token.
    assert len(set(alone)) > 1


def test_seeded_rows_keep_their_draws_next_to_logit_bias_and_min_tokens() -> None:
    # Edits and seeded rows travel to the device in one int64 tensor: each must land on its own row.
    torch.manual_seed(7)
    logits = torch.randn(4, V)
    logits[2, 1] = 50.0  # the stop token min_tokens holds back, overwhelmingly likely
    odd_only = {t: -100.0 for t in range(0, V, 2)}
    for step in range(4):
        rows = [
            row(temperature=1.0, logit_bias={3: 100.0}),
            row(seed=11, output=[0] * step, logit_bias=odd_only),
            row(seed=12, output=[0] * step, min_tokens=5, stop_token_ids=[1]),
            row(temperature=0.0),
        ]
        ids = sample(logits, rows).sampled_token_ids
        assert ids[0] == 3 and ids[1] % 2 == 1 and ids[2] != 1 and ids[3] == int(logits[3].argmax())
        assert ids[1] == sample(logits[1:2], [rows[1]]).sampled_token_ids[0]
        assert ids[2] == sample(logits[2:3], [rows[2]]).sampled_token_ids[0]
        md = build_sampling_metadata(rows, V, "cpu")
        assert md.num_seeded == 2 and md.seeded_rows is not None and md.seed_keys is not None
        assert md.seeded_rows.tolist() == [1, 2]
        assert md.seed_keys.tolist() == [seed_for_step(11, step), seed_for_step(12, step)]


def test_different_seeds_differ_on_flat_distribution() -> None:
    logits = torch.zeros(1, V)
    tokens = {sample(logits, [row(seed=s)]).sampled_token_ids[0] for s in range(64)}
    assert len(tokens) > 20  # 64 draws from 64 equally likely tokens hit ~40 distinct ones


def test_unseeded_sampling_follows_the_distribution() -> None:
    probs = torch.tensor([0.6, 0.3, 0.1] + [0.0] * (V - 3))
    logits = probs.log()
    n = 6000
    ids = torch.tensor(sample(logits.unsqueeze(0).repeat(n, 1), [row() for _ in range(n)]).sampled_token_ids)
    freq = torch.bincount(ids, minlength=V).float() / n
    assert set(ids.tolist()) <= {0, 1, 2}
    assert torch.allclose(freq[:3], probs[:3], atol=0.03)


# ---------------------------------------------------------------------------- filters
def test_top_k_never_samples_outside_the_top_k() -> None:
    torch.manual_seed(3)
    logits = torch.randn(V) * 0.1  # nearly flat: without the filter everything would appear
    allowed = set(logits.topk(4).indices.tolist())
    got = draws(logits, 2000, top_k=4)
    assert got == allowed


def test_top_p_keeps_the_smallest_set_reaching_p() -> None:
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05] + [0.0] * (V - 4))
    logits = probs.clamp_min(1e-30).log()
    assert draws(logits, 2000, top_p=0.75) == {0, 1}  # 0.5 < 0.75 <= 0.8
    assert draws(logits, 2000, top_p=0.81) == {0, 1, 2}
    assert draws(logits, 500, top_p=0.3) == {0}  # the top token is always kept


def test_min_p_drops_tokens_below_a_fraction_of_the_top() -> None:
    probs = torch.tensor([0.4, 0.3, 0.1, 0.1, 0.05, 0.05] + [0.0] * (V - 6))
    logits = probs.clamp_min(1e-30).log()
    assert draws(logits, 2000, min_p=0.5) == {0, 1}  # threshold 0.2
    assert draws(logits, 3000, min_p=0.2) == {0, 1, 2, 3}  # threshold 0.08


def test_filters_combine_per_row() -> None:
    torch.manual_seed(4)
    base = torch.randn(V) * 0.1
    n = 300
    logits = base.unsqueeze(0).repeat(3 * n, 1)
    rows = [row(top_k=2), row(top_k=0), row(temperature=0.0)] * n
    ids = sample(logits, rows).sampled_token_ids
    assert set(ids[0::3]) == set(base.topk(2).indices.tolist())
    assert len(set(ids[1::3])) > 10
    assert set(ids[2::3]) == {int(base.argmax())}


# ---------------------------------------------------------------------------- logit processing
def processed(logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
    return process_logits(logits, build_sampling_metadata(rows, logits.shape[-1], "cpu"))


def test_repetition_penalty_divides_positive_and_multiplies_negative_seen_logits() -> None:
    logits = torch.tensor([[2.0, -2.0, 3.0, -1.0, 4.0, 1.0]])
    out = processed(logits, [row(prompt=[0, 1], output=[2, 3, 3], repetition_penalty=2.0)])
    assert out.tolist() == [[1.0, -4.0, 1.5, -2.0, 4.0, 1.0]]


def test_frequency_and_presence_penalties_count_output_tokens_only() -> None:
    logits = torch.zeros(1, 6)
    out = processed(
        logits, [row(prompt=[4, 4, 5], output=[1, 2, 2, 2], frequency_penalty=0.5, presence_penalty=0.25)]
    )
    assert out.tolist() == [[0.0, -0.75, -1.75, 0.0, 0.0, 0.0]]


def test_penalties_apply_per_row_and_leave_input_untouched() -> None:
    logits = torch.ones(2, 4)
    rows = [row(output=[1, 1], frequency_penalty=1.0), row(output=[1, 1], prompt=[2])]
    out = processed(logits, rows)
    assert out.tolist() == [[1.0, -1.0, 1.0, 1.0], [1.0, 1.0, 1.0, 1.0]]
    assert logits.tolist() == [[1.0] * 4] * 2


def test_logit_bias_makes_a_token_certain() -> None:
    torch.manual_seed(5)
    logits = torch.randn(1, V)
    assert draws(logits[0], 500, temperature=1.0, logit_bias={17: 100.0}) == {17}
    assert sample(logits, [row(temperature=0.0, logit_bias={17: 100.0})]).sampled_token_ids == [17]
    banned = int(logits.argmax())
    assert sample(logits, [row(temperature=0.0, logit_bias={banned: -100.0})]).sampled_token_ids != [banned]


def test_min_tokens_blocks_stop_tokens_until_reached() -> None:
    logits = torch.zeros(1, V)
    logits[0, 2] = 50.0  # eos overwhelmingly likely

    def params_row(num_outputs: int, **kw) -> SamplingRow:
        r = row(output=[5] * num_outputs, min_tokens=3, stop_token_ids=[9], **kw)
        r.params.all_stop_token_ids |= {2}  # what the engine adds for eos
        return r

    for n in range(3):
        r = params_row(n, temperature=0.0)
        assert sample(logits, [r]).sampled_token_ids != [2]
        out = processed(logits, [r])
        assert out[0, 2] == -math.inf and out[0, 9] == -math.inf
    assert sample(logits, [params_row(3, temperature=0.0)]).sampled_token_ids == [2]
    assert 2 not in draws(logits[0], 300, min_tokens=3, stop_token_ids=[2])


# ---------------------------------------------------------------------------- logprobs
def test_logprobs_come_from_raw_logits_with_ranks_and_top_n() -> None:
    torch.manual_seed(6)
    logits = torch.randn(3, V)
    raw = torch.log_softmax(logits, dim=-1)
    rows = [
        row(temperature=0.0, logprobs=3, logit_bias={10: 50.0}),  # processing must not leak into logprobs
        row(temperature=0.0),
        row(temperature=1.0, logprobs=0, seed=7),
    ]
    out = sample(logits, rows)
    assert out.sampled_token_ids[0] == 10
    assert out.logprobs[1] is None

    lp0 = out.logprobs[0]
    assert lp0 is not None
    assert lp0.chosen_token_id == 10
    assert lp0.chosen_logprob == pytest.approx(raw[0, 10].item(), abs=1e-6)
    assert lp0.chosen_rank == int((raw[0] > raw[0, 10]).sum()) + 1
    top = raw[0].topk(3)
    assert lp0.token_ids == top.indices.tolist()
    assert lp0.logprobs == pytest.approx(top.values.tolist(), abs=1e-6)
    assert lp0.logprobs == sorted(lp0.logprobs, reverse=True)

    lp2 = out.logprobs[2]
    assert lp2 is not None
    tok = out.sampled_token_ids[2]
    assert lp2.token_ids == [] and lp2.logprobs == []
    assert lp2.chosen_token_id == tok
    assert lp2.chosen_logprob == pytest.approx(raw[2, tok].item(), abs=1e-6)
    assert lp2.chosen_rank == int((raw[2] > raw[2, tok]).sum()) + 1


def test_greedy_token_has_rank_one_and_different_n_per_row() -> None:
    torch.manual_seed(7)
    logits = torch.randn(2, V)
    out = sample(logits, [row(temperature=0.0, logprobs=1), row(temperature=0.0, logprobs=5)])
    a, b = out.logprobs
    assert a is not None and b is not None
    assert a.chosen_rank == 1 and b.chosen_rank == 1
    assert len(a.token_ids) == 1 and len(b.token_ids) == 5
    assert a.token_ids[0] == out.sampled_token_ids[0]


def test_prompt_logprobs() -> None:
    torch.manual_seed(8)
    logits = torch.randn(4, V)
    targets = [3, 9, 0, int(logits[3].argmax())]
    raw = torch.log_softmax(logits, dim=-1)
    out = compute_prompt_logprobs(logits, targets, num_top=2)
    assert len(out) == 4
    for i, (lp, t) in enumerate(zip(out, targets, strict=True)):
        assert lp.chosen_token_id == t
        assert lp.chosen_logprob == pytest.approx(raw[i, t].item(), abs=1e-6)
        assert lp.chosen_rank == int((raw[i] > raw[i, t]).sum()) + 1
        assert lp.token_ids == raw[i].topk(2).indices.tolist()
    assert out[3].chosen_rank == 1
    assert compute_prompt_logprobs(logits, [], 2) == []
    assert compute_prompt_logprobs(logits[:1], [5], 0)[0].token_ids == []


# ---------------------------------------------------------------------------- stage skipping
def test_metadata_skips_stages_no_row_needs() -> None:
    md = build_sampling_metadata([row(temperature=0.0, top_k=5, top_p=0.5, min_p=0.2, seed=3)], V, "cpu")
    assert md.all_greedy and md.temperature is None and md.top_k is None and md.top_p is None
    assert (
        md.min_p is None
        and md.num_seeded == 0
        and md.seeded_rows is None
        and md.no_penalties
        and md.edit_rows is None
    )
    assert md.max_num_logprobs is None
    md = build_sampling_metadata([row(), row(top_k=V + 10, top_p=1.0)], V, "cpu")
    assert md.all_random and md.temperature is None and md.top_k is None and md.top_p is None


def test_metadata_from_row_constants_is_the_same_as_from_params() -> None:
    """The runner keeps each request's row_constants and passes them in: the metadata is field for field
    what the params alone give, over rows that switch every stage on (seeds and min_tokens move with the
    outputs so far, so they are worked out every step either way)."""
    import dataclasses

    from engine.worker.sampler import row_constants

    rows = [
        row(temperature=0.0, top_k=5, logprobs=2),
        row(temperature=0.7, top_k=8, top_p=0.9, seed=11, output=[1, 2]),
        row(min_p=0.1, repetition_penalty=1.2, prompt=[3, 4], output=[5]),
        row(frequency_penalty=0.5, presence_penalty=0.25, logit_bias={7: 3.0, V + 1: 1.0}, output=[6]),
        row(min_tokens=4, stop_token_ids=[9], output=[1], logprobs=0),
    ]
    cached = [dataclasses.replace(r, constants=row_constants(r.params, V)) for r in rows]
    plain, fast = build_sampling_metadata(rows, V, "cpu"), build_sampling_metadata(cached, V, "cpu")
    for field in dataclasses.fields(plain):
        a, b = getattr(plain, field.name), getattr(fast, field.name)
        if isinstance(a, torch.Tensor):
            assert torch.equal(a, b), field.name
        else:
            assert a == b, field.name
    assert plain.temperature is not None and plain.temperature.flatten().tolist() == pytest.approx(
        [1.0, 0.7, 1.0, 1.0, 1.0]
    )
    assert plain.num_seeded == 1 and plain.edit_rows is not None and plain.edit_rows.tolist() == [3, 4]
