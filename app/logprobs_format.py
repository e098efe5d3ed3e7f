"""Logprobs in the two OpenAI shapes: the legacy completions one (tokens, token_logprobs, top_logprobs,
text_offset) and chat's (content: one entry per token with its top alternatives and bytes).
"""

from __future__ import annotations

from collections.abc import Sequence

from app.protocol import ChatLogprobToken, CompletionLogprobs, TopLogprob
from app.state import AppState
from engine.outputs.request_output import Logprob


def _ranked(position: dict[int, Logprob]) -> list[tuple[int, Logprob]]:
    return sorted(
        position.items(), key=lambda kv: (kv[1].rank if kv[1].rank is not None else 1 << 30, -kv[1].logprob)
    )


def _text(state: AppState, token_id: int, lp: Logprob | None) -> str:
    if lp is not None and lp.decoded_token is not None:
        return lp.decoded_token
    return state.token_text(token_id)


def completion_logprobs(
    state: AppState,
    token_ids: Sequence[int],
    positions: Sequence[dict[int, Logprob] | None],
    text_offset: int,
) -> tuple[CompletionLogprobs, int]:
    """Legacy completions logprobs for `token_ids`; returns it and the text offset after it."""
    result = CompletionLogprobs(text_offset=[], token_logprobs=[], tokens=[], top_logprobs=[])
    for tid, pos in zip(token_ids, positions, strict=False):
        lp = pos.get(tid) if pos else None
        text = _text(state, tid, lp)
        result.tokens.append(text)
        result.token_logprobs.append(lp.logprob if lp is not None else None)
        result.top_logprobs.append(
            {_text(state, t, p): p.logprob for t, p in _ranked(pos)} if pos is not None else None
        )
        result.text_offset.append(text_offset)
        text_offset += len(text)
    for tid in token_ids[len(positions) :]:  # no logprobs for these (prompt without prompt_logprobs)
        text = state.token_text(tid)
        result.tokens.append(text)
        result.token_logprobs.append(None)
        result.top_logprobs.append(None)
        result.text_offset.append(text_offset)
        text_offset += len(text)
    return result, text_offset


def chat_logprobs(
    state: AppState, token_ids: Sequence[int], positions: Sequence[dict[int, Logprob]], top_n: int
) -> list[ChatLogprobToken]:
    out = []
    for tid, pos in zip(token_ids, positions, strict=False):
        lp = pos.get(tid)
        text = _text(state, tid, lp)
        top = [
            TopLogprob(token=(t := _text(state, k, p)), logprob=p.logprob, bytes=list(t.encode()))
            for k, p in _ranked(pos)[:top_n]
        ]
        out.append(
            ChatLogprobToken(
                token=text,
                logprob=lp.logprob if lp is not None else -9999.0,
                bytes=list(text.encode()),
                top_logprobs=top,
            )
        )
    return out


def concat_logprobs(a: CompletionLogprobs, b: CompletionLogprobs) -> CompletionLogprobs:
    return CompletionLogprobs(
        text_offset=a.text_offset + b.text_offset,
        token_logprobs=a.token_logprobs + b.token_logprobs,
        tokens=a.tokens + b.tokens,
        top_logprobs=a.top_logprobs + b.top_logprobs,
    )
