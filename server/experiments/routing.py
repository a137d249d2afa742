"""Routing one generation request through presets and experiments.

Layering of a request's steering, later layers overriding earlier ones
(:func:`steering.spec.merge`):
    preset (from ``model: "<base>:<preset>"``) → experiment variant → the request's own ``steering``.
Per layer: ``features`` are merged per feature name (the later value wins), ``vectors`` are
concatenated (earlier first), ``apply_to`` and ``return_activations`` are replaced.

An experiment is entered with ``"steering": {"experiment": NAME}`` or ``model: "<base>:exp/NAME"``.
A running experiment assigns the unit (the OpenAI ``user`` field, else the ``x-steer-user`` header,
else a random id per request) to a variant by :func:`server.experiments.assign.assign`; its
exposure is recorded when the response ends, with its outcome. A paused or stopped experiment
serves its control variant and records nothing.

Inside an experiment the variant's steering is what is measured, so a request there may not
add steering of its own (``features``, ``vectors``, ``apply_to``, ``return_activations``) nor a
preset (``<base>:<preset>`` with ``steering.experiment``): a user's request that does is refused
with 403 ``permission_denied`` (param ``steering``, or ``model`` for the preset) and nothing runs.
An admin's request may: it is served with the override, marked (``experiment.excluded: true`` in
the body, header ``x-steer-excluded: true``) and recorded with the outcome ``excluded``, so that
results count it per variant but never score it.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from server.errors import InvalidRequest, ModelNotFound, NotFound, PermissionDenied
from server.experiments import assign
from server.experiments.models import Experiment, Preset, Variant
from steering.spec import SteeringSpec, merge

USER_HEADER = "x-steer-user"
EXCLUDED_HEADER = "x-steer-excluded"
EXPERIMENT_MODEL = "exp/"
"""``<base>:exp/NAME`` names an experiment; ``<base>:NAME`` a preset."""


@dataclass
class Routing:
    """How one request was routed: the model name to echo and its experiment assignment."""

    model: str | None = None
    """The model name as the request gave it (``<base>:<preset>``), echoed in the response."""
    experiment: str | None = None
    experiment_id: str | None = None
    """The id of the experiment that assigned the variant (its exposure is written to that one)."""
    variant: str | None = None
    unit_hash: str | None = None
    """sha256 of the assigned unit (never the raw id)."""
    unit_kind: str | None = None
    """user, header or random: where the unit came from."""
    record: bool = False
    """Record an exposure when the response ends (the experiment is running)."""
    excluded: bool = False
    """An admin overrode the variant's steering: served, but never scored in the results."""
    finished: bool = False
    """The exposure was handed over (a response ends once)."""
    own: SteeringSpec | None = None
    """The request's own steering layer, before presets and variants were merged under it (what a
    key's policy checks in full: :func:`server.policy.check`)."""
    steering: SteeringSpec | None = None
    """The steering to run: the preset's and the variant's layers under the request's own (a new
    spec; the request itself is never changed). None: no steering."""

    def headers(self) -> dict[str, str]:
        if self.experiment is None:
            return {}
        out = {"x-steer-experiment": self.experiment, "x-steer-variant": self.variant or ""}
        if self.excluded:
            out[EXCLUDED_HEADER] = "true"
        return out

    def body_field(self) -> dict[str, Any] | None:
        if self.experiment is None:
            return None
        out: dict[str, Any] = {"name": self.experiment, "variant": self.variant or ""}
        if self.excluded:
            out["excluded"] = True
        return out


def route(req: Any, headers: Mapping[str, str] | None, *, served_names: Sequence[str],
          presets: Mapping[str, Preset], experiments: Mapping[str, Experiment],
          packs: Any = None, admin: bool = False) -> Routing:
    """Resolve presets / experiments of ``req`` without changing it: ``routing.steering`` is the
    merged steering (without its ``experiment``), ``routing.model`` the ``<base>:<suffix>`` name a
    preset or experiment model was asked by. ``admin``: the caller's
    key is an admin's, who may override a variant's steering (see the module docstring)."""
    routing = Routing()
    preset, exp_name = _model_suffix(req, routing, served_names, presets, experiments)
    steering = req.steering
    named = steering.experiment if steering is not None else None
    if named is not None:
        rest = steering.model_fields_set - {"experiment"}
        steering = steering.model_copy(update={"experiment": None}) if rest else None
        if exp_name is not None and named != exp_name:
            raise InvalidRequest(f"the model names experiment {exp_name!r} but steering names "
                                 f"{named!r}", "steering.experiment")
        if named not in experiments:
            raise NotFound(f"no experiment named {named!r}", "steering.experiment")
        exp_name = named
    variant_layer = None
    if exp_name is not None:
        override = _override(steering, preset)
        if override is not None and not admin:
            raise PermissionDenied(
                f"a request inside experiment {exp_name!r} runs its variant's steering as it is: "
                f"{'a preset model' if override == 'model' else 'steering of its own'} may not be "
                "added (only an admin key may, and its response is excluded from the results)",
                override)
        exp = experiments[exp_name]
        variant = _assign(exp, req, headers, routing)
        routing.experiment, routing.variant = exp_name, variant.name
        routing.experiment_id, routing.excluded = exp.id or exp.name, override is not None
        variant_layer = variant.steering
    routing.own = steering
    preset_layer = preset.steering if preset is not None else None
    if preset_layer is not None or variant_layer is not None:
        routing.steering = merge(*(canonical(x, packs) for x in (preset_layer, variant_layer, steering)))
    else:
        routing.steering = steering
    return routing


def _override(own: SteeringSpec | None, preset: Preset | None) -> str | None:
    """The param of what a request adds to its experiment variant's steering (None: nothing)."""
    if preset is not None:
        return "model"
    if own is not None and (own.features or own.vectors
                            or own.model_fields_set & {"apply_to", "return_activations"}):
        return "steering"
    return None


def _model_suffix(req: Any, routing: Routing, served_names: Sequence[str],
                  presets: Mapping[str, Preset], experiments: Mapping[str, Experiment],
                  ) -> tuple[Preset | None, str | None]:
    """The preset or experiment that ``<base>:<suffix>`` names (``routing.model`` records it)."""
    model = req.model
    if not isinstance(model, str) or ":" not in model:
        return None, None
    for base in served_names:
        if not model.startswith(base + ":"):
            continue
        suffix = model[len(base) + 1:]
        preset, exp_name = None, None
        if suffix.startswith(EXPERIMENT_MODEL):
            exp_name = suffix[len(EXPERIMENT_MODEL):]
            if exp_name not in experiments:
                raise ModelNotFound(f"The model '{model}' does not exist: no experiment "
                                    f"named {exp_name!r}", "model")
        else:
            preset = presets.get(suffix)
            if preset is None:
                raise ModelNotFound(f"The model '{model}' does not exist: no preset "
                                    f"named {suffix!r}", "model")
        routing.model = model
        return preset, exp_name
    return None, None


def _assign(exp: Experiment, req: Any, headers: Mapping[str, str] | None, routing: Routing) -> Variant:
    """The variant of ``exp`` that serves ``req`` (the control unless it is running)."""
    if exp.status != "running":
        return exp.control
    user = getattr(req, "user", None)
    header = headers.get(USER_HEADER) if headers is not None else None
    if exp.unit == "user" and user:
        unit, kind = f"user:{user}", "user"
    elif exp.unit == "user" and header:
        unit, kind = f"user:{header}", "header"
    else:
        unit, kind = f"random:{uuid.uuid4().hex}", "random"
    idx = assign.assign(exp.name, unit, [v.weight for v in exp.variants])
    routing.unit_hash, routing.unit_kind, routing.record = assign.unit_hash(unit), kind, True
    return exp.variants[idx]


def canonical(layer: SteeringSpec | None, packs: Any) -> SteeringSpec | None:
    """``layer`` with feature names resolved to ``pack/feature`` where they resolve, so that
    ``pirate`` in a request overrides ``smollm2-tone/pirate`` in a preset."""
    if layer is None or packs is None or not layer.features:
        return layer
    feats = {}
    for name, setting in layer.features.items():
        try:
            name = packs.resolve(name).name
        except Exception:  # noqa: BLE001  (unknown/ambiguous: the compiler reports it)
            pass
        feats[name] = setting
    return layer.model_copy(update={"features": feats})
