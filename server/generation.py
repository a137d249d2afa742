"""One request's life in the engine: prompt → SamplingParams → (slot) → engine stream → metrics.

The engine always streams deltas (``RequestOutputKind.DELTA``) so TTFT and inter-token latency are
measured the same way for streamed and non-streamed responses. Whatever ends the iteration early
(client gone, error, cancellation) aborts the engine request in :func:`run`'s ``finally``.

Monitored requests (``steering.monitors``, :mod:`steering.monitors`): the workers keep each
monitor's result; :func:`run` reads it with the ``steering_monitor_events`` RPC when the
generation finishes (and, while monitored streams run, every ``MONITOR_POLL_S`` for all of them
in one RPC, :class:`MonitorPoller`, so a client hears of a trigger as it happens), counts triggers, and reports a generation a ``stop``
monitor ended with ``finish_reason: "content_filter"``.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
import weakref
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

MONITOR_POLL_S = 0.1
"""While monitored requests stream, the workers' monitor results of all of them are read (one
collective RPC) this often."""
CONTENT_FILTER = "content_filter"
"""The finish_reason of a generation a ``stop`` monitor ended (as OpenAI reports filtered output)."""

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
    live_monitors: bool = False  # poll monitor results while generating (a stream), not only at the end
    monitors: list[dict[str, Any]] | None = None  # ``steering.monitors`` of the response
    monitor_events: list[dict[str, Any]] = field(default_factory=list)  # fired, not yet streamed
    monitors_final: bool = False  # the workers' last word is in ``monitors``


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
    if compiled is not None and compiled.monitors:
        check_monitored(req, compiled, tool_schema)
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


def check_monitored(req: GenerationRequest, compiled: CompiledSteering,
                    tool_schema: dict[str, Any] | None) -> None:
    """400 for what monitors cannot serve: several choices (one report per request), and with a
    ``stop`` monitor whatever would keep the forced EOS from ending the generation."""
    if req.n > 1:
        raise InvalidRequest("steering.monitors needs n = 1", "steering.monitors")
    if not compiled.stops:
        return
    if req.ignore_eos:
        raise InvalidRequest("a stop monitor ends a generation with EOS: it cannot be combined "
                             "with ignore_eos", "ignore_eos")
    if req.min_tokens:
        raise InvalidRequest("a stop monitor ends a generation with EOS: it cannot be combined "
                             "with min_tokens", "min_tokens")
    if tool_schema is not None or req.response_format is not None or req.structured_outputs is not None:
        param = "tools" if tool_schema is not None else \
            "response_format" if req.response_format is not None else "structured_outputs"
        raise InvalidRequest("a stop monitor cannot be combined with constrained output (its "
                             "grammar would not accept the EOS that ends the generation)", param)


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
    if job.compiled is not None and job.compiled.cache_salt is not None:
        prompt["cache_salt"] = job.compiled.cache_salt
    monitored = job.compiled is not None and bool(job.compiled.monitors)
    m.running.inc()
    m.prompt_tokens.inc(len(job.prompt_ids))
    finished = False
    first_token = True
    last_seen: dict[int, float] = {}
    stream = engine.generate(prompt, job.params, job.request_id)
    poller = monitor_poller(engine) if monitored and job.live_monitors else None
    if poller is not None:
        poller.watch(state, job)
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
            if monitored and finished:
                await final_monitors(state, job)
                if any(x["fired"] and x["action"] == "stop" for x in job.monitors or ()):
                    for o in out.outputs:
                        if o.finish_reason is not None:
                            o.finish_reason = job.finish_reason = CONTENT_FILTER
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
        if poller is not None:
            poller.unwatch(job)
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


async def final_monitors(state: AppState, job: Job) -> None:
    """The workers' final monitor results of ``job`` (they forget them): ``job.monitors``."""
    per_rank = await state.require_engine().collective_rpc(
        "steering_monitor_events", args=([job.request_id], True))
    results = (per_rank[0] or {}).get(job.request_id) if per_rank else None
    if results is None:  # the workers never monitored it: a report would claim what nobody watched
        raise SteeringUnavailable("the engine did not report this request's monitors, so its "
                                  "output is withheld (monitors need the engine's op to run on "
                                  "every step: on a GPU, start the server with --enforce-eager)")
    _fold_monitors(state, job, results)
    job.monitors_final = True


def _fold_monitors(state: AppState, job: Job, results: list[dict[str, Any]]) -> None:
    """``results`` into ``job.monitors``; monitors that fired since the last read are queued in
    ``job.monitor_events`` (streamed) and counted (``steer_monitor_triggers``)."""
    assert job.compiled is not None
    seen = {i for i, m in enumerate(job.monitors or ()) if m["fired"]}
    job.monitors = job.compiled.monitor_report(results)
    for i, m in enumerate(job.monitors):
        if m["fired"] and i not in seen:
            job.monitor_events.append({"monitor": i, **m})
            state.metrics.monitor_triggered(m["feature"], m["action"])


class MonitorPoller:
    """Reads the monitor results of every monitored stream in flight with ONE collective RPC per
    ``MONITOR_POLL_S`` (however many streams), while there are any; one per engine."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine
        self.jobs: dict[str, tuple[AppState, Job]] = {}
        self.task: asyncio.Task[None] | None = None

    def watch(self, state: AppState, job: Job) -> None:
        self.jobs[job.request_id] = (state, job)
        if self.task is None or self.task.done():
            self.task = asyncio.ensure_future(self._loop())

    def unwatch(self, job: Job) -> None:
        self.jobs.pop(job.request_id, None)

    async def _loop(self) -> None:
        while self.jobs:
            await asyncio.sleep(MONITOR_POLL_S)
            keys = list(self.jobs)
            if not keys:
                return
            try:
                per_rank = await self.engine.collective_rpc("steering_monitor_events", args=(keys, False))
            except Exception:  # noqa: BLE001  (the final read of each request still reports)
                logger.debug("reading monitor results failed", exc_info=True)
                continue
            results = (per_rank[0] or {}) if per_rank else {}
            for key in keys:
                state, job = self.jobs.get(key, (None, None))
                if job is not None and not job.monitors_final and key in results:
                    _fold_monitors(state, job, results[key])


_POLLERS: weakref.WeakKeyDictionary[Any, MonitorPoller] = weakref.WeakKeyDictionary()


def monitor_poller(engine: Any) -> MonitorPoller:
    if engine not in _POLLERS:
        _POLLERS[engine] = MonitorPoller(engine)
    return _POLLERS[engine]


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
    the op itself; add-mode and lowrank features from the captured stream at their readout
    layer."""
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
            feats.update((name, v) for name, v in zip(compiled.entry_labels.get(layer, []), values)
                         if name is not None)  # None: a lowrank row, read as a probe below
        else:
            for name, feat in compiled.probes:
                if feat.layer == layer:
                    feats[name] = float(feat.activation(values))
    return [{"position": pos, "layer": layer, "features": feats}
            for (pos, layer), feats in sorted(rows.items()) if feats]


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}
