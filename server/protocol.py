"""Request models for /v1/chat/completions and /v1/completions.

Bodies are parsed with :func:`parse_chat` / :func:`parse_completion`, which first reject OpenAI
features this server does not implement (images, audio, deprecated ``functions``, ...) with a 400
that names the parameter, then validate the rest with pydantic. Unknown fields are rejected too:
nothing a client sends is silently ignored. Tools, ``response_format``, vLLM's
``structured_outputs``, ``logit_bias`` and ``echo`` are supported (:mod:`server.tools`,
:mod:`server.structured`); README's compatibility table lists every field.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, ValidationError

from server.errors import InvalidRequest, validation_error
from server.structured import LogitBias, ResponseFormat, StructuredOutputs
from steering.spec import SteeringSpec
from steering.validation import echo

# OpenAI request fields we know but do not implement. A field may still be sent with a value
# that asks for nothing (None, [], {}, False, "none", {"type": "text"}).
UNSUPPORTED_CHAT = (
    "functions", "function_call", "audio", "modalities", "prediction",
    "web_search_options", "reasoning_effort", "service_tier", "store", "metadata",
    "prompt_cache_key", "safety_identifier", "verbosity",
)
UNSUPPORTED_COMPLETION = ("suffix", "best_of")
UNSUPPORTED_MESSAGE = ("name", "function_call", "audio", "refusal")
SUPPORTED_ROLES = ("system", "developer", "user", "assistant", "tool")

# Bounds of request fields (beyond them: 400 naming the field). As vLLM's OpenAI server bounds
# them where it does (seed within int64, at most 4 stop strings, 20 logprobs); elsewhere chosen
# so that no value can overflow the engine's int64 transport or int32 token buffers, and so that
# one body cannot make the tokenizer or the chat template loop over more than any context holds.
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
INT32_MAX = 2**31 - 1
MAX_LOGPROBS = 20
"""``logprobs`` / ``top_logprobs`` / ``prompt_logprobs``: vLLM's default ``--max-logprobs``."""
MAX_STOP = 4
"""Stop strings per request (OpenAI's and vLLM's ``VLLM_MAX_STOP_STRINGS``)."""
MAX_STOP_CHARS = 1024
"""Characters per stop string (a stream holds back this many characters while it may match)."""
MAX_USER_CHARS = 512
"""Characters of ``user`` (an opaque end-user id)."""
MAX_MESSAGES = 4096
"""Messages per chat request, and text parts per message."""
MAX_TEXT_CHARS = 2**22
"""Characters of one message content or prompt string (4 Mi: ~1M tokens, above any context)."""
MAX_PROMPT_TOKENS = 2**22
"""Token ids of one prompt given as ids."""
MAX_TOOLS = 128
"""Tools per request (OpenAI's limit), and tool calls per assistant message."""
MAX_ID_CHARS = 256
"""Characters of a tool call id."""

Int64 = Annotated[int, Field(ge=INT64_MIN, le=INT64_MAX)]
Count = Annotated[int, Field(ge=0, le=INT32_MAX)]
TokenId = Annotated[int, Field(ge=0, le=INT32_MAX)]
Text = Annotated[str, Field(max_length=MAX_TEXT_CHARS)]
StopString = Annotated[str, Field(min_length=1, max_length=MAX_STOP_CHARS)]


def _asks_for_nothing(name: str, value: Any) -> bool:
    if value is None or value is False or value == [] or value == {}:
        return True
    if name == "function_call" and value == "none":
        return True
    if name == "best_of" and value == 1:
        return True
    return False


def _strip_unsupported(body: dict[str, Any], names: tuple[str, ...], prefix: str = "") -> dict[str, Any]:
    """``body`` without the unsupported fields; 400 if one of them asks for something."""
    for name in names:
        if name in body and not _asks_for_nothing(name, body[name]):
            param = f"{prefix}{name}"
            raise InvalidRequest(f"'{param}' is not supported by this server", param, "unsupported_parameter")
    return {key: value for key, value in body.items() if key not in names}


def _check_messages(messages: Any) -> Any:
    """Reject tool/function roles, message fields we do not implement, and non-text parts."""
    if not isinstance(messages, list):
        return messages
    checked = []
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict):
            checked.append(msg)
            continue
        where = f"messages.[{i}]"
        msg = _strip_unsupported(msg, UNSUPPORTED_MESSAGE, f"{where}.")
        checked.append(msg)
        role = msg.get("role")
        if not isinstance(role, str):
            raise InvalidRequest(f"each message needs a role, one of {list(SUPPORTED_ROLES)}",
                                 f"{where}.role")
        if role not in SUPPORTED_ROLES:
            raise InvalidRequest(
                f"role {echo(role)} is not supported; use one of {list(SUPPORTED_ROLES)}",
                f"{where}.role", "unsupported_parameter")
        content = msg.get("content")
        if isinstance(content, list):
            for j, part in enumerate(content):
                kind = part.get("type") if isinstance(part, dict) else None
                if isinstance(kind, str) and kind != "text":
                    raise InvalidRequest(
                        f"content part type '{kind}' is not supported; only 'text' parts are",
                        f"{where}.content.[{j}].type", "unsupported_parameter")
    return checked


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class RequestSteering(SteeringSpec):
    """A request's ``steering``: the steering spec, plus the experiment it enters (if any)."""

    experiment: str | None = Field(None, strict=True)
    """Enter this A/B experiment: the variant's steering is merged under the request's own."""


class TextPart(_Strict):
    type: Literal["text"]
    text: Text


FunctionName = Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")]


class FunctionDef(_Strict):
    name: FunctionName
    description: Text | None = None
    parameters: dict[str, Any] | None = None
    """The arguments' JSON schema (None: no arguments)."""
    strict: bool | None = None


class Tool(_Strict):
    type: Literal["function"]
    function: FunctionDef


class NamedFunction(_Strict):
    name: FunctionName


class NamedToolChoice(_Strict):
    type: Literal["function"]
    function: NamedFunction


class CalledFunction(_Strict):
    name: FunctionName
    arguments: Text
    """The arguments as a JSON string (as the model produced them)."""


class ToolCall(_Strict):
    """A tool call of an earlier assistant turn, sent back in ``messages``."""

    id: str = Field(max_length=MAX_ID_CHARS)
    type: Literal["function"]
    function: CalledFunction


class _Message(_Strict):
    def text(self) -> str:
        """The message content as one string (text parts joined; null content is "")."""
        content = getattr(self, "content", None)
        if content is None:
            return ""
        if isinstance(content, str):
            return content
        return "".join(part.text for part in content)

    def for_template(self) -> dict[str, Any]:
        """This message as chat templates expect it (``developer`` is the new name of
        ``system``)."""
        role = "system" if self.role == "developer" else self.role  # type: ignore[attr-defined]
        return {"role": role, "content": self.text()}


Content = Text | Annotated[list[TextPart], Field(max_length=MAX_MESSAGES)]


class SystemMessage(_Message):
    role: Literal["system", "developer"]
    content: Content


class UserMessage(_Message):
    role: Literal["user"]
    content: Content


class AssistantMessage(_Message):
    role: Literal["assistant"]
    content: Content | None = None
    """May be null (or absent) on a turn that made tool calls."""
    tool_calls: Annotated[list[ToolCall], Field(max_length=MAX_TOOLS)] | None = None
    """The calls this turn made."""

    def for_template(self) -> dict[str, Any]:
        """Tool-call arguments go to the template as objects where they parse, as vLLM passes
        them."""
        msg = super().for_template()
        if self.tool_calls:
            msg["tool_calls"] = [
                {"id": c.id, "type": "function",
                 "function": {"name": c.function.name, "arguments": _json_or_text(c.function.arguments)}}
                for c in self.tool_calls]
        return msg


class ToolMessage(_Message):
    role: Literal["tool"]
    content: Content
    tool_call_id: str = Field(max_length=MAX_ID_CHARS)
    """The call this result answers."""

    def for_template(self) -> dict[str, Any]:
        return {**super().for_template(), "tool_call_id": self.tool_call_id}


MESSAGE_TYPES = (SystemMessage, UserMessage, AssistantMessage, ToolMessage)


def _message_kind(value: Any) -> str | None:
    role = value.get("role") if isinstance(value, dict) else getattr(value, "role", None)
    return {"system": "system-message", "developer": "system-message", "user": "user-message",
            "assistant": "assistant-message", "tool": "tool-message"}.get(role)  # type: ignore[arg-type]


# One model per role, told apart by ``role`` (tags are not identifiers, so error params skip them).
ChatMessage = Annotated[
    Annotated[SystemMessage, Tag("system-message")] | Annotated[UserMessage, Tag("user-message")]
    | Annotated[AssistantMessage, Tag("assistant-message")] | Annotated[ToolMessage, Tag("tool-message")],
    Discriminator(_message_kind)]


def _json_or_text(arguments: str) -> Any:
    try:
        return json.loads(arguments)
    except ValueError:
        return arguments


class StreamOptions(_Strict):
    include_usage: bool = False


class _GenerationRequest(_Strict):
    """Fields shared by chat and text completions (OpenAI names, plus our extensions)."""

    model: str | None = Field(None, max_length=MAX_ID_CHARS)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, le=64)
    stop: StopString | Annotated[list[StopString], Field(max_length=MAX_STOP)] | None = None
    seed: Int64 | None = None
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    user: str | None = Field(None, max_length=MAX_USER_CHARS)
    stream: bool = False
    stream_options: StreamOptions | None = None
    # Extensions (vLLM sampling options and ours).
    repetition_penalty: float | None = Field(None, gt=0.0, le=10.0)
    top_k: int | None = Field(None, ge=-1, le=INT32_MAX)
    min_p: float | None = Field(None, ge=0.0, le=1.0)
    ignore_eos: bool = False
    min_tokens: Count = 0
    return_token_ids: bool = False
    prompt_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    logit_bias: LogitBias | None = None
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputs | None = None
    steering: RequestSteering | None = None

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)


class ChatCompletionRequest(_GenerationRequest):
    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_tokens: int | None = Field(None, ge=1, le=INT32_MAX)
    max_completion_tokens: int | None = Field(None, ge=1, le=INT32_MAX)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    tools: Annotated[list[Tool], Field(max_length=MAX_TOOLS)] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None

    def max_output(self) -> tuple[int | None, str]:
        """The output limit and the param it came from."""
        if self.max_completion_tokens is not None:
            return self.max_completion_tokens, "max_completion_tokens"
        return self.max_tokens, "max_tokens"

    def num_logprobs(self) -> int | None:
        """vLLM's ``logprobs`` (top-k alternatives), None when not asked for."""
        if not self.logprobs:
            if self.top_logprobs:
                raise InvalidRequest("top_logprobs requires logprobs to be true", "top_logprobs")
            return None
        return self.top_logprobs or 0

    def chat_messages(self) -> list[dict[str, Any]]:
        """Messages for the chat template."""
        return [m.for_template() for m in self.messages]

    def effective_tool_choice(self) -> str | NamedToolChoice:
        """OpenAI's default: ``auto`` when tools are given, else ``none``."""
        if self.tool_choice is not None:
            return self.tool_choice
        return "auto" if self.tools else "none"

    def check_tools(self) -> None:
        """400 when ``tool_choice`` asks for tools the request does not define."""
        choice = self.tool_choice
        if choice is None or choice == "none":
            return
        names = [t.function.name for t in self.tools or []]
        if not names:
            raise InvalidRequest(f"tool_choice {choice if isinstance(choice, str) else 'function'!r} "
                                 "needs tools", "tool_choice")
        if isinstance(choice, NamedToolChoice) and choice.function.name not in names:
            raise InvalidRequest(f"tool_choice names function {choice.function.name!r}, which is "
                                 f"not among the tools {names}", "tool_choice.function.name")


class CompletionRequest(_GenerationRequest):
    prompt: (Text | Annotated[list[TokenId], Field(max_length=MAX_PROMPT_TOKENS)] | list[Text]
             | list[Annotated[list[TokenId], Field(max_length=MAX_PROMPT_TOKENS)]])
    max_tokens: int | None = Field(16, ge=1, le=INT32_MAX)
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False
    """Return the prompt before the completion (with its logprobs when ``logprobs`` is set)."""

    def max_output(self) -> tuple[int | None, str]:
        return self.max_tokens, "max_tokens"

    def num_logprobs(self) -> int | None:
        return self.logprobs

    def single_prompt(self) -> str | list[int]:
        """The one prompt of this request (batches of several prompts are not supported)."""
        prompt = self.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
            if len(prompt) != 1:
                raise InvalidRequest("batched prompts are not supported: send one prompt per request",
                                     "prompt", "unsupported_parameter")
            prompt = prompt[0]
        if prompt == "" or prompt == []:
            raise InvalidRequest("prompt must not be empty", "prompt")
        return prompt


def _validate(model: type[_GenerationRequest], body: Any) -> Any:
    try:
        req = model.model_validate(body)
    except ValidationError as exc:
        raise validation_error(exc) from None
    if req.stream_options is not None and not req.stream:
        raise InvalidRequest("stream_options is only allowed when stream is true", "stream_options")
    return req


def _require_object(body: Any) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise InvalidRequest("the request body must be a JSON object")
    return body


def parse_chat(body: Any) -> ChatCompletionRequest:
    """Validate a chat completions body."""
    body = _strip_unsupported(_require_object(body), UNSUPPORTED_CHAT)
    if "messages" in body:
        body["messages"] = _check_messages(body["messages"])
    req = _validate(ChatCompletionRequest, body)
    req.check_tools()
    return req


def parse_completion(body: Any) -> CompletionRequest:
    """Validate a (legacy) completions body."""
    body = _strip_unsupported(_require_object(body), UNSUPPORTED_COMPLETION)
    return _validate(CompletionRequest, body)
