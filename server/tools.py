"""Tool calling for ``/v1/chat/completions``, on vLLM's own pieces.

* **Rendering.** Tools go to the chat template (``tools=``), as vLLM passes them. A conversation
  that involves tools (tools offered, an assistant turn with ``tool_calls``, a ``tool`` turn) needs
  a template that renders them: ``--chat-template``, else the model's own when it mentions tools,
  else — for ChatML models — the bundled ``chat_templates/chatml_tools.jinja`` (Hermes format);
  otherwise 400. Conversations without tools keep the model's own template, untouched.
* **Constraint.** ``tool_choice: "required"`` or a named function constrains decoding with the
  JSON schema vLLM derives from the tools (``vllm.tool_parsers.utils.get_json_schema_from_tools``):
  an array of ``{"name", "parameters"}`` objects, or the named function's arguments. The output is
  well-formed by construction (unless cut by ``max_tokens``: then it is returned as text).
* **Parsing.** ``auto`` reads calls from free text with a vLLM tool parser (``--tool-call-parser``,
  default ``hermes`` with the bundled template), streamed through the parser's own incremental
  method.

Semantics: ``finish_reason`` is ``tool_calls`` when calls were returned (``stop`` for a named
function, as OpenAI reports forced calls); tool calls carry ids ``call_<24 hex>``.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import Any

from server.errors import InvalidRequest
from server.protocol import ChatCompletionRequest, NamedToolChoice
from vllm.entrypoints.openai.chat_completion.protocol import (
    ChatCompletionNamedToolChoiceParam,
    ChatCompletionToolsParam,
)
from vllm.entrypoints.openai.chat_completion.protocol import (
    ChatCompletionRequest as VllmChatRequest,
)
from vllm.tool_parsers.abstract_tool_parser import ToolParser, ToolParserManager
from vllm.tool_parsers.utils import get_json_schema_from_tools

BUNDLED_TEMPLATE = "chatml_tools.jinja"
BUNDLED_PARSER = "hermes"
"""The parser that reads the bundled template's format."""


def _call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def involves_tools(req: ChatCompletionRequest) -> bool:
    """Tools offered, or earlier tool calls or results in the conversation."""
    return bool(req.tools) or any(getattr(m, "tool_calls", None) or m.role == "tool"
                                  for m in req.messages)


class ToolSetup:
    """This server's templates and tool parser (one per server, built at start)."""

    def __init__(self, tokenizer: Any, chat_template: str | None, parser: str | None) -> None:
        self.tokenizer = tokenizer
        own = tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else ""
        self.configured = Path(chat_template).read_text() if chat_template else None
        """--chat-template's text: every chat request uses it."""
        self.tool_template: str | None = None
        """The template for conversations with tools; None: the model's own (or configured)."""
        self.problem: str | None = None
        """Why conversations with tools cannot be rendered (None: they can)."""
        bundled = False
        if self.configured is None and "tools" not in own:
            if "<|im_start|>" in own:
                self.tool_template = resources.files("server").joinpath(
                    "chat_templates", BUNDLED_TEMPLATE).read_text()
                bundled = True
            else:
                self.problem = ("this model's chat template does not render tools; start the "
                                "server with --chat-template FILE (a template that does)")
        name = parser or (BUNDLED_PARSER if bundled else None)
        self.parser: type[ToolParser] | None = None
        if name is not None:
            try:
                self.parser = ToolParserManager.get_tool_parser(name)
            except KeyError:
                raise ValueError(f"--tool-call-parser {name!r} is not one of vLLM's parsers: "
                                 f"{sorted(ToolParserManager.list_registered())}") from None

    def template_for(self, req: ChatCompletionRequest) -> str | None:
        """The chat template for ``req`` (None: the tokenizer's own); 400 when a conversation
        with tools cannot be rendered."""
        if not involves_tools(req):
            return self.configured
        if self.problem is not None:
            raise InvalidRequest(self.problem, "tools" if req.tools else "messages",
                                 "unsupported_parameter")
        return self.tool_template or self.configured

    def render(self, req: ChatCompletionRequest, messages: list[dict[str, Any]] | None = None) -> str:
        """``req`` (or ``messages`` in its place: the same conversation, some strings swapped)
        through the chat template, as text."""
        # As vLLM: the tools reach the template even with tool_choice "none" (the model may
        # know of them; it is not asked to call one).
        tools = [t.model_dump(exclude_none=True) for t in req.tools] if req.tools else None
        return self.tokenizer.apply_chat_template(
            req.chat_messages() if messages is None else messages, tools=tools, chat_template=self.template_for(req),
            add_generation_prompt=True, tokenize=False)

    def readers(self, req: ChatCompletionRequest) -> Callable[[], ToolCallReader | None]:
        """A factory of one fresh reader per choice of ``req`` (a reader of None: the request
        wants no tool calls); a 400 now, before any stream starts, when ``auto`` has no parser."""
        choice = req.effective_tool_choice()
        if not req.tools or choice == "none":
            return lambda: None
        if choice == "auto":
            if self.parser is None:
                raise InvalidRequest('tool_choice "auto" needs a tool parser: start the server '
                                     'with --tool-call-parser NAME, or use "required" or a named '
                                     "function", "tool_choice", "unsupported_parameter")
            parser, vllm_tools, vllm_request = self.parser, _vllm_tools(req), _vllm_request(req)
            return lambda: AutoReader(parser(self.tokenizer, vllm_tools), vllm_request)
        if isinstance(choice, NamedToolChoice):
            name = choice.function.name
            return lambda: NamedReader(name)
        return RequiredReader


def _vllm_tools(req: ChatCompletionRequest) -> list[ChatCompletionToolsParam]:
    return [ChatCompletionToolsParam.model_validate(t.model_dump(exclude_none=True))
            for t in req.tools or []]


def _vllm_request(req: ChatCompletionRequest) -> VllmChatRequest:
    """The fields of ``req`` vLLM's tool parsers read, in vLLM's request type."""
    return VllmChatRequest.model_validate({
        "messages": [{"role": "user", "content": ""}],
        "tools": [t.model_dump(exclude_none=True) for t in req.tools or []],
        "tool_choice": "auto"})


def constraint_schema(req: ChatCompletionRequest) -> dict[str, Any] | None:
    """The JSON schema ``tool_choice`` imposes on decoding (vLLM's), None for auto/none."""
    choice = req.effective_tool_choice()
    if not req.tools or choice in ("none", "auto"):
        return None
    vllm_choice: Any = choice
    if isinstance(choice, NamedToolChoice):
        vllm_choice = ChatCompletionNamedToolChoiceParam.model_validate(choice.model_dump())
    schema = get_json_schema_from_tools(vllm_choice, _vllm_tools(req), req.parallel_tool_calls)
    assert isinstance(schema, dict)
    return schema


class ToolCallReader:
    """Turns one choice's output into content and tool calls, whole or as stream deltas."""

    forced_finish = "tool_calls"

    def __init__(self) -> None:
        self.text = ""
        self.calls = 0

    def finish(self, text: str) -> tuple[str | None, list[dict[str, Any]]]:
        """Content and tool calls of a whole output."""
        raise NotImplementedError

    def feed(self, delta: str, token_ids: list[int]) -> dict[str, Any]:
        """The delta message fields (``content``, ``tool_calls``) for the next piece of output."""
        raise NotImplementedError

    def finish_reason(self, engine_reason: str | None) -> str | None:
        if engine_reason == "stop" and self.calls:
            return self.forced_finish
        return engine_reason


def _call(name: str, arguments: str, index: int | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"id": _call_id(), "type": "function",
                           "function": {"name": name, "arguments": arguments}}
    if index is not None:
        out = {"index": index, **out}
    return out


class NamedReader(ToolCallReader):
    """The whole output is the named function's arguments."""

    forced_finish = "stop"

    def __init__(self, name: str) -> None:
        super().__init__()
        self.name = name

    def finish(self, text: str) -> tuple[str | None, list[dict[str, Any]]]:
        self.calls = 1
        return None, [_call(self.name, text.strip())]

    def feed(self, delta: str, token_ids: list[int]) -> dict[str, Any]:
        if not delta:
            return {}
        if self.calls == 0:
            self.calls = 1
            return {"tool_calls": [_call(self.name, delta, index=0)]}
        return {"tool_calls": [{"index": 0, "function": {"arguments": delta}}]}


class RequiredReader(ToolCallReader):
    """The output is a JSON array of ``{"name", "parameters"}``; in a stream, each call is sent
    whole as soon as its object closes."""

    def __init__(self) -> None:
        super().__init__()
        self.depth = 0
        self.in_string = False
        self.escaped = False
        self.start = -1  # where the array element being read begins

    @staticmethod
    def _as_call(obj: Any, index: int | None = None) -> dict[str, Any]:
        return _call(obj["name"], json.dumps(obj.get("parameters", {}), ensure_ascii=False), index)

    def finish(self, text: str) -> tuple[str | None, list[dict[str, Any]]]:
        try:
            items = json.loads(text)
            calls = [self._as_call(obj) for obj in items]
        except (ValueError, TypeError, KeyError):
            return text, []  # cut short (max_tokens): the text as it is
        self.calls = len(calls)
        return None, calls

    def feed(self, delta: str, token_ids: list[int]) -> dict[str, Any]:
        calls = []
        for ch in delta:
            pos = len(self.text)
            self.text += ch
            if self.in_string:
                if self.escaped:
                    self.escaped = False
                elif ch == "\\":
                    self.escaped = True
                elif ch == '"':
                    self.in_string = False
                continue
            if ch == '"':
                self.in_string = True
            elif ch in "[{":
                self.depth += 1
                if self.depth == 2:
                    self.start = pos
            elif ch in "]}":
                self.depth -= 1
                if self.depth == 1 and self.start >= 0:
                    obj = json.loads(self.text[self.start:pos + 1])
                    calls.append(self._as_call(obj, index=self.calls))
                    self.calls += 1
                    self.start = -1
        return {"tool_calls": calls} if calls else {}


class AutoReader(ToolCallReader):
    """Free text, read by a vLLM tool parser."""

    def __init__(self, parser: ToolParser, request: VllmChatRequest) -> None:
        super().__init__()
        self.parser = parser
        self.request = request
        self.token_ids: list[int] = []
        self.ids: dict[int, str] = {}

    def finish(self, text: str) -> tuple[str | None, list[dict[str, Any]]]:
        info = self.parser.extract_tool_calls(text, self.request)
        if not info.tools_called:
            return text, []
        calls = [_call(c.function.name, c.function.arguments) for c in info.tool_calls]
        self.calls = len(calls)
        return info.content, calls

    def feed(self, delta: str, token_ids: list[int]) -> dict[str, Any]:
        previous, previous_ids = self.text, list(self.token_ids)
        self.text += delta
        self.token_ids.extend(token_ids)
        msg = self.parser.extract_tool_calls_streaming(
            previous, self.text, delta, previous_ids, self.token_ids, list(token_ids), self.request)
        if msg is None:
            return {}
        out: dict[str, Any] = {}
        if msg.content:
            out["content"] = msg.content
        if msg.tool_calls:
            calls = [c.model_dump(exclude_none=True) for c in msg.tool_calls]
            for c in calls:  # our ids, one per call index
                if c.get("id"):
                    c["id"] = self.ids.setdefault(c["index"], _call_id())
            self.calls = max(self.calls, max(c["index"] for c in calls) + 1)
            out["tool_calls"] = calls
        return out
