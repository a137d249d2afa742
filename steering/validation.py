"""Pydantic validation errors as field paths: the one translator from an error's ``loc`` to the
path that error messages and an OpenAI error's ``param`` name.

    ('vectors', 0, 'values')                                 vectors[0].values
    ('features', 'golden-gate', 'strength'), 'steering'      steering.features.golden-gate.strength
    ('keys', 1, 'sha256')                                    keys[1].sha256
    openai=True:
    ('body', 'messages', 0, 'user-message', 'content')       messages.[0].content
    ('stop', 'list[constrained-str]', 0)                     stop.[0]
    ('variants', 1, 'steering', 'vectors', 0, 'layer')       variants.[1].steering.vectors[0].layer

Names are joined with dots and list indices written ``[i]``. Entries of a ``loc`` that name no
field are dropped: pydantic's ``[key]`` (the error is in a dict key) and its labels of union
branches such as ``list[TextPart]`` or ``function-after[check(), str]``.

``openai=True`` writes an OpenAI request body's path as OpenAI does: FastAPI's leading ``body``
dropped, indices ``.[i]`` (``messages.[0].content``), and every entry that is not an identifier
dropped as a branch label too (``constrained-str``, a ``Tag`` such as ``user-message``), as are
plain types' labels (``str``), since the body's fields are all identifiers. Its ``steering``
object is the steering spec's, written the plain way from there on (feature names are dict
keys: ``golden-gate``, ``pack/name``).

Every place that turns a ValidationError into text goes through :func:`first_error` and
:func:`param_path` (the HTTP errors of :mod:`server.errors`, :func:`steering.spec.steering_error`,
the auth and presets files, the pack manifest and writer, the wire record).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any, Protocol

BODY = "body"
"""FastAPI's first ``loc`` entry of an error in a request body."""
KEY = "[key]"
"""pydantic's ``loc`` entry after a dict key that failed validation."""
STEERING_FIELD = "steering"
"""A request body's steering object: below it, :func:`param_path` writes the plain way."""
TYPE_TAGS = frozenset({"str", "int", "float", "bool", "dict", "list", "none", "None"})
"""pydantic's labels of plain types' union branches (identifiers, so told apart by name)."""
_LABEL = re.compile(r"[a-z]+(?:-[a-z]+)*\[.*\]\Z", re.DOTALL)
"""A validator's label as pydantic writes it: ``list[TextPart]``, ``function-after[f(), str]``."""


class HasErrors(Protocol):
    """pydantic's ValidationError, or FastAPI's RequestValidationError."""

    def errors(self) -> Any: ...


MAX_ECHO_CHARS = 64
"""A value a client sent is echoed in an error message or param path cut to this many characters."""


def clip(text: str, limit: int = MAX_ECHO_CHARS) -> str:
    """``text`` cut to its first ``limit`` characters and "…" when longer."""
    return text if len(text) <= limit else text[:limit] + "…"


def echo(value: Any, limit: int = MAX_ECHO_CHARS) -> str:
    """``repr(value)`` for an error message, cut to ``limit`` characters of the value: a 100,000
    character name must not come back as a 200 KB error."""
    return repr(clip(value if isinstance(value, str) else str(value), limit))


def first_error(exc: HasErrors, *, prefer_bounds: bool = False) -> dict[str, Any]:
    """The error to report of ``exc`` (an empty dict when it has none).

    ``prefer_bounds``: in a union (``str | list[str]``) every branch reports; the branch whose
    shape matched but whose bound failed ("at most 4 items") says what is wrong, not "should be
    a valid string", so the first error that is not a type or parsing mismatch comes first."""
    errors = list(exc.errors())
    if prefer_bounds:
        bounds = [e for e in errors if not str(e.get("type", "")).endswith(("_type", "_parsing"))]
        errors = bounds or errors
    return dict(errors[0]) if errors else {}


def is_branch_label(part: Any, openai: bool = False) -> bool:
    """``part`` of a ``loc`` names no field: pydantic's ``[key]`` or a union branch's label
    (``openai``: also a plain type's name and every entry that is not an identifier, since an
    OpenAI body's fields are identifiers)."""
    if not isinstance(part, str):
        return False
    if part == KEY or _LABEL.match(part):
        return True
    return openai and (part in TYPE_TAGS or not part.isidentifier())


def param_path(loc: Iterable[Any], prefix: str = "", *, openai: bool = False) -> str:
    """The field path of a pydantic ``loc`` (below ``prefix``, when given): see the module."""
    parts = list(loc)
    if openai and parts[:1] == [BODY]:
        parts = parts[1:]
    out = prefix
    for part in parts:
        if is_branch_label(part, openai):
            continue
        if isinstance(part, int) and not isinstance(part, bool):
            out += f".[{part}]" if openai and out else f"[{part}]"
        elif isinstance(part, str):  # a client's dict key may be long
            out += f".{clip(part)}" if out else clip(part)
        else:
            out += f".{part}" if out else str(part)
        if openai and part == STEERING_FIELD:
            openai = False
    return out
