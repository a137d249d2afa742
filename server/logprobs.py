"""Response pieces: OpenAI ``logprobs`` (chat and completions), vLLM-style ``prompt_logprobs``,
the echoed prompt's logprobs, ``usage``, and a choice accumulated from deltas."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from vllm.outputs import CompletionOutput, RequestOutput

if TYPE_CHECKING:
    from server.state import AppState


def _finite(x: float) -> float:
    return x if math.isfinite(x) else -9999.0


def _token_text(state: AppState, token_id: int, decoded: str | None) -> str:
    return decoded if decoded is not None else state.tokenizer.decode([token_id])


def _top_k(state: AppState, pos: dict[int, Any], k: int) -> list[tuple[str, float]]:
    """The top-k alternatives at one position, by rank: (token, logprob)."""
    top = sorted((lp for lp in pos.items() if lp[1].rank is not None and lp[1].rank <= k),
                 key=lambda item: item[1].rank)[:k]
    return [(_token_text(state, tid, lp.decoded_token), _finite(lp.logprob)) for tid, lp in top]


def _positions(state: AppState, o: CompletionOutput, k: int) -> list[tuple[str, float, list[tuple[str, float]]]]:
    """Per generated token of ``o``: (token, logprob, top-k alternatives by rank)."""
    result = []
    for token_id, pos in zip(o.token_ids, o.logprobs or []):
        chosen = pos[token_id]
        result.append((_token_text(state, token_id, chosen.decoded_token), _finite(chosen.logprob),
                       _top_k(state, pos, k)))
    return result


def chat_logprobs(state: AppState, o: CompletionOutput, k: int) -> list[dict[str, Any]]:
    """OpenAI chat ``logprobs.content`` items for the tokens of ``o``."""
    return [
        {"token": tok, "logprob": lp, "bytes": list(tok.encode()),
         "top_logprobs": [{"token": t, "logprob": v, "bytes": list(t.encode())} for t, v in top]}
        for tok, lp, top in _positions(state, o, k)
    ]


def completion_logprobs(state: AppState, o: CompletionOutput, k: int, offset: int) -> dict[str, Any]:
    """OpenAI completions ``logprobs`` for the tokens of ``o``; offsets continue from ``offset``."""
    tokens, token_lps, tops, offsets = [], [], [], []
    for tok, lp, top in _positions(state, o, k):
        tokens.append(tok)
        token_lps.append(lp)
        tops.append(dict(top))
        offsets.append(offset)
        offset += len(tok)
    return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops, "text_offset": offsets}


@dataclass
class Choice:
    """A choice accumulated from deltas (non-streamed responses)."""

    text: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[Any] = field(default_factory=list)
    finish_reason: str | None = None


def echo_logprobs(state: AppState, prompt_ids: list[int], out: RequestOutput,
                  k: int) -> dict[str, list[Any]] | None:
    """OpenAI completions ``logprobs`` of the prompt tokens (``echo``): the first token has no
    logprob (nothing precedes it), as OpenAI reports it; offsets start at 0."""
    if out.prompt_logprobs is None:
        return None
    tokens, token_lps, tops, offsets = [], [], [], []
    offset = 0
    for token_id, pos in zip(prompt_ids, out.prompt_logprobs):
        tok = state.tokenizer.decode([token_id])
        if pos is None or token_id not in pos:
            token_lps.append(None)
            tops.append(None)
        else:
            token_lps.append(_finite(pos[token_id].logprob))
            tops.append(dict(_top_k(state, pos, k)))
        tokens.append(tok)
        offsets.append(offset)
        offset += len(tok)
    return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops, "text_offset": offsets}


def prompt_logprobs(state: AppState, out: RequestOutput) -> list[dict[str, Any] | None] | None:
    """vLLM-style ``prompt_logprobs``: per prompt position None or {token_id: {logprob, rank, ...}}."""
    if out.prompt_logprobs is None:
        return None
    return [
        None if pos is None else {
            str(tid): {"logprob": _finite(lp.logprob), "rank": lp.rank,
                       "decoded_token": _token_text(state, tid, lp.decoded_token)}
            for tid, lp in pos.items()}
        for pos in out.prompt_logprobs
    ]


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}
