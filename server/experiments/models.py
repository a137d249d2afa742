"""The experiments domain as typed data, each object validated in one place (pydantic).

    Preset       a named steering config, served as the model ``<base>:<name>``
    Variant      one arm of an experiment: a preset (snapshotted) or inline steering, a weight
    Experiment   named variants (exactly one control), the assignment unit and a status
    ExperimentPatch, Feedback    the other admin request bodies
    PresetsFile  the presets YAML file

``NewPreset`` and ``NewExperiment`` are the POST bodies; ``Preset`` and ``Experiment`` add what
the server sets (``source``, ``created``) and are what it stores, as ``model_dump(mode="json")``.

These models check what an object alone can tell. What needs the server — whether a variant's
preset exists, whether steering compiles on this engine — is checked by
:class:`server.experiments.manager.ExperimentManager`. A bad field raises a ValidationError that
:func:`server.errors.validation_error` turns into a 400 naming it (``variants.[1].weight``).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PlainSerializer,
    StrictBool,
    StrictStr,
    StringConstraints,
    ValidationError,
    field_validator,
    model_serializer,
    model_validator,
)
from pydantic_core import InitErrorDetails, PydanticCustomError

from steering.spec import Number, SteeringSpec

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
MAX_VARIANTS = 16
MAX_WEIGHT = 1e6
"""A variant's weight is finite and in (0, MAX_WEIGHT]."""
MAX_SCORE = 1e6
"""A feedback score is finite and in [-MAX_SCORE, MAX_SCORE]."""

Name = Annotated[StrictStr, StringConstraints(pattern=NAME_PATTERN)]
"""A preset, experiment or variant name: it appears in model names and URLs."""
Unit = Literal["user", "request"]
Status = Literal["running", "paused", "stopped"]
Label = Literal["good", "bad"]


def steering_json(spec: SteeringSpec) -> dict[str, Any]:
    """``spec`` as the client wrote it: only the fields it set, a bare strength stays a number."""
    return spec.model_dump(mode="json", exclude_unset=True)


Steering = Annotated[SteeringSpec, PlainSerializer(steering_json)]
"""A steering spec that is stored and shown as it was given."""


def error_at(loc: tuple[str | int, ...], kind: str, message: str, value: Any) -> ValidationError:
    """A validation error at ``loc`` below the field (or model) whose validator raises it."""
    return ValidationError.from_exception_data(
        "experiments", [InitErrorDetails(type=PydanticCustomError(kind, message), loc=loc, input=value)])


def _reject_unknown(model: type[BaseModel], data: Any) -> None:
    if isinstance(data, dict):
        for key, value in data.items():
            if key not in model.model_fields:
                raise ValidationError.from_exception_data(
                    model.__name__, [InitErrorDetails(type="extra_forbidden", loc=(key,), input=value)])


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, use_attribute_docstrings=True)

    @model_validator(mode="before")
    @classmethod
    def _unknown_fields_first(cls, data: Any) -> Any:
        """A field the model does not know is reported before any other error: nothing a client
        sends is ignored, and a misspelt field is named as such."""
        _reject_unknown(cls, data)
        return data


# -- presets ---------------------------------------------------------------------------------
class NewPreset(_Model):
    """``POST /v1/presets``: a named steering config, served as the model ``<base>:<name>``."""

    name: Name
    steering: Steering
    """What the preset steers: features and/or vectors (it must steer something)."""
    description: StrictStr = ""

    @model_validator(mode="before")
    @classmethod
    def _steering_required(cls, data: Any) -> Any:
        _reject_unknown(cls, data)
        if isinstance(data, dict) and data.get("steering") is None:
            raise error_at(("steering",), "steering_required", "steering is required", None)
        return data

    @field_validator("steering")
    @classmethod
    def _steers_something(cls, spec: SteeringSpec) -> SteeringSpec:
        if spec.empty:
            raise PydanticCustomError("empty_steering",
                                      "a preset must steer or monitor something (features, vectors or monitors)")
        return spec


class Preset(NewPreset):
    """A served preset."""

    source: Literal["file", "api"] = "api"
    """``file``: from the presets file (read-only here); ``api``: created through the API (stored)."""


class FilePreset(_Model):
    """One entry of the presets file: ``NAME: {steering: {...}, description: ...}``."""

    steering: Steering
    description: StrictStr = ""

    @model_validator(mode="before")
    @classmethod
    def _needs_steering(cls, data: Any) -> Any:
        if not isinstance(data, dict) or not isinstance(data.get("steering"), dict):
            raise PydanticCustomError("preset_entry", "a preset needs a 'steering' mapping")
        return data


class PresetsFile(_Model):
    """The presets YAML: ``presets: {NAME: {steering, description}}``, or that mapping bare."""

    presets: dict[Name, FilePreset] = Field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _bare_mapping(cls, data: Any) -> Any:
        if data is None:
            return {}
        if isinstance(data, dict) and "presets" not in data:
            return {"presets": data}
        return data

    def entries(self) -> list[Preset]:
        return [Preset(name=name, steering=p.steering, description=p.description, source="file")
                for name, p in self.presets.items()]


# -- experiments -----------------------------------------------------------------------------
class Variant(_Model):
    """One arm of an experiment."""

    name: Name
    preset: StrictStr | None = None
    """The preset it serves; the experiment keeps a snapshot of the preset's steering."""
    steering: Steering | None = None
    """Its steering (a preset's snapshot, or given inline); none: the unsteered model."""
    weight: Number = Field(1.0, gt=0, le=MAX_WEIGHT)
    """Relative share of the units assigned to it (finite, 0 < weight <= 1e6)."""
    control: StrictBool = False
    """The baseline the other variants are compared with; served while paused or stopped."""

    @model_serializer(mode="wrap")
    def _without_preset(self, handler: Any) -> dict[str, Any]:
        out = handler(self)
        if out.get("preset", "") is None:
            del out["preset"]
        return out


class _ExperimentFields(_Model):
    name: Name
    unit: Unit = "user"
    """What is assigned to a variant: a user (the ``user`` field or ``x-steer-user`` header,
    sticky) or each request on its own."""
    description: StrictStr = ""
    variants: list[Variant] = Field(min_length=1, max_length=MAX_VARIANTS)
    """1 to 16 variants with distinct names, exactly one of them the control."""
    status: Status = "running"
    """running: assigns and records; paused or stopped: serves the control, records nothing."""

    @field_validator("variants")
    @classmethod
    def _names_and_control(cls, variants: list[Variant]) -> list[Variant]:
        seen: set[str] = set()
        for i, v in enumerate(variants):
            if v.name in seen:
                raise error_at((i, "name"), "duplicate_name", f"duplicate variant name {v.name!r}",
                               v.name)
            seen.add(v.name)
        controls = sum(v.control for v in variants)
        if controls != 1:
            raise PydanticCustomError(
                "one_control", f"exactly one variant must be the control (found {controls})")
        return variants

    @property
    def control(self) -> Variant:
        return next(v for v in self.variants if v.control)


class NewExperiment(_ExperimentFields):
    """``POST /v1/experiments``; each variant names a preset or gives steering, not both."""

    @field_validator("variants")
    @classmethod
    def _preset_or_steering(cls, variants: list[Variant]) -> list[Variant]:
        for i, v in enumerate(variants):
            if v.preset is not None and v.steering is not None:
                raise error_at((i, "preset"), "preset_and_steering",
                               "give a preset or a steering, not both", v.preset)
        return variants


class Experiment(_ExperimentFields):
    """A stored experiment (its preset variants carry their steering snapshot)."""

    id: StrictStr | None = None
    """Set by the server at creation (a uuid; an experiment stored before ids existed has its
    name): an experiment deleted and created again under the same name is another experiment,
    and its exposures, feedback and results are its own."""
    created: float | None = None
    """Creation time (unix seconds)."""

    @model_serializer(mode="wrap")
    def _without_unset_id(self, handler: Any) -> dict[str, Any]:
        out = handler(self)
        if out.get("id", "") is None:
            del out["id"]
        return out


class ExperimentPatch(_Model):
    """``PATCH /v1/experiments/{name}``: only the status changes; create a new experiment to
    change variants or weights."""

    status: Status


class Feedback(_Model):
    """``POST /v1/experiments/{name}/feedback``: a score, a label or both for one response."""

    response_id: Annotated[StrictStr, StringConstraints(min_length=1)]
    """The ``id`` of a response the experiment recorded."""
    score: Annotated[Number, Field(ge=-MAX_SCORE, le=MAX_SCORE)] | None = None
    """A finite number in [-1e6, 1e6] (higher is better)."""
    label: Label | None = None

    @model_validator(mode="after")
    def _something(self) -> Feedback:
        if self.score is None and self.label is None:
            raise error_at(("score",), "feedback_missing",
                           "give a numeric score or a label (good/bad)", None)
        return self
