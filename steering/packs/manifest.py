"""The pack manifest (``pack.json``, schema 1) as one typed model, validated in one place.

    PackManifest
      schema_version, name, version, description, license
      model: ModelRef {id, fingerprint: ModelFingerprint}
      provenance: Provenance            calibration: PackCalibration
      files: {name: FileEntry}          features: [FeatureEntry]          saes: [SaeEntry]
      FeatureEntry.calibration: FeatureCalibration    FeatureEntry.source: LatentSource
      SaeEntry.calibration: SaeCalibration

:func:`parse_manifest` is the only way a manifest becomes a :class:`PackManifest` (the loader
and :class:`steering.packs.writer.PackWriter` both go through it); any problem is a
:class:`PackError` naming the pack and the field. ``model_dump(exclude_unset=True)`` gives back
the JSON object as written (the catalog serves those dicts unchanged).

Extra fields. Structural parts the loader interprets (the top level, ``model``, the fingerprint,
``files`` entries, a feature's ``source``) forbid unknown keys, so a misspelt optional key
(``"sae"`` for ``"saes"``) is an error instead of a silently empty pack. Features, SAEs and the
provenance / calibration records allow extra keys: builders attach their own evidence there
(``contrastive``, ``concept_matches``, ``apply_b_dec_to_input``, ...) and it travels to the catalog
as is. Numbers are JSON numbers (``true`` is not 1, ``"3"`` is not 3) and must be finite.

(Over 400 lines on purpose: half are the per-field docstrings of the schema, and the schema,
its cross-field checks and the wording of its errors stay in one module so that validation has
one home.)

Over 400 lines because it is the whole pack.json schema, one typed model per section, with
the cross-field checks next to the fields they check.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Annotated, Any, Literal, Mapping, get_args

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, model_validator

from steering.features import MAX_RANK, FeatureKind, Mode
from steering.validation import first_error, param_path

SCHEMA_VERSION = 1
MANIFEST_FILE = "pack.json"
FEATURES_FILE = "features.safetensors"
SAE_FILE = "sae_{id}.safetensors"
SAE_LABELS_FILE = "sae_{id}.labels.json"
SITE = "blocks.{layer}.hook_resid_post"
SaeActivation = Literal["relu", "jumprelu", "topk"]
"""SAELens activations: see :class:`steering.packs.format.SAE` for the formulas."""
SAE_ACTIVATIONS: tuple[str, ...] = get_args(SaeActivation)
# The dose unit (see steering.builders.calibration): scale = DOSE_FRACTION × median ‖h‖ at the layer.
DOSE_FRACTION = 0.25
NO_EFFECT_TAG = "no-measured-effect"
"""Tag ``steer pack calibrate`` gives a feature whose steering moved its scorer at no dose
(search ranks it lower; the UI says so)."""
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$"
"""Pack, feature and SAE names (no ``/`` or ``:``, which address features)."""
_NAME_RE = re.compile(NAME_PATTERN)


class PackError(ValueError):
    """A pack is malformed, corrupt or for another model; the message names pack and problem."""

    def __init__(self, pack: str, problem: str) -> None:
        super().__init__(f"feature pack {pack!r}: {problem}")
        self.pack = pack
        self.problem = problem


def site(layer: int) -> str:
    """The hook site of ``layer``: ``blocks.{layer}.hook_resid_post``."""
    return SITE.format(layer=layer)


def dose_scale(resid_norm_p50: float) -> float:
    """The dose unit c for a layer whose median residual norm is ``resid_norm_p50``."""
    return DOSE_FRACTION * float(resid_norm_p50)


def norm_unit(cal: Mapping[str, Any]) -> float | None:
    """u of a feature's calibration record (a manifest or catalog dict): ``norm_scale`` once
    ``steer pack calibrate`` set the scale, else the dose unit of its ``resid_norm_p50``; None
    when neither is recorded (imported control vectors, raw latents)."""
    if cal.get("norm_scale"):
        return float(cal["norm_scale"])
    if cal.get("resid_norm_p50"):
        return dose_scale(cal["resid_norm_p50"])
    return None


# ---------------------------------------------------------------------------------------------
# field types
# ---------------------------------------------------------------------------------------------
def _name(what: str, show: bool = True) -> AfterValidator:
    """A str validator: [A-Za-z0-9][A-Za-z0-9_.-]* (no ``/`` or ``:``, which address features)."""
    def check(v: str) -> str:
        if not _NAME_RE.match(v):
            raise ValueError(f"{what} {v!r} must match [A-Za-z0-9][A-Za-z0-9_.-]*" if show
                             else f"{what} must match [A-Za-z0-9][A-Za-z0-9_.-]*")
        return v
    return AfterValidator(check)


def _file_names(v: dict[str, Any]) -> dict[str, Any]:
    for name in v:
        if "/" in name or "\\" in name or name.startswith("."):
            raise ValueError(f"file name {name!r} must be a plain name inside the pack")
    return v


Int = Annotated[int, Field(strict=True)]
"""A JSON integer (``true`` and ``"3"`` are refused)."""
Count = Annotated[int, Field(strict=True, ge=0)]
Positive = Annotated[int, Field(strict=True, gt=0)]
Number = Annotated[float, Field(strict=True, allow_inf_nan=False)]
"""A finite JSON number (integers accepted)."""


class _Closed(BaseModel):
    """A structural part of the manifest: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid")


class _Open(BaseModel):
    """A record builders extend: unknown keys are kept and served as they are."""

    model_config = ConfigDict(extra="allow")


# ---------------------------------------------------------------------------------------------
# the model
# ---------------------------------------------------------------------------------------------
class ModelFingerprint(_Closed):
    """What :func:`steering.packs.tensors.model_fingerprint` computes for the pack's model."""

    hidden_size: Positive
    """Residual-stream width d; every direction, encoder and SAE ``d_in`` has this size."""
    num_layers: Positive
    """Decoder layers; feature and SAE layers lie in [0, num_layers)."""
    vocab_size: Positive
    """Vocabulary size (a shape fact that must match the serving model)."""
    tensors: list[str] = []
    """Suffixes of the weights hashed into ``sha256`` (FINGERPRINT_TENSORS that were found)."""
    sha256: str
    """sha256 over name, dtype, shape and raw bytes of those weights (the weight identity)."""


class ModelRef(_Closed):
    """The model the pack was built for."""

    id: str | None = None
    """Human-readable model id (e.g. a Hugging Face repo id); informational."""
    fingerprint: ModelFingerprint
    """Checked against the serving model on load (see :func:`check_fingerprint`)."""


class FileEntry(_Closed):
    """One file of the pack; every listed file is verified on load."""

    sha256: Annotated[str, Field(min_length=1)]
    """Hex sha256 of the file's bytes."""
    bytes: Count | None = None
    """File size in bytes (informational)."""


class Provenance(_Open):
    """How the pack was made (informational). Builders add their own keys after these, e.g.
    ``recipe`` (file name or options), ``corpus`` (what the features were derived from),
    ``seed`` and ``method`` (contrastive fits)."""

    date: str | None = None
    """ISO-8601 UTC time the pack was written."""
    builder: str | None = None
    """The builder or importer that wrote it (e.g. ``steering.packs.contrastive/1``)."""
    git: str | None = None
    """Short git revision of the builder's checkout, when known."""
    source: str | None = None
    """The imported file or folder (imports)."""


class PackCalibration(_Open):
    """The pack-wide calibration: unit and corpus (see ``steering.builders.calibration``)."""

    unit: str | None = None
    """What strength 1.0 means, in words."""
    corpus: str | dict[str, Any] | None = None
    """Calibration corpus (name, or {corpus: {package, license}})."""
    split: str | None = None
    """Corpus split the calibration samples came from."""
    samples: Count | None = None
    """Number of calibration samples."""
    tokens: Count | None = None
    """Content tokens the statistics were measured on."""
    max_tokens_per_sample: Count | None = None
    """Truncation of each sample."""


class FeatureCalibration(_Open):
    """A feature's calibration: the strength unit and its measured activation statistics."""

    scale: Annotated[float, Field(strict=True, allow_inf_nan=False, gt=0)]
    """c: strength 1.0 means c activation units. Builders write the norm unit (DOSE_FRACTION ×
    median ‖h‖); ``steer pack calibrate`` replaces it with the dose of a measured effect."""
    method: Literal["norm", "effect", "trained"] | None = None
    """How ``scale`` was set: ``effect`` (a measured dose, see ``effect``), ``norm`` (the norm
    unit: no scorer, or no measurable effect) or ``trained`` (a trained feature as trained: the
    vector's own norm, or 1 for ``lowrank``). None: as built, the norm unit."""
    norm_scale: Annotated[float, Field(strict=True, allow_inf_nan=False, gt=0)] | None = None
    """The norm unit, kept when ``steer pack calibrate`` set ``scale``; doses are multiples of it."""
    effect: dict[str, Any] | None = None
    """The measured curve (dose → score, Δ, p, perplexity ratio, concept / fluency / harmonic
    mean) and the chosen point."""
    choice: dict[str, Any] | None = None
    """Why this feature's method was chosen (``steer pack choose``): the rule, the winning
    candidate's label and every candidate's strength-1 point."""
    p50: Number | None = None
    """Median act(h) over the calibration tokens (SAE latents: where active)."""
    p99: Number | None = None
    """99th percentile of act(h)."""
    max: Number | None = None
    """Largest act(h) seen."""
    min: Number | None = None
    """Smallest act(h) seen (directions)."""
    std: Number | None = None
    """Standard deviation of act(h) (directions)."""
    frequency: Number | None = None
    """Fraction of tokens where the latent fires (SAE latents)."""
    direction_norm: Number | None = None
    """‖d‖ of the stored direction (1 for SAE latents, which are unit-decoder normalized)."""
    resid_norm_p50: Number | None = None
    """Median residual norm at the layer; scale = DOSE_FRACTION × this."""
    tokens: Count | None = None
    """Tokens the statistics were measured on."""
    strength_range: list[Number] | None = None
    """[low, high] strengths that stayed coherent in the builder's checks."""
    unit: str | None = None
    """The unit in words when it is not the dose (e.g. imported control vectors)."""


class LatentSource(_Closed):
    """The SAE latent a named feature was taken from."""

    sae: str
    """Id of the SAE in this pack."""
    latent: Count
    """Latent index in that SAE."""


class FeatureEntry(_Open):
    """One named feature; its tensors in FEATURES_FILE are ``{name}.direction`` (the readout
    direction at ``layer``), ``{name}.encoder`` (``sae``), ``{name}.directions`` (a multi-layer
    ``direction`` feature) and ``{name}.R``, ``{name}.W``, ``{name}.b`` (``lowrank``). Extra keys
    are kept: builders may add their own records."""

    name: Annotated[str, _name("feature name")]
    """Local name, [A-Za-z0-9][A-Za-z0-9_.-]*; addressed as ``pack/name`` (or bare)."""
    description: str = ""
    """What the feature does, in words."""
    tags: list[str] = []
    """Catalog tags (``?tag=`` filter, search)."""
    layer: Count
    """Decoder layer whose output the feature reads (conditions, monitors, inspect) and, unless
    ``layers`` says more, writes."""
    layers: list[Count] | None = None
    """Layers the feature writes, sorted and unique, containing ``layer``; row i of its
    ``{name}.directions`` (``direction``) or of its R, W, b (``lowrank``) acts at ``layers[i]``.
    None = ``[layer]``. ``sae`` features write at ``layer`` only."""
    site: str | None = None
    """Hook site; must be ``blocks.{layer}.hook_resid_post`` when given."""
    kind: FeatureKind
    """``direction`` (act = h·d̂), ``sae`` (act = JumpReLU_θ(e·h + b)) or ``lowrank`` (a rank-r
    intervention h ← h + α·Rᵀ(W h + b − R h), read out as h·d̂)."""
    rank: Positive | None = None
    """r of a ``lowrank`` feature, 1..MAX_RANK (required for it, absent for other kinds); its
    R and W are [n, r, d], its b [n, r]."""
    default_mode: Mode = "add"
    """Mode when a request names only a strength (``add`` for ``lowrank`` features)."""
    bias: Number = 0.0
    """b of an ``sae`` feature (0 for directions)."""
    threshold: Number = 0.0
    """θ of an ``sae`` feature (0 = plain ReLU)."""
    calibration: FeatureCalibration
    """Strength unit and activation statistics."""
    evidence: dict[str, Any] | None = None
    """Why the feature means what it says (SAE-derived features: cosine, correlation, runners-up)."""
    source: LatentSource | None = None
    """The SAE latent it was taken from, if any."""
    contrastive: dict[str, Any] | None = None
    """Contrastive fit: method, pair count, held-out separation, per-layer scan (contrastive builds)."""
    trained: dict[str, Any] | None = None
    """Training record (``steer pack train``): method, layers, config, losses, held-out preference
    accuracy and the training data's provenance (file sha256, generator settings)."""


class SaeCalibration(_Open):
    """Calibration of an SAE's latents."""

    resid_norm_p50: Number | None = None
    """Median residual norm at the layer; latents get the dose unit DOSE_FRACTION × this."""
    scale: Number | None = None
    """The resulting dose unit (informational)."""


class SaeEntry(_Open):
    """One sparse autoencoder; weights in ``file``, latent labels in ``labels``. Extra keys are
    builder records (``concept_matches``, ``apply_b_dec_to_input``)."""

    id: Annotated[str, _name("SAE id")]
    """SAE id; latent i is addressed as ``pack/{id}:{i}``."""
    layer: Count
    """Decoder layer whose output the SAE encodes."""
    site: str | None = None
    """Hook site; must be ``blocks.{layer}.hook_resid_post`` when given."""
    d_in: Positive | None = None
    """Input width; must equal the model's hidden size."""
    d_sae: Positive | None = None
    """Number of latents."""
    activation: SaeActivation
    """``relu``, ``jumprelu`` (needs a threshold tensor) or ``topk`` (with ``k``)."""
    file: str
    """Safetensors file with W_enc, b_enc, W_dec, b_dec (threshold, latent_p50/p99/max/freq)."""
    k: Positive | None = None
    """Active latents per token of a ``topk`` SAE."""
    labels: str | None = None
    """JSON sidecar with per-latent labels, top tokens and examples."""
    metrics: dict[str, Any] | None = None
    """Reconstruction / downstream-loss metrics (fvu, l0, dead_frac, ce_increase, ...)."""
    calibration: SaeCalibration | None = None
    """Dose calibration of the latents; absent = strength in raw activation units."""
    training: dict[str, Any] | None = None
    """Training configuration and log tail (trained SAEs)."""
    source: dict[str, Any] | None = None
    """Where an imported SAE came from (format, release, hook)."""


class PackManifest(_Closed):
    """``pack.json``: identity, model, provenance, files and the features and SAEs of a pack."""

    schema_version: Int
    """Format version; this code reads SCHEMA_VERSION."""
    name: Annotated[str, _name("pack name", show=False)]
    """Pack name, [A-Za-z0-9][A-Za-z0-9_.-]*; the ``pack/`` of qualified feature names."""
    version: str
    """Pack version (free-form, e.g. semver)."""
    description: str = ""
    """What the pack contains."""
    license: str | None = None
    """License of the pack's contents."""
    model: ModelRef
    """The model it was built for."""
    provenance: Provenance = Provenance()
    """How it was made."""
    calibration: PackCalibration = PackCalibration()
    """Pack-wide calibration unit and corpus."""
    files: Annotated[dict[str, FileEntry], AfterValidator(_file_names)]
    """Every file of the pack (plain names) with its sha256."""
    features: list[FeatureEntry]
    """Named features."""
    saes: list[SaeEntry] = []
    """Sparse autoencoders."""

    @model_validator(mode="before")
    @classmethod
    def _schema_first(cls, data: Any) -> Any:
        # a manifest of another schema fails on its version, not on whatever else differs
        sv = data.get("schema_version") if isinstance(data, dict) else None
        if isinstance(sv, int) and not isinstance(sv, bool) and sv != SCHEMA_VERSION:
            raise ValueError(f"unsupported schema_version {sv} (this server reads {SCHEMA_VERSION})")
        return data

    @model_validator(mode="after")
    def _consistent(self) -> "PackManifest":
        fp = self.model.fingerprint
        seen: set[str] = set()
        for f in self.features:
            if f.name in seen:
                raise ValueError(f"duplicate feature name {f.name!r}")
            seen.add(f.name)
            _check_site(f"feature {f.name!r}", f.layer, f.site, fp.num_layers)
            check_feature_shape(f, fp.num_layers)
        if self.features and FEATURES_FILE not in self.files:
            raise ValueError(f"{FEATURES_FILE} holds the features' tensors but is not listed in files")
        ids: set[str] = set()
        for s in self.saes:
            if s.id in ids:
                raise ValueError(f"duplicate SAE id {s.id!r}")
            ids.add(s.id)
            _check_site(f"SAE {s.id!r}", s.layer, s.site, fp.num_layers)
            if s.d_in is not None and s.d_in != fp.hidden_size:
                raise ValueError(f"SAE {s.id!r}: d_in {s.d_in} is not the model's hidden size {fp.hidden_size}")
            if s.file not in self.files:
                raise ValueError(f"SAE {s.id!r} file {s.file} is not listed in files")
            if s.labels and s.labels not in self.files:
                raise ValueError(f"SAE {s.id!r} labels file {s.labels} is not listed in files")
        return self

    def feature(self, name: str) -> FeatureEntry:
        """The entry of feature ``name`` (KeyError if none)."""
        for f in self.features:
            if f.name == name:
                return f
        raise KeyError(name)

    def sae(self, sae_id: str) -> SaeEntry:
        """The entry of SAE ``sae_id`` (KeyError if none)."""
        for s in self.saes:
            if s.id == sae_id:
                return s
        raise KeyError(sae_id)


def _check_site(what: str, layer: int, where: str | None, num_layers: int) -> None:
    if not 0 <= layer < num_layers:
        raise ValueError(f"{what} layer {layer} outside [0, {num_layers})")
    if where is not None and where != site(layer):
        raise ValueError(f"{what}: site must be {site(layer)!r}")


def check_feature_shape(f: FeatureEntry, num_layers: int) -> None:
    """The fields a feature's kind needs: its ``layers`` (sorted, unique, in [0, num_layers),
    containing ``layer``; several only for ``direction`` and ``lowrank``) and a ``lowrank``
    feature's ``rank`` (1..MAX_RANK) and default mode (add). ValueError naming the feature."""
    what = f"feature {f.name!r}"
    if f.layers is not None:
        if f.layers != sorted(set(f.layers)):
            raise ValueError(f"{what}: layers {f.layers} must be sorted and unique")
        for layer in f.layers:
            if not 0 <= layer < num_layers:
                raise ValueError(f"{what}: layer {layer} of layers outside [0, {num_layers})")
        if f.layer not in f.layers:
            raise ValueError(f"{what}: layers {f.layers} must contain its readout layer {f.layer}")
        if len(f.layers) > 1 and f.kind == "sae":
            raise ValueError(f"{what}: an sae feature writes at its layer only (layers {f.layers})")
    if f.kind == "lowrank":
        if f.rank is None:
            raise ValueError(f"{what}: a lowrank feature needs its rank")
        if f.rank > MAX_RANK:
            raise ValueError(f"{what}: rank {f.rank} exceeds the maximum {MAX_RANK}")
        if f.default_mode != "add":
            raise ValueError(f"{what}: a lowrank feature's default_mode must be add, not "
                             f"{f.default_mode!r}")
    elif f.rank is not None:
        raise ValueError(f"{what}: rank is for lowrank features only (kind {f.kind!r})")


# ---------------------------------------------------------------------------------------------
# parsing and errors
# ---------------------------------------------------------------------------------------------
def parse_manifest(data: Any, label: str) -> PackManifest:
    """Validate a parsed ``pack.json`` object; PackError names the pack (``label`` when the
    manifest has no usable name) and the field."""
    if not isinstance(data, dict):
        raise PackError(label, f"{MANIFEST_FILE} must be a JSON object")
    pack = data["name"] if isinstance(data.get("name"), str) and _NAME_RE.match(data["name"]) else label
    try:
        return PackManifest.model_validate(data)
    except ValidationError as e:
        raise PackError(pack, describe_error(first_error(e), data)) from None


def read_manifest(path: str | Path) -> PackManifest:
    """The typed manifest of the pack folder ``path`` (or of the ``pack.json`` file ``path``)."""
    path = Path(path)
    mf = path / MANIFEST_FILE if path.is_dir() else path
    label = path.name
    if not mf.is_file():
        raise PackError(label, f"no {MANIFEST_FILE} in {path}")
    try:
        data = json.loads(mf.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise PackError(label, f"{MANIFEST_FILE} is not valid JSON: {e}") from None
    return parse_manifest(data, label)


def describe_error(err: Mapping[str, Any], data: Mapping[str, Any]) -> str:
    """One pydantic error as a sentence naming the field (``feature 'x': kind 'lora' ...``)."""
    if err["type"] == "value_error":  # our own validators: the message is the sentence
        return str(err["ctx"]["error"])
    loc = list(err["loc"])
    where = MANIFEST_FILE
    if len(loc) >= 2 and loc[0] in ("features", "saes") and isinstance(loc[1], int):
        item = (data.get(loc[0]) or [None] * (loc[1] + 1))[loc[1]]
        key, noun = ("name", "feature") if loc[0] == "features" else ("id", "SAE")
        label = item.get(key) if isinstance(item, dict) else None
        where = f"{noun} {label!r}" if isinstance(label, str) else param_path(loc[:2])
        loc = loc[2:]
    elif len(loc) >= 2 and loc[0] == "files":
        where, loc = f"files[{loc[1]!r}]", loc[2:]
    field = param_path(loc)
    if err["type"] == "missing":
        return f"{where} lacks the required field {field!r}"
    if err["type"] == "extra_forbidden":
        return f"{where} has an unknown field {field!r}"
    got = repr(err.get("input"))
    got = got if len(got) <= 60 else got[:57] + "..."
    msg = err["msg"][:1].lower() + err["msg"][1:]
    return f"{where}: {field} {got} is invalid ({msg})" if field else f"{where}: {msg}"
