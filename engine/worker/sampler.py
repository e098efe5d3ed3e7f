"""Turns one step's logits into token ids (and logprobs), vectorized over the batch.

Hot path, kept minimal on purpose. The order follows vLLM v1:

  1. logprobs from the RAW logits (log_softmax before any processing), for rows that asked;
  2. logit_bias (added), min_tokens (stop tokens masked while too few outputs), penalties
     (repetition over prompt+output, frequency and presence over output);
  3. greedy rows: argmax (first max, as transformers);
     random rows: temperature, top-k, top-p, min-p, then an exponential race (argmax of probs / E,
     E ~ Exponential(1)), which samples exactly from probs without a cumsum or a host sync; taken
     as argmax logits - log E (the same draw, no softmax), one kernel (the kernels' sample_argmax).

`build_sampling_metadata` does all host-side work once per step: per-row scalars travel to the device
as one packed tensor, token ids for penalties as one padded tensor, sparse edits (logit_bias,
min_tokens) as one index set. Stages no row needs are skipped entirely (decided by Python flags, so
skipping costs no device sync). `Sampler.sample` stays on the device (sampled ids and, when asked,
packed logprobs); the caller brings them to the host, in the engine with non-blocking copies
(engine.worker.step_in_flight), and `Sampler.to_output` turns them into Python values.

Seeded rows draw their noise from a counter-based hash of (seed, number of outputs so far) and the
column, and nothing else (the kernels' seeded_exponential_: one launch for every seeded row of the
step, no torch.Generator per row), so their tokens do not depend on which other requests
share the batch, and survive preemption.
"""

from __future__ import annotations

import array
import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from engine.core.sampling_params import SamplingParams
from engine.core.scheduler_output import TokenLogprobs
from ops import TORCH_KERNELS, Kernels

_SEED_MIX = 1_000_003


@dataclass(slots=True)
class SamplingRow:
    """One row of the batch, as the runner knows it."""

    params: SamplingParams
    prompt_token_ids: list[int]
    output_token_ids: list[int]  # outputs so far whose ids are known, before this step
    # Outputs sampled by a step still in flight (async scheduling): they count for seeds and
    # min_tokens. Rows with penalties need the ids themselves, so the runner waits for them first.
    num_pending_outputs: int = 0
    # What the metadata reads of `params`, worked out once a request (row_constants); None: now.
    constants: RowConstants | None = None

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids) + self.num_pending_outputs


@dataclass(slots=True)
class SamplingMetadata:
    """Everything the sampler needs for one step, already on the device. B = rows, V = vocab size."""

    num_rows: int
    vocab_size: int
    all_greedy: bool
    all_random: bool
    greedy_mask: Tensor | None  # [B] bool; None unless the batch mixes greedy and random rows
    temperature: Tensor | None  # [B, 1] fp32, 1.0 on greedy rows; None when no random row needs it
    top_k: Tensor | None  # [B, 1] int64, V where disabled; None when no row uses top-k
    top_p: Tensor | None  # [B, 1] fp32, inf where disabled; None when no row uses top-p
    min_p: Tensor | None  # [B, 1] fp32, 0 where disabled; None when no row uses min-p
    # Seeded random rows: their noise is a pure function of (key, column); the rest share the default
    # generator. S = number of seeded rows (known on the host, so no stage needs a device sync).
    num_seeded: int
    seeded_rows: Tensor | None  # [S] int64 row indices; None when S == 0
    seed_keys: Tensor | None  # [S] int64 in [0, 2**63): seed_for_step(seed, outputs so far); None when S == 0
    # Sparse additive edits: logit_bias entries and min_tokens masks (-inf), one index_put per step.
    edit_rows: Tensor | None  # [E] int64
    edit_token_ids: Tensor | None  # [E] int64
    edit_values: Tensor | None  # [E] fp32
    repetition_penalty: Tensor | None  # [B, 1] fp32, 1.0 where disabled; None when no row uses it
    frequency_penalty: Tensor | None  # [B, 1] fp32; None when no row uses frequency or presence
    presence_penalty: Tensor | None  # [B, 1] fp32; None when no row uses frequency or presence
    # Padded with V (a dummy column dropped after the scatter); empty rows for unpenalized requests.
    penalty_output_token_ids: Tensor | None  # [B, max_output_len] int64
    penalty_prompt_token_ids: Tensor | None  # [B, max_prompt_len] int64, only for repetition penalty
    # Logprobs: per-row N (None = not asked), the rows that asked, and the largest N among them.
    num_logprobs: list[int | None]
    logprob_rows: Tensor | None  # [L] int64; None when no row asked or when every row asked
    max_num_logprobs: int | None

    @property
    def no_penalties(self) -> bool:
        return self.repetition_penalty is None and self.frequency_penalty is None


@dataclass(slots=True)
class SamplerOutput:
    sampled_token_ids: list[int]  # [B]
    logprobs: list[TokenLogprobs | None]  # [B]; None for rows that did not ask


# The optional stages a row needs, as bits OR-ed over the batch.
_USES_TEMPERATURE, _USES_TOP_K, _USES_TOP_P, _USES_MIN_P, _USES_REPETITION, _USES_FREQ_PRES = (
    1,
    2,
    4,
    8,
    16,
    32,
)


@dataclass(frozen=True, slots=True)
class RowConstants:
    """What `build_sampling_metadata` reads of a row's SamplingParams, worked out once a request (its
    params never change; the runner keeps this on the request's state), so a step's per-row work is a
    tuple appended and a few flags, not ~15 attribute reads and comparisons."""

    greedy: bool
    # temperature, top_k, top_p, min_p, repetition, frequency, presence, as the packed tensor holds them
    # (sampling-only knobs neutral on greedy rows, top_k V where disabled, top_p inf where disabled)
    scalars: tuple[float, float, float, float, float, float, float]
    uses: int  # _USES_* bits
    seed: int | None  # a random row's seed (its noise key changes every step)
    edits: bool  # logit_bias or min_tokens: sparse edits, worked out every step
    logprobs: int | None


def row_constants(p: SamplingParams, vocab_size: int) -> RowConstants:
    """A row's constants (RowConstants) from its params, for a vocabulary of `vocab_size`."""
    greedy = p.greedy
    temp = 1.0 if greedy else p.temperature
    k = p.top_k if (not greedy and 0 < p.top_k < vocab_size) else vocab_size
    top_p = p.top_p if (not greedy and p.top_p < 1.0) else math.inf
    min_p = p.min_p if not greedy else 0.0
    uses = (
        (_USES_TEMPERATURE if temp != 1.0 else 0)
        | (_USES_TOP_K if k < vocab_size else 0)
        | (_USES_TOP_P if top_p < 1.0 else 0)
        | (_USES_MIN_P if min_p > 0.0 else 0)
        | (_USES_REPETITION if p.repetition_penalty != 1.0 else 0)
        | (_USES_FREQ_PRES if (p.frequency_penalty != 0.0 or p.presence_penalty != 0.0) else 0)
    )
    return RowConstants(
        greedy=greedy,
        # top_k as a float: exact in fp32 for any real vocabulary (< 2**24)
        scalars=(temp, float(k), top_p, min_p, p.repetition_penalty, p.frequency_penalty, p.presence_penalty),
        uses=uses,
        seed=p.seed if not greedy else None,
        edits=bool(p.logit_bias) or bool(p.min_tokens),
        logprobs=p.logprobs,
    )


def _to_device(t: Tensor, device: torch.device) -> Tensor:
    if device.type == "cpu":
        return t
    return t.pin_memory().to(device, non_blocking=True)


def _padded(rows: list[list[int]], pad: int) -> Tensor:
    width = max((len(r) for r in rows), default=0)
    out = torch.full((len(rows), max(width, 1)), pad, dtype=torch.int64)
    for i, r in enumerate(rows):
        if r:
            out[i, : len(r)] = torch.tensor(r, dtype=torch.int64)
    return out


def seed_for_step(seed: int, step: int) -> int:
    """The noise key of a seeded row at its `step`-th output: a fixed mix, no Python hash()."""
    return (seed * _SEED_MIX + step) % 2**63


def build_sampling_metadata(
    rows: list[SamplingRow], vocab_size: int, device: torch.device | str
) -> SamplingMetadata:
    device = torch.device(device)
    num_rows = len(rows)
    inf = math.inf

    greedy_flags: list[bool] = []
    scalars: list[float] = []  # [B * 7], row by row
    uses = 0
    seed_rows: list[int] = []
    seed_keys: list[int] = []
    edit_r: list[int] = []
    edit_t: list[int] = []
    edit_v: list[float] = []
    num_logprobs: list[int | None] = []
    for i, row in enumerate(rows):
        c = row.constants
        if c is None:
            c = row_constants(row.params, vocab_size)
        greedy_flags.append(c.greedy)
        scalars.extend(c.scalars)
        uses |= c.uses
        num_logprobs.append(c.logprobs)
        if c.seed is not None:
            seed_rows.append(i)
            seed_keys.append(seed_for_step(c.seed, row.num_output_tokens))
        if c.edits:
            p = row.params
            if p.logit_bias:
                for tok, bias in p.logit_bias.items():
                    if tok < vocab_size:
                        edit_r.append(i)
                        edit_t.append(tok)
                        edit_v.append(bias)
            if p.min_tokens and row.num_output_tokens < p.min_tokens:
                for tok in p.all_stop_token_ids:
                    if tok < vocab_size:
                        edit_r.append(i)
                        edit_t.append(tok)
                        edit_v.append(-inf)
    all_greedy = all(greedy_flags)
    all_random = not any(greedy_flags)
    use_temp = bool(uses & _USES_TEMPERATURE)
    use_top_k = bool(uses & _USES_TOP_K)
    use_top_p = bool(uses & _USES_TOP_P)
    use_min_p = bool(uses & _USES_MIN_P)
    use_rep = bool(uses & _USES_REPETITION)
    use_freq_pres = bool(uses & _USES_FREQ_PRES)

    # Per-row scalars, packed into one tensor: temperature, top_k, top_p, min_p, rep, freq, pres.
    # (array.array reads a list of floats ~8x faster than torch.tensor does: ~15 against ~125 us at 144 rows)
    packed = np.frombuffer(array.array("f", scalars), dtype=np.float32).reshape(num_rows, 7)  # [B, 7]
    scalars_t = _to_device(torch.from_numpy(packed.T.copy()), device)  # [7, B]
    col = scalars_t.unsqueeze(-1)  # [7, B, 1]

    greedy_mask = None
    if not all_greedy and not all_random:
        greedy_mask = _to_device(torch.tensor(greedy_flags, dtype=torch.bool), device)

    # The int64 per-row data (edit positions, seeded rows and their keys) travel as one tensor.
    edit_rows = edit_token_ids = edit_values = seeded_rows = seeded_keys = None
    num_edits, num_seeded = len(edit_r), len(seed_rows)
    if num_edits or num_seeded:
        ints = _to_device(torch.tensor(edit_r + edit_t + seed_rows + seed_keys, dtype=torch.int64), device)
        if num_edits:
            edit_rows, edit_token_ids = ints[:num_edits], ints[num_edits : 2 * num_edits]
            edit_values = _to_device(torch.tensor(edit_v, dtype=torch.float32), device)
        if num_seeded:
            seeds = ints[2 * num_edits :]
            seeded_rows, seeded_keys = seeds[:num_seeded], seeds[num_seeded:]

    # Token ids for penalties: only the rows that use them (others stay empty and neutral).
    out_ids = prompt_ids = None
    if use_rep or use_freq_pres:
        out_rows = [
            r.output_token_ids
            if (r.params.repetition_penalty != 1.0 or r.params.frequency_penalty or r.params.presence_penalty)
            else []
            for r in rows
        ]
        out_ids = _to_device(_padded(out_rows, vocab_size), device)
    if use_rep:
        prompt_rows = [r.prompt_token_ids if r.params.repetition_penalty != 1.0 else [] for r in rows]
        prompt_ids = _to_device(_padded(prompt_rows, vocab_size), device)

    asked_ns = [n for n in num_logprobs if n is not None]
    asked = [i for i, n in enumerate(num_logprobs) if n is not None]
    logprob_rows = None
    if asked and len(asked) < num_rows:
        logprob_rows = _to_device(torch.tensor(asked, dtype=torch.int64), device)

    return SamplingMetadata(
        num_rows=num_rows,
        vocab_size=vocab_size,
        all_greedy=all_greedy,
        all_random=all_random,
        greedy_mask=greedy_mask,
        temperature=col[0] if (use_temp and not all_greedy) else None,
        top_k=col[1].to(torch.int64) if use_top_k else None,
        top_p=col[2] if use_top_p else None,
        min_p=col[3] if use_min_p else None,
        num_seeded=num_seeded,
        seeded_rows=seeded_rows,
        seed_keys=seeded_keys,
        edit_rows=edit_rows,
        edit_token_ids=edit_token_ids,
        edit_values=edit_values,
        repetition_penalty=col[4] if use_rep else None,
        frequency_penalty=col[5] if use_freq_pres else None,
        presence_penalty=col[6] if use_freq_pres else None,
        penalty_output_token_ids=out_ids,
        penalty_prompt_token_ids=prompt_ids,
        num_logprobs=num_logprobs,
        logprob_rows=logprob_rows,
        max_num_logprobs=max(asked_ns) if asked_ns else None,
    )


# ---------------------------------------------------------------------------- processing stages
def _token_counts(token_ids: Tensor, vocab_size: int) -> Tensor:
    """[B, W] ids padded with V -> [B, V] occurrence counts (fp32)."""
    counts = torch.zeros(token_ids.shape[0], vocab_size + 1, dtype=torch.float32, device=token_ids.device)
    counts.scatter_add_(1, token_ids, torch.ones_like(token_ids, dtype=torch.float32))
    return counts[:, :vocab_size]


def apply_penalties(logits: Tensor, md: SamplingMetadata) -> Tensor:
    """Repetition (prompt or output; divide positive logits, multiply negative ones), then frequency
    and presence (output only). Returns a new tensor; `logits` is not modified."""
    vocab_size = logits.shape[-1]
    output_counts = None
    if md.penalty_output_token_ids is not None:
        output_counts = _token_counts(md.penalty_output_token_ids, vocab_size)  # [B, V]
    if md.repetition_penalty is not None:
        assert output_counts is not None and md.penalty_prompt_token_ids is not None
        seen = (_token_counts(md.penalty_prompt_token_ids, vocab_size) > 0) | (output_counts > 0)
        rep = md.repetition_penalty
        penalized = torch.where(logits > 0, logits / rep, logits * rep)
        logits = torch.where(seen, penalized, logits)
    if md.frequency_penalty is not None:
        assert output_counts is not None and md.presence_penalty is not None
        logits = logits - md.frequency_penalty * output_counts - md.presence_penalty * (output_counts > 0)
    return logits


def apply_top_k_top_p(logits: Tensor, top_k: Tensor | None, top_p: Tensor | None) -> Tensor:
    """Mask to -inf everything outside the top-k, then outside the smallest set whose cumulative
    probability reaches top_p (the most likely token always stays). Returns a new tensor."""
    sorted_logits, sorted_idx = logits.sort(dim=-1, descending=True)  # [B, V]
    if top_k is not None:
        positions = torch.arange(logits.shape[-1], device=logits.device)
        sorted_logits.masked_fill_(positions >= top_k, -math.inf)
    if top_p is not None:
        probs = sorted_logits.softmax(dim=-1)
        # Drop a token when the more likely tokens before it already reach top_p.
        drop = (probs.cumsum(dim=-1) - probs) >= top_p
        drop[:, 0] = False
        sorted_logits.masked_fill_(drop, -math.inf)
    return torch.empty_like(logits).scatter_(-1, sorted_idx, sorted_logits)


def apply_min_p(logits: Tensor, min_p: Tensor) -> Tensor:
    """Drop tokens whose probability is below min_p * the top probability (a logit-space test, so no
    softmax is needed). Rows with min_p == 0 are untouched (log 0 = -inf)."""
    threshold = logits.amax(dim=-1, keepdim=True) + torch.log(min_p)
    return logits.masked_fill(logits < threshold, -math.inf)


def process_logits(logits: Tensor, md: SamplingMetadata) -> Tensor:
    """logit_bias, min_tokens, penalties: the stages shared by greedy and random rows. `logits` is
    never modified; the result may be `logits` itself when no stage applies."""
    if md.edit_rows is not None:
        assert md.edit_token_ids is not None and md.edit_values is not None
        logits = logits.index_put((md.edit_rows, md.edit_token_ids), md.edit_values, accumulate=True)
    if not md.no_penalties:
        logits = apply_penalties(logits, md)
    return logits


def _sample_random(logits: Tensor, md: SamplingMetadata, kernels: Kernels) -> Tensor:
    if md.temperature is not None:
        logits = logits / md.temperature
    if md.top_k is not None or md.top_p is not None:
        logits = apply_top_k_top_p(logits, md.top_k, md.top_p)
    if md.min_p is not None:
        logits = apply_min_p(logits, md.min_p)
    noise = torch.empty(logits.shape, dtype=torch.float32, device=logits.device)  # [B, V]
    if md.num_seeded < md.num_rows:  # some row draws from the default generator
        noise.exponential_()
    if md.seeded_rows is not None:
        assert md.seed_keys is not None
        kernels.seeded_exponential_(noise, md.seeded_rows, md.seed_keys)
    # argmax softmax(logits) / noise, as argmax logits - log noise: no softmax over the vocabulary, and
    # on a GPU one pass over logits and noise (ops.reference.sample_argmax says why they agree).
    return kernels.sample_argmax(logits, noise)


# ---------------------------------------------------------------------------- logprobs
def _rank_and_top(
    logprobs: Tensor, chosen: Tensor, num_top: int
) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """logprobs [R, V], chosen [R] -> chosen logprob [R], 1-based rank [R], top-N values and ids."""
    chosen_lp = logprobs.gather(-1, chosen.unsqueeze(-1)).squeeze(-1)
    # Best rank among ties, so the argmax token is always rank 1.
    rank = (logprobs > chosen_lp.unsqueeze(-1)).sum(dim=-1) + 1
    if num_top > 0:
        top = logprobs.topk(num_top, dim=-1)
        return chosen_lp, rank, top.values, top.indices
    return chosen_lp, rank, logprobs.new_empty(logprobs.shape[0], 0), None


def _pack(chosen_lp: Tensor, rank: Tensor, top_vals: Tensor, top_ids: Tensor | None) -> Tensor:
    """Everything a host needs in one tensor, for one transfer: [R, 2 + 2N] float64 (ids and ranks
    are exact in float64)."""
    parts = [chosen_lp.double().unsqueeze(-1), rank.double().unsqueeze(-1), top_vals.double()]
    if top_ids is not None:
        parts.append(top_ids.double())
    return torch.cat(parts, dim=-1)


def _unpack(row: list[float], chosen: int, num_top: int, width: int) -> TokenLogprobs:
    return TokenLogprobs(
        token_ids=[int(x) for x in row[2 + width : 2 + width + num_top]],
        logprobs=row[2 : 2 + num_top],
        chosen_token_id=chosen,
        chosen_logprob=row[0],
        chosen_rank=int(row[1]),
    )


def compute_prompt_logprobs(logits: Tensor, target_token_ids: list[int], num_top: int) -> list[TokenLogprobs]:
    """logits [T, V] fp32 at T prompt positions; target_token_ids [T]: the token each position scores."""
    if not target_token_ids:
        return []
    logprobs = torch.log_softmax(logits.float(), dim=-1)  # [T, V]
    targets = torch.tensor(target_token_ids, dtype=torch.int64).to(logits.device, non_blocking=True)
    packed = _pack(*_rank_and_top(logprobs, targets, num_top)).tolist()
    return [_unpack(row, tok, num_top, num_top) for row, tok in zip(packed, target_token_ids, strict=True)]


# ---------------------------------------------------------------------------- the sampler
class Sampler:
    def __init__(self, kernels: Kernels = TORCH_KERNELS) -> None:
        # The engine's kernels (the attention backend's choice): the seeded rows' noise is one of them.
        self.kernels = kernels

    def __call__(self, logits: Tensor, md: SamplingMetadata) -> SamplerOutput:
        """Sample and bring the results to the host (blocks until the device is done)."""
        sampled, packed = self.sample(logits, md)
        return self.to_output(sampled.tolist(), packed.tolist() if packed is not None else [], md)

    def sample(self, logits: Tensor, md: SamplingMetadata) -> tuple[Tensor, Tensor | None]:
        """Device side only, no host sync: logits [B, V] fp32 -> sampled ids [B] int64 and, when some
        row asked for logprobs, their packed logprobs [L, 2 + 2N] float64 (see `to_output`)."""
        raw_logprobs = torch.log_softmax(logits, dim=-1) if md.max_num_logprobs is not None else None

        logits = process_logits(logits, md)
        if md.all_greedy:  # torch's argmax: one launch either way, and torch's costs less host time
            sampled = logits.argmax(dim=-1)
        elif md.all_random:
            sampled = _sample_random(logits, md, self.kernels)
        else:
            assert md.greedy_mask is not None
            sampled = torch.where(
                md.greedy_mask, logits.argmax(dim=-1), _sample_random(logits, md, self.kernels)
            )

        packed = None
        if raw_logprobs is not None:
            assert md.max_num_logprobs is not None
            chosen = sampled
            if md.logprob_rows is not None:
                raw_logprobs = raw_logprobs.index_select(0, md.logprob_rows)
                chosen = sampled.index_select(0, md.logprob_rows)
            packed = _pack(*_rank_and_top(raw_logprobs, chosen, md.max_num_logprobs))
        return sampled, packed

    @staticmethod
    def to_output(
        sampled_ids: list[int],
        packed: list[list[float]],
        md: SamplingMetadata,
        skip: frozenset[int] | set[int] = frozenset(),
    ) -> SamplerOutput:
        """Host side: the sampled ids [B] and packed logprob rows [L] from `sample`, as Python values.
        Rows in `skip` (beams, whose candidates travel as arrays) get no TokenLogprobs; `packed` may
        then be empty if only they asked."""
        logprobs: list[TokenLogprobs | None] = [None] * md.num_rows
        if md.max_num_logprobs is None:  # no row asked for logprobs (the common step)
            return SamplerOutput(sampled_token_ids=sampled_ids, logprobs=logprobs)
        j = 0
        for i, n in enumerate(md.num_logprobs):
            if n is not None:
                if i not in skip:
                    logprobs[i] = _unpack(packed[j], sampled_ids[i], n, md.max_num_logprobs or 0)
                j += 1
        return SamplerOutput(sampled_token_ids=sampled_ids, logprobs=logprobs)

    @staticmethod
    def packed_rows(md: SamplingMetadata, rows: list[int]) -> list[int]:
        """The rows of `sample`'s packed logprobs that hold batch rows `rows` (which asked for them)."""
        if md.logprob_rows is None:  # every row asked: the same order
            return rows
        packed_of = []
        j = 0
        for n in md.num_logprobs:
            packed_of.append(j)
            j += n is not None
        return [packed_of[i] for i in rows]
