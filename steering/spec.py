"""The `steering` object of a request as typed data: its shape, validated in one place (pydantic).

    "steering": {
      "features": {"formality": 0.6, "golden_gate": {"strength": 4.0, "mode": "clamp"}},
      "vectors":  [{"layer": 12, "values": [...d floats], "scale": 2.0, "mode": "add"},
                   {"layer": 12, "base64": "<little-endian float32>", "mode": "clamp", "target": 3.0}],
      "apply_to": "all" | "prompt" | "generated",
      "return_activations": false,
      "monitors": [{"feature": "refusal", "above": 3.0, "action": "flag" | "stop"}]
    }

Any feature or vector may carry a condition, ``"when": {"feature": "code", "above": 2.0}``: it
then steers only the tokens where the condition holds (:mod:`steering.monitors` has the semantics).

This module checks what the object alone can tell: field names, types, enums, finite numbers.
What depends on the engine — layers, hidden size, bounds, feature names, which fields a mode
needs — is checked when the spec is compiled (:class:`steering.request.SteeringCompiler`).
Both raise :class:`SteeringError` with an OpenAI-style ``param`` path such as
``steering.vectors[0].values`` or ``steering.features.formality.strength``.
"""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import (
    BaseModel,
    StringConstraints,
    ConfigDict,
    Field,
    PlainSerializer,
    PlainValidator,
    PrivateAttr,
    Strict,
    StrictBool,
    StrictInt,
    ValidationError,
    WithJsonSchema,
    field_validator,
    model_serializer,
    model_validator,
)
from pydantic_core import PydanticCustomError

from steering import validation
from steering.features import Mode
from steering.wire import ApplyToName

_JSON_NUMBERS = frozenset((int, float))  # exact types; bool is neither


class SteeringError(ValueError):
    """Invalid steering in a request; ``param`` names the offending field."""

    def __init__(self, message: str, param: str = "steering", code: str = "invalid_steering"):
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code


def _float_vector(value: Any) -> np.ndarray:
    """A JSON list of finite numbers → float64 array (the fast path checks exact types only)."""
    if isinstance(value, np.ndarray):
        v = np.asarray(value, dtype=np.float64)
    elif isinstance(value, list) and (
        _JSON_NUMBERS.issuperset(map(type, value))
        or all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in value)
    ):
        v = np.asarray(value, dtype=np.float64)
    else:
        raise PydanticCustomError("float_vector", "values must be a list of numbers")
    if v.ndim != 1:
        raise PydanticCustomError("float_vector", "values must be a flat list of numbers")
    if not np.all(np.isfinite(v)):
        raise PydanticCustomError("finite_vector", "vector contains NaN or inf")
    return v


FloatVector = Annotated[
    np.ndarray,
    PlainValidator(_float_vector),
    PlainSerializer(lambda v: [float(x) for x in v]),
    WithJsonSchema({"type": "array", "items": {"type": "number"},
                    "description": "hidden_size finite numbers"}),
]
Number = Annotated[float, Strict()]
"""A JSON number (an integer is accepted; a boolean or a string is not); finite by the config."""
FeatureName = Annotated[str, Strict(), StringConstraints(min_length=1, max_length=256)]
"""A named feature in a condition or a monitor (``name`` or ``pack/name``)."""
MAX_MONITORS = 8
"""Monitors one request may carry (its own, its preset's, its variant's and its key's together)."""


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, arbitrary_types_allowed=True)


class Threshold(_Spec):
    """A named feature's activation compared with a threshold, per token: exactly one of
    ``above`` (act > x) and ``below`` (act < x). act is the feature's own readout
    (:meth:`steering.features.Feature.activation`: the units ``/v1/features/inspect`` reports)."""

    feature: FeatureName
    above: Number | None = None
    below: Number | None = None

    @model_validator(mode="after")
    def _one_bound(self) -> Threshold:
        if (self.above is None) == (self.below is None):
            raise PydanticCustomError("threshold", "give exactly one of above and below")
        return self

    @property
    def sign(self) -> float:
        """+1 for ``above``, -1 for ``below``: the test is sign·(act − threshold) > 0."""
        return 1.0 if self.above is not None else -1.0

    @property
    def threshold(self) -> float:
        return float(self.above if self.above is not None else self.below)


class Condition(Threshold):
    """``when``: the entry steers a token only where this holds for that token."""


class MonitorSpec(Threshold):
    """Watch a feature on the generated tokens; report when it crosses, and with ``stop`` end
    the generation at that token (``finish_reason: "content_filter"``)."""

    action: Literal["flag", "stop"] = "flag"


class FeatureSetting(_Spec):
    """One named feature: ``{"strength": s, "mode": m}`` or a bare number (the strength)."""

    strength: Number | None = None
    """Dose in calibrated units (1.0 = the feature's calibration scale); ablate needs none."""
    mode: Mode | None = None
    """add, clamp, scale or ablate; default: the feature's own default mode."""
    when: Condition | None = None
    """Steer only the tokens where this condition holds (None: every token)."""
    _bare: bool = PrivateAttr(False)

    @model_validator(mode="wrap")
    @classmethod
    def _number_or_object(cls, value: Any, handler: Any) -> FeatureSetting:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):
                raise PydanticCustomError("finite_number", "strength must be finite")
            setting = handler({"strength": value})
            setting._bare = True
            return setting
        if not isinstance(value, (dict, FeatureSetting)):
            raise PydanticCustomError(
                "feature_setting", "a feature takes a strength (number) or {strength, mode}")
        return handler(value)

    @property
    def bare(self) -> bool:
        """Given as a bare number: errors about the strength name the feature itself."""
        return self._bare

    @model_serializer(mode="wrap")
    def _dump(self, handler: Any) -> Any:
        """A bare number dumps as the number: a stored spec reads back as it was written."""
        return self.strength if self._bare else handler(self)


class VectorSpec(_Spec):
    """A raw direction at one layer: exactly one of ``values`` and ``base64``."""

    layer: StrictInt
    """Decoder layer whose output (``blocks.L.hook_resid_post``) is steered."""
    values: FloatVector | None = None
    """hidden_size numbers."""
    base64: str | None = None
    """hidden_size little-endian float32, base64-encoded (4·d bytes)."""
    scale: Number = 1.0
    """add: the vector is multiplied by it; scale: the factor on the projection."""
    mode: Mode = "add"
    target: Number | None = None
    """clamp: the activation (projection on the unit direction) to pin."""
    when: Condition | None = None
    """Steer only the tokens where this condition holds (None: every token)."""


class SteeringSpec(_Spec):
    """A request's steering, before compilation."""

    features: dict[FeatureName, FeatureSetting] = Field(default_factory=dict)
    """Named features from the loaded packs (``name`` or ``pack/name``) → strength or setting."""
    vectors: list[VectorSpec] = Field(default_factory=list)
    apply_to: ApplyToName = "all"
    """Which tokens are steered: all, the prompt's, or the generated ones."""
    return_activations: StrictBool = False
    """Report the steered features' activations per token after the op."""
    monitors: Annotated[list[MonitorSpec], Field(max_length=MAX_MONITORS)] = Field(default_factory=list)
    """Features watched on the generated tokens (a monitor needs no steering)."""

    @field_validator("features", "vectors", "monitors", mode="before")
    @classmethod
    def _null_is_empty(cls, value: Any, info: Any) -> Any:
        if value is None:
            return {} if info.field_name == "features" else []
        return value

    def feature_names(self) -> set[str]:
        """Every feature name the spec uses, as written: steered, a condition's or a monitor's."""
        names = set(self.features)
        names.update(s.when.feature for s in self.features.values() if s.when is not None)
        names.update(v.when.feature for v in self.vectors if v.when is not None)
        names.update(m.feature for m in self.monitors)
        return names

    @property
    def empty(self) -> bool:
        """Asks for nothing (no feature, no vector, no monitor)."""
        return not self.features and not self.vectors and not self.monitors

    @classmethod
    def parse(cls, payload: Any, prefix: str = "steering") -> SteeringSpec:
        """Validate ``payload``; a SteeringError names the first bad field under ``prefix``."""
        if isinstance(payload, cls):
            return payload
        try:
            return cls.model_validate(payload)
        except ValidationError as exc:
            raise steering_error(validation.first_error(exc), prefix) from None


def merge(*layers: SteeringSpec | None) -> SteeringSpec | None:
    """Later over earlier: features merged per name, vectors and monitors concatenated, ``apply_to`` and
    ``return_activations`` replaced where a later layer sets them. None when nothing is left."""
    out: SteeringSpec | None = None
    for layer in layers:
        if layer is None:
            continue
        if out is None:
            out = layer.model_copy(deep=True)
            continue
        update: dict[str, Any] = {
            "features": {**out.features, **layer.features},
            "vectors": [*out.vectors, *layer.vectors],
            "monitors": [*out.monitors, *layer.monitors],
        }
        for name in ("apply_to", "return_activations"):
            if name in layer.model_fields_set:
                update[name] = getattr(layer, name)
        fields_set = out.model_fields_set | layer.model_fields_set
        out = out.model_copy(update=update, deep=True)
        out.__pydantic_fields_set__ = set(fields_set)
    return out


def param_path(loc: tuple[Any, ...], prefix: str = "steering") -> str:
    """A pydantic location inside a steering object → its param path:
    ``('vectors', 0, 'values')`` → ``steering.vectors[0].values``
    (:func:`steering.validation.param_path` under ``prefix``)."""
    return validation.param_path(loc, prefix)


def steering_error(error: Any, prefix: str = "steering") -> SteeringError:
    """One pydantic error dict (:func:`steering.validation.first_error`) as a SteeringError."""
    loc = tuple(error.get("loc", ()))
    param = param_path(loc, prefix)
    kind = error.get("type")
    if kind == "extra_forbidden":
        message = f"unknown field {validation.echo(str(loc[-1]))}"
    elif kind == "missing":
        message = f"{loc[-1]} is required" if loc else "steering is required"
    elif kind in ("model_type", "model_attributes_type", "dict_type") and not loc:
        message = "steering must be an object"
    else:
        message = f"{param}: {error.get('msg', 'invalid value')}"
    return SteeringError(message, param)
