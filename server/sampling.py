"""Request → vLLM ``SamplingParams``: OpenAI defaults, the context and response-budget checks, and
every value vLLM rejects turned into a 400 naming the request's field.

The engine always streams deltas (``RequestOutputKind.DELTA``) so TTFT and inter-token latency
are measured the same way for streamed and non-streamed responses (:mod:`server.runner`)."""

from __future__ import annotations

from typing import Any

from server import vllm_env  # noqa: F401  (sets CPU defaults before vllm is imported)
from server.errors import ContextTooLong, InvalidRequest
from server.protocol import ChatCompletionRequest, CompletionRequest
from server.structured import structured_outputs, token_biases
from steering.request import CompiledSteering
from vllm import SamplingParams
from vllm.exceptions import VLLMValidationError
from vllm.sampling_params import RequestOutputKind

GenerationRequest = ChatCompletionRequest | CompletionRequest


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
