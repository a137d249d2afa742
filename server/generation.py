"""One request's life in the engine: prompt → SamplingParams → (slot) → engine stream → metrics.

The engine always streams deltas (``RequestOutputKind.DELTA``) so TTFT and inter-token latency are
measured the same way for streamed and non-streamed responses. Whatever ends the iteration early
(client gone, error, cancellation) aborts the engine request in :func:`run`'s ``finally``.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from server import vllm_env  # noqa: F401
from server.errors import CapacityExceeded, ContextTooLong, InvalidRequest, SteeringUnavailable
from server.protocol import ChatCompletionRequest, CompletionRequest
from server.structured import structured_outputs, token_biases
from steering.readouts import READOUT_DROPPED
from vllm import SamplingParams
from vllm.exceptions import VLLMValidationError
from vllm.inputs import TokensPrompt
from vllm.outputs import CompletionOutput, RequestOutput
from vllm.sampling_params import RequestOutputKind

if TYPE_CHECKING:
    from server.state import AppState
    from server.steering_limits import Held
    from steering.request import CompiledSteering

logger = logging.getLogger(__name__)

GenerationRequest = ChatCompletionRequest | CompletionRequest


@dataclass
class Job:
    """A validated request, ready for the engine."""

    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    compiled: CompiledSteering | None
    arrival: float = field(default_factory=time.monotonic)
    prompt_logprobs: list[dict[str, Any] | None] | None = None  # filled from the first output
    captured: list[Any] = field(default_factory=list)  # ("resid", layer, position, stream) records
    generated_tokens: int = 0  # over all choices, counted in run()
    finish_reason: str | None = None  # the last one reported
    held: Held | None = None  # slot lease and readout bytes, from admission (server/steering_limits.py)
    echo: str | None = None  # the prompt text a completion with echo returns first
    echo_logprobs: dict[str, list[Any]] | None = None  # the echoed prompt's logprobs (echo + logprobs)


def check_context(prompt_len: int, max_len: int, req: GenerationRequest, prompt_param: str,
                  response_budget: int | None = None) -> None:
    """400 when the prompt, or prompt plus requested output, does not fit the context, or (with
    ``response_budget``, ``--max-response-budget``) the response could be larger than the budget."""
    if prompt_len >= max_len:
        raise ContextTooLong(
            f"This model's maximum context length is {max_len} tokens. However, your {prompt_param} "
            f"resulted in {prompt_len} tokens, leaving no room for output. Please shorten it.",
            prompt_param)
    max_tokens, max_param = req.max_output()
    if max_tokens is not None and prompt_len + max_tokens > max_len:
        raise ContextTooLong(
            f"This model's maximum context length is {max_len} tokens. However, you requested "
            f"{prompt_len + max_tokens} tokens ({prompt_len} in the {prompt_param}, {max_tokens} in "
            f"the completion). Please reduce the length of the {prompt_param} or the completion.",
            max_param)
    if max_tokens is None:  # the engine will generate up to the end of the context
        max_tokens = max_len - prompt_len
        if req.min_tokens > max_tokens:
            raise InvalidRequest(f"min_tokens ({req.min_tokens}) exceeds the {max_tokens} tokens "
                                 "left in the context", "min_tokens")
    if response_budget is not None:
        check_response_budget(req, prompt_len, max_tokens, max_param, response_budget)


def check_response_budget(req: GenerationRequest, prompt_len: int, max_tokens: int, max_param: str,
                          budget: int) -> None:
    """400 when the response could hold more than ``budget`` entries: n × max_tokens tokens with
    their top-logprob alternatives, plus the prompt's positions × (1 + prompt_logprobs)."""
    k = req.num_logprobs() or 0
    k_param = "top_logprobs" if isinstance(req, ChatCompletionRequest) else "logprobs"
    generated = req.n * max_tokens * (1 + k)
    scored = prompt_len * (1 + req.prompt_logprobs) if req.prompt_logprobs is not None else 0
    if generated + scored <= budget:
        return
    if scored > budget:
        raise InvalidRequest(
            f"prompt_logprobs={req.prompt_logprobs} over a {prompt_len}-token prompt asks for "
            f"{scored} response entries, more than this server's budget of {budget}; lower "
            "prompt_logprobs or shorten the prompt", "prompt_logprobs", "response_budget_exceeded")
    raise InvalidRequest(
        f"n × {max_param} × (1 + {k_param}) = {req.n} × {max_tokens} × {1 + k} = {generated} "
        f"response entries{f' (plus {scored} prompt_logprobs entries)' if scored else ''} exceeds "
        f"this server's budget of {budget}; lower {max_param}, n or {k_param}",
        max_param, "response_budget_exceeded")


def _vllm_param(exc: Exception, req: GenerationRequest) -> str | None:
    """The request field a vLLM parameter error is about, in this request's names."""
    name = getattr(exc, "parameter", None)
    if name is None:  # many SamplingParams checks name the field only as their message's first word
        name = (str(exc.args[0]) if exc.args else "").split(" ", 1)[0].strip("`'\":,.")
    if name == "logprobs" and isinstance(req, ChatCompletionRequest):
        return "top_logprobs"
    if name == "max_tokens":
        return req.max_output()[1]
    if name == "extra_args":
        return "steering"
    return name if name in type(req).model_fields else None


def sampling_params(req: GenerationRequest, compiled: CompiledSteering | None,
                    request_id: str | None = None, *, vocab_size: int | None = None,
                    tool_schema: dict[str, Any] | None = None,
                    engine: Any = None) -> SamplingParams:
    """SamplingParams with OpenAI defaults (temperature 1.0, top_p 1.0); a value vLLM rejects is
    a 400 naming the field.

    ``request_id`` is where the workers file post-steering activations
    (``steering.return_activations``); ``vocab_size`` bounds ``logit_bias`` keys;
    ``tool_schema`` is the constraint a ``tool_choice`` imposes (:mod:`server.tools`); with
    ``engine``, a structured-output constraint is checked by vLLM's own backend validation here,
    so a bad schema, regex or grammar is a 400 before any stream starts."""
    temperature = 1.0 if req.temperature is None else req.temperature
    if temperature == 0.0 and req.n > 1:
        raise InvalidRequest(
            "n > 1 requires temperature > 0: greedy decoding (temperature 0) would return "
            "n identical choices", "n")
    if compiled is not None and compiled.return_activations and req.n > 1:
        raise InvalidRequest("steering.return_activations needs n = 1", "steering.return_activations")
    max_tokens, max_param = req.max_output()
    if max_tokens is not None and req.min_tokens > max_tokens:
        raise InvalidRequest(f"min_tokens ({req.min_tokens}) exceeds {max_param} ({max_tokens})",
                             "min_tokens")
    logprobs = req.num_logprobs()
    extra_args = compiled.extra_args(readout_key=request_id) if compiled is not None else None
    biases = token_biases(req.logit_bias, vocab_size) if vocab_size is not None else None
    try:
        params = _make_sampling_params(req, temperature, max_tokens, logprobs, extra_args)
        params.logit_bias = biases
    except (VLLMValidationError, ValueError, TypeError, OverflowError) as exc:
        message = str(exc.args[0]) if exc.args else type(exc).__name__
        raise InvalidRequest(message, _vllm_param(exc, req)) from None
    constraint_param = "tools" if tool_schema is not None else \
        "response_format" if req.response_format is not None else "structured_outputs"
    try:
        params.structured_outputs = structured_outputs(req.response_format, req.structured_outputs,
                                                       tool_schema)
        if params.structured_outputs is not None and hasattr(engine, "vllm_config"):
            params.verify(engine.model_config, None, engine.vllm_config.structured_outputs_config,
                          engine.tokenizer)
    except InvalidRequest:
        raise
    except Exception as exc:  # noqa: BLE001  (the backends raise their own types for bad grammars)
        message = str(exc.args[0]) if exc.args else type(exc).__name__
        raise InvalidRequest(f"{constraint_param}: {message}", constraint_param) from None
    return params


def _make_sampling_params(req: GenerationRequest, temperature: float, max_tokens: int | None,
                          logprobs: int | None, extra_args: dict[str, Any] | None) -> SamplingParams:
    return SamplingParams(
        n=req.n,
        temperature=temperature,
        top_p=1.0 if req.top_p is None else req.top_p,
        top_k=0 if req.top_k is None else req.top_k,
        min_p=0.0 if req.min_p is None else req.min_p,
        seed=req.seed,
        stop=req.stop_list(),
        presence_penalty=req.presence_penalty,
        frequency_penalty=req.frequency_penalty,
        repetition_penalty=1.0 if req.repetition_penalty is None else req.repetition_penalty,
        max_tokens=max_tokens,
        min_tokens=req.min_tokens,
        ignore_eos=req.ignore_eos,
        logprobs=logprobs,
        prompt_logprobs=_prompt_logprobs(req, logprobs),
        output_kind=RequestOutputKind.DELTA,
        extra_args=extra_args,
    )


def _prompt_logprobs(req: GenerationRequest, logprobs: int | None) -> int | None:
    """``prompt_logprobs``; with ``echo`` and ``logprobs``, at least ``logprobs`` (the echoed
    prompt's logprobs come from it)."""
    if isinstance(req, CompletionRequest) and req.echo and logprobs is not None:
        return max(logprobs, req.prompt_logprobs or 0)
    return req.prompt_logprobs


async def run(state: AppState, job: Job) -> AsyncIterator[RequestOutput]:
    """Stream the engine's deltas, record metrics, abort if cut short.

    The steering slot was taken at admission (``job.held``, before any response started); it is
    freed here as soon as the generation ends — finished, or its abort sent. A steered request
    that a worker could not seat (it ran unsteered) ends in :class:`SteeringUnavailable` after
    its last delta (see steering/slots.py)."""
    try:
        engine = state.require_engine()
    except BaseException:
        if job.held is not None:
            job.held.end_generation()
        raise
    m = state.metrics
    steered = "true" if job.compiled is not None else "false"
    prompt = TokensPrompt(prompt_token_ids=job.prompt_ids)
    if job.compiled is not None:
        prompt["cache_salt"] = job.compiled.cache_salt
    m.running.inc()
    m.prompt_tokens.inc(len(job.prompt_ids))
    finished = False
    first_token = True
    last_seen: dict[int, float] = {}
    stream = engine.generate(prompt, job.params, job.request_id)
    try:
        async for out in stream:
            now = time.monotonic()
            for o in out.outputs:
                k = len(o.token_ids)
                if o.finish_reason is not None:
                    job.finish_reason = o.finish_reason
                if not k:
                    continue
                job.generated_tokens += k
                m.generated_tokens.inc(k)
                if first_token:
                    m.ttft.labels(steered).observe(now - job.arrival)
                    first_token = False
                prev = last_seen.get(o.index)
                if prev is not None:
                    for _ in range(k):
                        m.itl.labels(steered).observe((now - prev) / k)
                last_seen[o.index] = now
            finished = out.finished
            yield out
        m.e2e.labels(steered).observe(time.monotonic() - job.arrival)
        held, limits = job.held, state.limits
        if finished and held is not None and held.steered and limits is not None \
                and await limits.unseated(job.request_id):
            raise SteeringUnavailable(
                "the engine could not apply this request's steering (no steering slot was "
                "free in a worker), so its output is withheld; retry the request")
    finally:
        m.running.dec()
        try:
            if not finished:
                await stream.aclose()
                try:
                    await engine.abort(job.request_id)
                except Exception:  # noqa: BLE001  (engine gone: nothing left to abort)
                    logger.debug("abort of %s failed", job.request_id, exc_info=True)
        finally:
            if job.held is not None:  # after the abort was sent: the worker frees it first
                job.held.end_generation()


# -- response pieces --------------------------------------------------------------------------

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


async def steering_activations(state: AppState, job: Job) -> list[dict[str, Any]] | None:
    """Post-steering activations per steered token, fetched from the workers after the request.

    One entry per (token position, layer): ``features`` maps each steered feature (or
    ``vectors[i]``) at that layer to act(h) after the op. Clamp/scale/ablate entries are read by
    the op itself; add-mode features from the captured stream."""
    compiled = job.compiled
    if compiled is None or not compiled.return_activations:
        return None
    per_rank = await state.require_engine().collective_rpc("steering_readout", args=(job.request_id,))
    if job.held is not None:
        job.held.popped = True  # the workers no longer hold it
    if any(isinstance(r, str) and r == READOUT_DROPPED for r in per_rank):
        raise CapacityExceeded(
            "the server dropped this request's activations under memory pressure (readouts in "
            "flight exceeded the workers' cap); retry the request", "steering.return_activations",
            headers={"Retry-After": "1"})
    records = per_rank[0] or []  # every tensor-parallel rank computes the same values
    job.captured = [r for r in records if r[0] == "resid"]
    rows: dict[tuple[int, int], dict[str, float]] = {}
    for kind, layer, pos, values in records:
        feats = rows.setdefault((pos, layer), {})
        if kind == "act":
            feats.update(zip(compiled.entry_labels.get(layer, []), values))
        else:
            for name, feat in compiled.probes:
                if feat.layer == layer:
                    feats[name] = float(feat.activation(values))
    return [{"position": pos, "layer": layer, "features": feats}
            for (pos, layer), feats in sorted(rows.items()) if feats]


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}
