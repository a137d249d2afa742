"""Response bodies of the generation routes: the non-streamed JSON (:func:`chat_body`,
:func:`completion_body` over the choices :func:`collect` accumulated) and the server-sent-event
stream (:func:`stream`), whose first chunk carries the request-level fields (``steering``,
``experiment``, prompt ids and logprobs). Tool calls are read from each choice's output by
:mod:`server.tools`; ``echo`` prepends the prompt."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any

from server import logprobs as lp
from server import runner, tools
from server.errors import describe
from server.http import DisconnectAwareStream, sse
from server.logprobs import Choice
from server.runner import Job
from server.sampling import GenerationRequest
from server.steering_limits import Held
from steering.request import CompiledSteering

if TYPE_CHECKING:
    from server.state import AppState

logger = logging.getLogger(__name__)


class HeldStream(DisconnectAwareStream):
    """An SSE response that frees what its request holds (slot, readout) however it ends —
    finished, failed, client gone, or never started."""

    def __init__(self, held: Held | None, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.held = held

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            if self.held is not None:
                self.held.close()


async def collect(state: AppState, job: Job, chat: bool) -> dict[int, Choice]:
    choices = {i: Choice() for i in range(job.params.n)}
    k = job.params.logprobs
    async for out in runner.run(state, job):
        if out.prompt_logprobs:  # only the first delta carries them
            job.prompt_logprobs = lp.prompt_logprobs(state, out)
            if job.echo is not None and k is not None:
                job.echo_logprobs = lp.echo_logprobs(state, job.prompt_ids, out, k)
        for o in out.outputs:
            c = choices[o.index]
            if k is not None and o.token_ids:
                offset = sum(len(t) for t in c.text) + len(job.echo or "")
                c.logprobs.append(lp.chat_logprobs(state, o, k) if chat
                                  else lp.completion_logprobs(state, o, k, offset))
            c.text.append(o.text)
            c.token_ids.extend(o.token_ids)
            if o.finish_reason is not None:
                c.finish_reason = o.finish_reason
    return choices


def _common(req: GenerationRequest, job: Job, compiled: CompiledSteering | None,
            model: str, obj: str) -> dict[str, Any]:
    body: dict[str, Any] = {"id": job.request_id, "object": obj, "created": int(time.time()),
                            "model": model, "system_fingerprint": None}
    if req.return_token_ids:
        body["prompt_token_ids"] = job.prompt_ids
    if req.prompt_logprobs is not None:
        body["prompt_logprobs"] = job.prompt_logprobs
    if compiled is not None:
        body["steering"] = compiled.summary()
    return body


def chat_body(req: GenerationRequest, job: Job,
               compiled: CompiledSteering | None, model: str, choices: dict[int, Choice],
               readers: Callable[[], tools.ToolCallReader | None]) -> dict[str, Any]:
    body = _common(req, job, compiled, model, "chat.completion")
    body["choices"] = []
    for index, c in sorted(choices.items()):
        message: dict[str, Any] = {"role": "assistant", "content": "".join(c.text)}
        finish_reason = c.finish_reason
        reader = readers()
        if reader is not None:
            message["content"], calls = reader.finish(message["content"])
            if calls:
                message["tool_calls"] = calls
            finish_reason = reader.finish_reason(finish_reason)
        choice: dict[str, Any] = {
            "index": index,
            "message": message,
            "logprobs": ({"content": [item for part in c.logprobs for item in part]}
                         if job.params.logprobs is not None else None),
            "finish_reason": finish_reason,
        }
        if req.return_token_ids:
            choice["token_ids"] = c.token_ids
        body["choices"].append(choice)
    body["usage"] = lp.usage(len(job.prompt_ids), sum(len(c.token_ids) for c in choices.values()))
    return body


def completion_body(req: GenerationRequest, job: Job,
                     compiled: CompiledSteering | None, model: str,
                     choices: dict[int, Choice]) -> dict[str, Any]:
    body = _common(req, job, compiled, model, "text_completion")
    body["choices"] = []
    for index, c in sorted(choices.items()):
        logprobs = None
        if job.params.logprobs is not None:
            parts = ([job.echo_logprobs] if job.echo_logprobs else []) + c.logprobs
            logprobs = {key: [v for part in parts for v in part[key]]
                        for key in ("tokens", "token_logprobs", "top_logprobs", "text_offset")}
        choice: dict[str, Any] = {"index": index, "text": (job.echo or "") + "".join(c.text),
                                  "logprobs": logprobs,
                                  "finish_reason": c.finish_reason}
        if req.return_token_ids:
            choice["token_ids"] = c.token_ids
        body["choices"].append(choice)
    body["usage"] = lp.usage(len(job.prompt_ids), sum(len(c.token_ids) for c in choices.values()))
    return body


async def stream(state: AppState, req: GenerationRequest, job: Job,
                  compiled: CompiledSteering | None, model: str, chat: bool,
                  experiment: dict[str, str] | None = None,
                  on_complete: Callable[[str], None] | None = None,
                  readers: Callable[[], tools.ToolCallReader | None] = lambda: None,
                  ) -> AsyncIterator[str]:
    """SSE events: one chunk per choice delta, an optional usage chunk, then ``[DONE]``. The first
    chunk carries the request-level fields (``steering``, ``experiment``, prompt ids/logprobs).
    ``on_complete(outcome)`` runs once the stream ends: ``ok`` when the generation finished
    without error (before ``[DONE]``), ``failed`` when an error ended it, ``aborted`` when the
    client went away."""
    obj = "chat.completion.chunk" if chat else "text_completion"
    include_usage = req.include_usage()
    k = job.params.logprobs
    started: set[int] = set()
    offsets: dict[int, int] = {}
    choice_readers: dict[int, tools.ToolCallReader | None] = {}
    completion_tokens = 0
    first = True
    def bare(**fields: Any) -> str:  # an event that carries no choice delta
        return sse({"id": job.request_id, "object": obj, "created": int(time.time()), "model": model,
                    "choices": [], **fields})

    try:
        async for out in runner.run(state, job):
            if out.prompt_logprobs:  # only the first delta carries them
                job.prompt_logprobs = lp.prompt_logprobs(state, out)
                if job.echo is not None and k is not None:
                    job.echo_logprobs = lp.echo_logprobs(state, job.prompt_ids, out, k)
            while job.monitor_events:  # a monitor fired: said as soon as it is known
                yield bare(steering={"monitor_event": job.monitor_events.pop(0)})
            for o in out.outputs:
                if not o.text and not o.token_ids and o.finish_reason is None:
                    continue
                completion_tokens += len(o.token_ids)
                finish_reason = o.finish_reason
                if chat:
                    if o.index not in choice_readers:
                        choice_readers[o.index] = readers()
                    reader = choice_readers[o.index]
                    delta: dict[str, Any] = {"content": o.text}
                    if reader is not None:
                        delta = reader.feed(o.text, list(o.token_ids))
                        finish_reason = reader.finish_reason(o.finish_reason)
                        if not delta and finish_reason is None and o.index in started:
                            continue  # nothing to say yet (a tool call still being read)
                    if o.index not in started:
                        delta = {"role": "assistant", **delta}
                chunk = _common(req, job, compiled, model, obj) if first else \
                    {"id": job.request_id, "object": obj, "created": int(time.time()), "model": model}
                if first and experiment is not None:
                    chunk["experiment"] = experiment
                first = False
                choice: dict[str, Any] = {"index": o.index}
                if chat:
                    choice["delta"] = delta
                    choice["logprobs"] = ({"content": lp.chat_logprobs(state, o, k)}
                                          if k is not None else None)
                    offsets[o.index] = offsets.get(o.index, 0) + len(o.text)
                else:
                    echo = job.echo if job.echo is not None and o.index not in started else ""
                    offset = offsets.get(o.index, 0) + len(echo)
                    choice["text"] = echo + o.text
                    choice["logprobs"] = None
                    if k is not None:
                        lps = lp.completion_logprobs(state, o, k, offset)
                        if echo and job.echo_logprobs:
                            lps = {key: job.echo_logprobs[key] + lps[key] for key in lps}
                        choice["logprobs"] = lps
                    offsets[o.index] = offset + len(o.text)
                started.add(o.index)
                choice["finish_reason"] = finish_reason
                if req.return_token_ids:
                    choice["token_ids"] = list(o.token_ids)
                chunk["choices"] = [choice]
                if include_usage:
                    chunk["usage"] = None
                yield sse(chunk)
        activations = await runner.steering_activations(state, job)
        if activations is not None:
            yield bare(steering={"activations": activations})
        if compiled is not None and compiled.monitors:
            yield bare(steering={"monitors": job.monitors or compiled.monitor_report(None)})
        if include_usage:
            yield sse({"id": job.request_id, "object": obj, "created": int(time.time()),
                        "model": model, "choices": [],
                        "usage": lp.usage(len(job.prompt_ids), completion_tokens)})
        if on_complete is not None:
            on_complete("ok")
    except Exception as exc:  # noqa: BLE001  (headers are sent: report in-band)
        if on_complete is not None:
            on_complete("failed")
        _, body = describe(exc)
        logger.warning("stream %s failed: %s", job.request_id, body["error"]["message"],
                       exc_info=exc)  # the client gets a generic message for a 500; the log, all
        yield sse(body)
    except BaseException:  # cancelled or closed: the client went away mid-stream
        if on_complete is not None:
            on_complete("aborted")
        raise
    yield sse("[DONE]")
