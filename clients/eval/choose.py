"""``steer pack choose OUT --candidate LABEL=PACK …``: each feature's method, chosen by what a user gets.

Semantics: the candidates are packs of the same concepts for the same model built by different
methods (``mean_diff=feature_packs/smollm2-tone``, ``vector=…``, ``lowrank=…``), each calibrated by
``steer pack calibrate`` on the calibration prompts, so each feature's strength 1 is its own
method's largest fluent dose and its curve carries, per dose, the AxBench-style concept share,
fluency share and their harmonic mean (:func:`clients.eval.prompting.tradeoff`). For every feature
name the winner is the candidate whose harmonic mean **at its chosen dose** (strength 1) is
highest, where a later candidate must beat the best earlier one by more than ``min_gain``
(``MIN_GAIN`` = 0.05: on 24 calibration prompts one prompt moves concept by 0.04, so smaller gaps
are noise and the incumbent, listed first, stays). A candidate whose
calibration did not record the harmonic mean (calibrated before it existed, or no scorer) does not
compete; a feature no candidate measured is taken from the first candidate that has it.

The output pack holds each winner's manifest entry and tensors unchanged (so its curve, chosen
dose, training or contrastive record come with it) plus ``calibration.choice``: the rule, the
winning label and every candidate's point (dose, status, concept, fluency, harmonic, Δ, p,
perplexity ratio). Candidates must share the model fingerprint; SAE-derived features (which need
their SAE) cannot be merged. Nothing is measured here: the choice uses the calibration prompts'
curves only, never the held-out ones.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from steering.packs.format import load_pack
from steering.packs.manifest import FEATURES_FILE, MANIFEST_FILE, PackError
from steering.packs.tensors import load_tensors
from steering.packs.writer import PackWriter

MIN_GAIN = 0.05
"""How much higher a later candidate's harmonic mean must be to replace an earlier one."""
RULE = ("the highest harmonic mean of concept share and fluency share at strength 1 on the "
        "calibration prompts (steer pack calibrate's curve); a later candidate must beat the "
        "earlier ones by more than min_gain")
POINT_KEYS = ("dose", "status", "concept", "fluency", "harmonic", "diff", "p", "ppl_ratio")


def point(entry: dict[str, Any]) -> dict[str, Any] | None:
    """A calibrated feature's strength-1 point (``POINT_KEYS``) and, for the record, the dose of
    its curve with the highest harmonic mean (``best_dose``, ``best_harmonic``: what a rule that
    set strength 1 by the harmonic mean would pick); None when its calibration has no harmonic mean
    to compare."""
    effect = (entry.get("calibration") or {}).get("effect") or {}
    chosen = effect.get("chosen") or {}
    if chosen.get("harmonic") is None:
        return None
    rows = [r for r in effect.get("curve") or [] if r.get("harmonic") is not None]
    best = max(rows, key=lambda r: r["harmonic"], default=chosen)
    return {**{k: chosen.get(k) for k in POINT_KEYS}, "best_dose": best.get("dose"),
            "best_harmonic": best["harmonic"]}


def built_by(entry: dict[str, Any]) -> str:
    """How a feature was made, from its own records (``trained.method``, ``contrastive.method``)."""
    for record in ("trained", "contrastive"):
        if isinstance(entry.get(record), dict) and entry[record].get("method"):
            return str(entry[record]["method"])
    return str(entry.get("kind", "?"))


def choose(candidates: list[tuple[str, Path]], name: str | None = None, version: str | None = None,
           description: str | None = None, note: str | None = None,
           min_gain: float = MIN_GAIN) -> tuple[PackWriter, dict[str, dict[str, Any]]]:
    """The merged pack (not yet written) and, per feature, its choice record. The pack keeps the
    first candidate's provenance, with ``method`` "chosen per feature", ``choice`` (the rule and
    each candidate's files) and ``note`` when given."""
    if not candidates:
        raise PackError("choose", "give at least one --candidate LABEL=PACK")
    labels = [label for label, _ in candidates]
    if len(set(labels)) != len(labels):
        raise PackError("choose", f"candidate labels must differ: {', '.join(labels)}")
    loaded = []
    for label, path in candidates:
        pack = load_pack(path)  # verifies every file's sha256 and the tensors' shapes
        m = pack.manifest.model_dump(exclude_unset=True)
        tensors = load_tensors(path / FEATURES_FILE) if FEATURES_FILE in m["files"] else {}
        loaded.append((label, m, tensors))
    first = loaded[0][1]
    for label, m, _ in loaded[1:]:
        if m["model"]["fingerprint"] != first["model"]["fingerprint"]:
            raise PackError(m["name"], f"candidate {label!r} was built for another model than "
                                       f"{labels[0]!r} ({first['name']})")
    order: list[str] = []
    for _, m, _ in loaded:
        order += [f["name"] for f in m["features"] if f["name"] not in order]
    writer = PackWriter(
        name or first["name"], version or first["version"], first["model"]["fingerprint"],
        first["model"].get("id", ""), description or first.get("description", ""), first.get("license", "Apache-2.0"),
        provenance={**{k: v for k, v in first.get("provenance", {}).items() if k != "date"},
                    "method": "chosen per feature", **({"note": note} if note else {}),
                    "choice": {"builder": "steer pack choose", "rule": RULE, "min_gain": min_gain,
                               "candidates": {label: {"pack": m["name"], "version": m["version"],
                                                      "files": {f: v["sha256"] for f, v in m["files"].items()}}
                                              for label, m, _ in loaded}}},
        calibration=first.get("calibration") or {})
    choices: dict[str, dict[str, Any]] = {}
    for fname in order:
        have = [(label, next(f for f in m["features"] if f["name"] == fname), t)
                for label, m, t in loaded if any(f["name"] == fname for f in m["features"])]
        points = {label: point(entry) for label, entry, _ in have}
        measured = [(label, p["harmonic"]) for label, p in points.items() if p is not None]
        winner = measured[0][0] if measured else have[0][0]
        best = measured[0][1] if measured else None
        for label, h in measured[1:]:
            if h > best + min_gain:
                winner, best = label, h
        label, entry, tensors = next(h for h in have if h[0] == winner)
        if entry.get("source") is not None:
            raise PackError(writer.name, f"feature {fname!r} of {label!r} reads an SAE latent; "
                                         "serve the SAE's pack beside this one instead")
        record = {"method": winner, "built_by": built_by(entry),
                  "rule": RULE if measured else "not measured by any candidate: kept from the first that has it",
                  "candidates": {lab: {"built_by": built_by(e), **(points[lab] or {"harmonic": None})}
                                 for lab, e, _ in have}}
        if measured:
            record["min_gain"] = min_gain
        entry = {**entry, "calibration": {**entry["calibration"], "choice": record}}
        prefix = f"{fname}."
        writer.add_entry(entry, {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})
        choices[fname] = record
    return writer, choices


def table(choices: dict[str, dict[str, Any]]) -> str:
    """One line per feature: each candidate's harmonic mean (dose, perplexity ratio) and the winner."""
    labels = list(dict.fromkeys(lab for c in choices.values() for lab in c["candidates"]))
    lines = [f"{'feature':<16} " + " ".join(f"{lab:>22}" for lab in labels) + "  chosen"]
    for fname, c in choices.items():
        cells = []
        for lab in labels:
            p = c["candidates"].get(lab)
            if p is None or p.get("harmonic") is None:
                cells.append(f"{'-':>22}")
            else:
                ppl = p.get("ppl_ratio")
                cells.append(f"{p['harmonic']:.2f} @{p['dose']:g} ({'-' if ppl is None else f'{ppl:.2f}'}×)".rjust(22))
        lines.append(f"{fname:<16} " + " ".join(cells) + f"  {c['method']}")
    return "\n".join(lines)


def _candidate(text: str) -> tuple[str, Path]:
    label, sep, path = text.partition("=")
    if not sep or not label.strip() or not path.strip():
        raise argparse.ArgumentTypeError(f"expected LABEL=PACK_FOLDER, got {text!r}")
    return label.strip(), Path(path.strip())


def add_choose_parser(pack_sub: argparse._SubParsersAction) -> None:
    s = pack_sub.add_parser("choose", help="merge calibrated candidate packs, each feature by its best method",
                            description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    s.add_argument("out", help="folder for the merged pack (not one of the candidates)")
    s.add_argument("--candidate", action="append", type=_candidate, required=True, metavar="LABEL=PACK",
                   help="a calibrated pack folder and the method's label; repeat; the incumbent first")
    s.add_argument("--name", default=None, help="pack name (default: the first candidate's)")
    s.add_argument("--version", default=None, help="pack version (default: the first candidate's)")
    s.add_argument("--description", default=None)
    s.add_argument("--note", default=None, help="a line for the pack's provenance (what this build changed)")
    s.add_argument("--min-gain", type=float, default=MIN_GAIN,
                   help=f"how much higher a later candidate's harmonic mean must be (default: {MIN_GAIN:g})")
    s.set_defaults(func=choose_cmd)


def choose_cmd(args: argparse.Namespace) -> int:
    out = Path(args.out).resolve()
    if any(path.resolve() == out for _, path in args.candidate):
        print("steer pack choose: error: the output folder is one of the candidates", file=sys.stderr)
        return 1
    try:
        writer, choices = choose(args.candidate, args.name, args.version, args.description, args.note,
                                 args.min_gain)
        writer.write(out)
    except (PackError, OSError) as exc:
        print(f"steer pack choose: error: {exc}", file=sys.stderr)
        return 1
    print(table(choices))
    print(f"wrote {out / MANIFEST_FILE}", file=sys.stderr)
    return 0
