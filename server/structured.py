"""Constrained decoding and token biases: ``response_format``, vLLM's ``structured_outputs`` and
``logit_bias``, turned into vLLM's own sampling objects.

The request fields are validated here (strict pydantic models with bounds, one constraint at a
time); their meaning is vLLM's: :func:`structured_outputs` builds vLLM's
``StructuredOutputsParams`` and lets vLLM's ``structured_outputs_from_response_format`` apply
``response_format`` on top, exactly as ``vllm serve`` does. The grammar itself (JSON schema,
regex, choice, EBNF/Lark grammar) is compiled by vLLM's structured-output backend in the engine;
a schema or grammar the backend rejects is a 400 naming the field (see
:func:`server.runner.run`).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from server.errors import InvalidRequest
from vllm.entrypoints.generate.base.protocol import (
    ResponseFormat as VllmResponseFormat,
    structured_outputs_from_response_format,
)
from vllm.sampling_params import StructuredOutputsParams

MAX_CONSTRAINT_CHARS = 2**16
"""Characters of one regex, grammar or choice string (64 Ki)."""
MAX_CHOICES = 1024
"""Entries of ``structured_outputs.choice``."""
MAX_LOGIT_BIAS = 4096
"""Entries of ``logit_bias`` (token id → bias)."""
LOGIT_BIAS_BOUND = 100.0
"""|bias| ≤ 100, as OpenAI documents: −100 bans a token, +100 all but forces it."""

Constraint = Annotated[str, Field(min_length=1, max_length=MAX_CONSTRAINT_CHARS)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class JsonSchemaFormat(_Strict):
    """``response_format.json_schema`` (OpenAI)."""

    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")
    description: str | None = Field(None, max_length=MAX_CONSTRAINT_CHARS)
    json_schema: dict[str, Any] = Field(alias="schema")
    strict: bool | None = None


class ResponseFormat(_Strict):
    """``response_format``: plain text (no constraint), any JSON object, or a JSON schema."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_iff_json_schema(self) -> ResponseFormat:
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise ValueError("json_schema is required with type 'json_schema' and only then")
        return self


class StructuredOutputs(_Strict):
    """vLLM's ``structured_outputs`` extension: exactly one of json, regex, choice, grammar,
    json_object. (vLLM's whitespace options are not taken per request: its default xgrammar
    backend reads them from the engine's config only, so they would be silently ignored.)"""

    json_: dict[str, Any] | Constraint | None = Field(None, alias="json")
    regex: Constraint | None = None
    choice: Annotated[list[Constraint], Field(min_length=1, max_length=MAX_CHOICES)] | None = None
    grammar: Constraint | None = None
    json_object: bool | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> StructuredOutputs:
        given = [name for name, value in (("json", self.json_), ("regex", self.regex),
                                          ("choice", self.choice), ("grammar", self.grammar),
                                          ("json_object", self.json_object)) if value is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of json, regex, choice, grammar, json_object "
                             f"(got {given or 'none'})")
        return self

    def to_vllm(self) -> StructuredOutputsParams:
        return StructuredOutputsParams(json=self.json_, regex=self.regex, choice=self.choice,
                                       grammar=self.grammar, json_object=self.json_object)


LogitBias = Annotated[dict[str, Annotated[float, Field(ge=-LOGIT_BIAS_BOUND, le=LOGIT_BIAS_BOUND)]],
                      Field(max_length=MAX_LOGIT_BIAS)]


def structured_outputs(response_format: ResponseFormat | None,
                       outputs: StructuredOutputs | None,
                       tool_schema: dict[str, Any] | None = None) -> StructuredOutputsParams | None:
    """vLLM's structured-output params for a request: ``structured_outputs``, overridden by
    ``response_format`` (vLLM's rule), both overridden by the JSON schema a ``tool_choice`` of
    ``required`` or a named function imposes (vLLM's rule for tools)."""
    if tool_schema is not None:
        return StructuredOutputsParams(json=tool_schema)
    base = outputs.to_vllm() if outputs is not None else None
    if response_format is None:
        return base
    vllm_format = VllmResponseFormat.model_validate(response_format.model_dump(by_alias=True))
    return structured_outputs_from_response_format(base, vllm_format)


def token_biases(logit_bias: dict[str, float] | None, vocab_size: int) -> dict[int, float] | None:
    """``logit_bias`` with integer token ids; 400 naming the entry for a key that is not a token
    id of this model."""
    if not logit_bias:
        return None
    out: dict[int, float] = {}
    for key, bias in logit_bias.items():
        try:
            token = int(key)
        except ValueError:
            token = -1
        if not 0 <= token < vocab_size or str(token) != key.strip():
            raise InvalidRequest(f"logit_bias keys must be token ids in [0, {vocab_size}); "
                                 f"got {key[:32]!r}", f"logit_bias.{key[:32]}")
        out[token] = float(bias)
    return out
