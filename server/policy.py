"""A key's steering policy: what the steering a request sends on its own may ask for.

A policy is checked against the request's OWN steering layer (:attr:`Routing.own`), before
anything is compiled or sent to the engine; a violation is a 403 ``permission_denied`` whose
``param`` names the field, and nothing is applied. Presets and experiment variants are created by
admins, so their layers are vetted and exempt: a key whose policy denies ``pirate`` may still
call ``<model>:pirate``. A ``protect`` rule is checked on the request's own entries only, so it
holds on top of any preset: a user cannot push a protected feature out of its bounds.

Feature names in a policy are matched against the canonical ``pack/feature`` name a request's
name resolves to (:meth:`PackRegistry.resolve`): ``pack/feature`` matches that feature, ``pack/*``
every feature and SAE latent of the pack, a bare ``feature`` that feature in any pack. A request
name that resolves to nothing is left to the compiler (a 400 ``unknown_feature``).

A policy may also *impose* monitors (``monitors``): they are added to every generation of the
key, after presets and variants (:func:`impose`), and reported in its responses like the
request's own; a request cannot remove them.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, PositiveInt, model_validator

from server.errors import PermissionDenied
from steering.request import KeyBound, KeyBoundExceeded
from steering.spec import MAX_MONITORS, FeatureSetting, MonitorSpec, SteeringSpec, merge

DENIAL_REASONS = ("role", "feature", "strength", "protected", "raw_vectors", "return_activations",
                  "inspect", "max_slots", "vector_norm", "workshop")
"""The ``reason`` label of ``steer_policy_denials_total`` (a bounded set)."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, frozen=True)


class Bounds(_Strict):
    """How far a protected feature may be pushed (add mode, in calibrated strength units)."""

    min: float | None = None
    """Lowest strength allowed (``0.0``: the feature may only be pushed up)."""
    max: float | None = None
    """Highest strength allowed."""

    @model_validator(mode="after")
    def _ordered(self) -> Bounds:
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"min ({self.min}) is above max ({self.max})")
        return self


class FeatureRule(_Strict):
    """Which named features a key may steer: exactly one of an allow list and a deny list."""

    allow: list[str] | None = None
    """Only these (``pack/feature``, ``pack/*`` or a bare ``feature``)."""
    deny: list[str] | None = None
    """Everything but these."""

    @model_validator(mode="after")
    def _one(self) -> FeatureRule:
        if (self.allow is None) == (self.deny is None):
            raise ValueError("give exactly one of 'allow' and 'deny'")
        return self


class Rate(_Strict):
    """Token buckets per key (:mod:`server.ratelimit`); unset: unlimited."""

    requests_per_minute: PositiveInt | None = None
    """Requests of any /v1 route."""
    tokens_per_minute: PositiveInt | None = None
    """Prompt tokens plus ``n`` × the most output tokens a generation may produce, charged up
    front (as OpenAI counts ``max_tokens``); set ``max_tokens`` close to what you need."""


class Policy(_Strict):
    """Limits of one key beyond the server's own flags; every field unset means no extra limit."""

    max_strength: float | None = Field(None, gt=0)
    """Largest |strength| of a named feature and |scale| of a raw vector in the request's own
    steering (the server's ``--max-steering-strength`` still applies)."""
    raw_vectors: bool = True
    """May the request send inline ``steering.vectors``?"""
    return_activations: bool = True
    """May the request ask for ``steering.return_activations`` (and call inspect, a readout)?"""
    features: FeatureRule | None = None
    """Allow or deny list of named features (SAE latents included: they are ``pack/L12:123``)."""
    protect: dict[str, Bounds] = Field(default_factory=dict)
    """Features the request's own steering may only add, within bounds: ablate, clamp, scale or
    a strength outside ``[min, max]`` → 403. Presets and variants are exempt."""
    max_slots: PositiveInt | None = None
    """Distinct steering configurations this key may have in flight at once (beyond: 429)."""
    max_vector_norm: float | None = Field(None, gt=0)
    """Largest ‖scale·v‖ of the request's own raw vectors (and |clamp target|), in units of the
    layer's median residual-stream norm: the compiler's bound with a smaller factor."""
    rate: Rate | None = None
    """Requests and tokens per minute."""
    workshop: bool = False
    """May the key make and delete custom features (``POST /v1/features``)? Admin keys may."""
    monitors: list[MonitorSpec] = Field(default_factory=list, max_length=MAX_MONITORS)
    """Monitors added to every generation of the key (``flag`` to watch, ``stop`` to end a
    generation where a feature fires)."""


class PolicyViolation(PermissionDenied):
    """A 403 from a key's policy; ``reason`` is its metrics label (one of DENIAL_REASONS)."""

    def __init__(self, reason: str, message: str, param: str | None) -> None:
        super().__init__(message, param, "permission_denied")
        assert reason in DENIAL_REASONS, reason
        self.reason = reason


def canonical_name(name: str, packs: Any) -> str | None:
    """``pack/feature`` that ``name`` resolves to on the loaded packs; None when it does not."""
    if packs is None:
        return None
    try:
        return packs.resolve(name).name
    except Exception:  # noqa: BLE001  (unknown or ambiguous: the compiler says which)
        return None


def matches(pattern: str, canonical: str) -> bool:
    """Does a policy name (``pack/feature``, ``pack/*`` or bare ``feature``) name ``canonical``?"""
    pack, _, local = canonical.partition("/")
    if pattern.endswith("/*"):
        return pattern[:-2] == pack
    if "/" in pattern:
        return pattern == canonical
    return pattern == local


def feature_allowed(policy: Policy, canonical: str) -> bool:
    rule = policy.features
    if rule is None:
        return True
    if rule.allow is not None:
        return any(matches(p, canonical) for p in rule.allow)
    return not any(matches(p, canonical) for p in rule.deny or ())


def check(policy: Policy, own: SteeringSpec | None, packs: Any) -> None:
    """Raise :class:`PolicyViolation` for the first field of ``own`` that ``policy`` forbids."""
    if own is None:
        return
    for name, setting in own.features.items():
        _check_feature(policy, name, setting, packs)
    if own.vectors and not policy.raw_vectors:
        raise PolicyViolation("raw_vectors", "this key may not send raw steering vectors; use "
                              "named features", "steering.vectors[0]")
    for i, vec in enumerate(own.vectors):
        if policy.max_strength is not None and abs(vec.scale) > policy.max_strength:
            raise PolicyViolation("strength", f"|scale| = {abs(vec.scale):g} exceeds this key's "
                                  f"maximum {policy.max_strength:g}", f"steering.vectors[{i}].scale")
    if own.return_activations and not policy.return_activations:
        raise PolicyViolation("return_activations", "this key may not read activations back",
                              "steering.return_activations")


def _check_feature(policy: Policy, name: str, setting: FeatureSetting, packs: Any) -> None:
    param = f"steering.features.{name}"
    strength_param = param if setting.bare else f"{param}.strength"
    canonical = canonical_name(name, packs)
    if canonical is None:
        return  # the compiler rejects it (400): nothing is applied either way
    if not feature_allowed(policy, canonical):
        raise PolicyViolation("feature", f"this key may not steer the feature {name!r}", param)
    if (policy.max_strength is not None and setting.strength is not None
            and abs(setting.strength) > policy.max_strength):
        raise PolicyViolation("strength", f"|strength| = {abs(setting.strength):g} exceeds this "
                              f"key's maximum {policy.max_strength:g}", strength_param)
    for pattern, bounds in policy.protect.items():
        if not matches(pattern, canonical):
            continue
        mode = setting.mode or packs.resolve(name).default_mode
        if mode != "add":
            raise PolicyViolation("protected", f"{name!r} is protected: this key may only add it "
                                  f"(mode {mode!r} is not allowed)",
                                  f"{param}.mode" if setting.mode else param)
        s = setting.strength
        if s is None:
            continue  # add needs a strength: the compiler says so
        if (bounds.min is not None and s < bounds.min) or (bounds.max is not None and s > bounds.max):
            raise PolicyViolation("protected", f"{name!r} is protected: this key may only push it "
                                  f"within [{_fmt(bounds.min)}, {_fmt(bounds.max)}], not {s:g}",
                                  strength_param)


def key_bound(policy: Policy | None, own: SteeringSpec | None,
              steering: SteeringSpec | None) -> KeyBound | None:
    """The policy's ``max_vector_norm`` as the compiler's :class:`KeyBound` over the request's own
    raw vectors — the last ones of the merged ``steering`` (preset and variant vectors come first
    and stay exempt). The compile that runs the request checks it: a vector the server accepts but
    this policy refuses is a 403 naming it (:func:`vector_norm_denied`); a vector the server
    refuses anyway keeps its 400."""
    if policy is None or policy.max_vector_norm is None or own is None or not own.vectors \
            or steering is None:
        return None
    return KeyBound(policy.max_vector_norm, first=len(steering.vectors) - len(own.vectors))


def vector_norm_denied(exc: KeyBoundExceeded) -> PolicyViolation:
    return PolicyViolation("vector_norm", f"{exc.message} (this key's max_vector_norm: "
                           f"{exc.factor:g})", exc.param)


def check_inspect(policy: Policy, features: list[str], steering: SteeringSpec | None,
                  packs: Any) -> None:
    """Inspect is a readout: it needs ``return_activations: true``; its ``features`` follow the
    allow/deny list and its ``steering`` the whole policy."""
    if not policy.return_activations:
        raise PolicyViolation("inspect", "this key may not inspect activations "
                              "(its policy has return_activations: false)", None)
    for i, name in enumerate(features):
        canonical = canonical_name(name, packs)
        if canonical is not None and not feature_allowed(policy, canonical):
            raise PolicyViolation("feature", f"this key may not read the feature {name!r}",
                                  f"features[{i}]")
    check(policy, steering, packs)


def impose(policy: Policy, steering: SteeringSpec | None) -> SteeringSpec | None:
    """``steering`` (already merged with presets and variants) with the policy's monitors added."""
    if not policy.monitors:
        return steering
    return merge(steering, SteeringSpec(monitors=list(policy.monitors)))


def _fmt(x: float | None) -> str:
    return "…" if x is None else f"{x:g}"
