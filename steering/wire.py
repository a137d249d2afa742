"""The record a steered request carries to the workers: ``SamplingParams.extra_args["steering"]``.

The API server builds it from a compiled steering (:meth:`steering.request.CompiledSteering.wire`);
the worker shim reads it back with :meth:`WireRecord.from_extra_args` when the request is first
scheduled. It holds only msgpack-friendly values (ints, strings, bytes, lists, dicts): vLLM
serialises ``extra_args`` between processes, and no pickle is ever involved.
"""

from __future__ import annotations

from enum import IntEnum
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from steering.validation import first_error

WIRE_VERSION = 1
EXTRA_ARGS_KEY = "steering"

ApplyToName = Literal["all", "prompt", "generated"]


class ApplyTo(IntEnum):
    """Which of a request's tokens are steered (the wire form of ``steering.apply_to``)."""

    ALL = 0
    PROMPT = 1
    GENERATED = 2

    @classmethod
    def named(cls, name: ApplyToName) -> ApplyTo:
        return cls[name.upper()]


class WireError(ValueError):
    """A malformed steering record reached a worker (a version mismatch or a foreign client)."""


class WireRecord(BaseModel):
    """What one request asks of the workers."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    v: Literal[1] = WIRE_VERSION
    """Wire version; a worker refuses records of another version."""
    hash: str
    """Content hash of the program's tables: requests with equal hashes share a slot."""
    apply_to: ApplyTo = ApplyTo.ALL
    readout: bool = False
    """File post-steering activations for this request."""
    program: dict[str, Any]
    """:meth:`steering.program.SteeringProgram.to_wire` (little-endian float32 bytes per layer)."""
    readout_key: str | None = None
    """Where the worker files the readout (the API server's request id); None = the request id."""
    capture: tuple[int, ...] = ()
    """Layers whose steered residual stream is filed too (feature inspection)."""
    monitors: dict[str, Any] | None = None
    """:func:`steering.monitors.monitors_to_wire`: the request's monitors and the key (the API
    server's request id) their report is kept under; None = not monitored."""

    @property
    def steers(self) -> bool:
        """The program changes some layer (a capture-only readout takes no slot)."""
        return bool(self.program.get("layers"))

    def to_extra_args(self) -> dict[str, Any]:
        """The ``SamplingParams.extra_args`` entry (plain ints, no enum objects)."""
        out: dict[str, Any] = {"v": self.v, "hash": self.hash, "apply_to": int(self.apply_to),
                               "readout": self.readout, "program": self.program}
        if self.readout_key is not None:
            out["readout_key"] = self.readout_key
        if self.capture:
            out["capture"] = list(self.capture)
        if self.monitors is not None:
            out["monitors"] = self.monitors
        return {EXTRA_ARGS_KEY: out}

    @classmethod
    def from_extra_args(cls, extra_args: dict[str, Any] | None) -> WireRecord | None:
        """The record in ``extra_args``, None when the request is unsteered."""
        raw = (extra_args or {}).get(EXTRA_ARGS_KEY)
        if raw is None:
            return None
        if isinstance(raw, cls):
            return raw
        try:
            return cls.model_validate(raw)
        except ValidationError as exc:
            raise WireError(f"malformed steering record: {first_error(exc)['msg']}") from None
