"""A wheel that works anywhere: the project built as a wheel and installed (not editable) into a
fresh virtual environment serves the bundled packs and presets from an unrelated directory.

The fresh venv reuses this venv's third-party packages (vLLM, torch, ...) through a ``.pth``
file holding a plain path: such a line only extends ``sys.path``, so the ``.pth`` files of this
venv — among them the editable install of steer-server, which maps ``steering``/``server``/
``clients`` to the checkout — are not run there. ``steering``, ``server``, ``clients`` and
``feature_packs`` must therefore come from the wheel, which the test checks before it starts the
installed ``steer serve``. The build runs on a copy of the tree in ``tmp_path``, so no
``build/`` or ``*.egg-info`` is left in the checkout.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import time
import zipfile
from pathlib import Path

import httpx
import yaml

from clients.launch import local_server
from steering.packs import MANIFEST_FILE, bundled_packs_dir, discover_packs
from tests.conftest import API_KEY, DEFAULT_SERVER_ARGS

REPO = Path(__file__).resolve().parents[2]
MODEL = "SmolLM2-135M-Instruct"
PACKAGES = ("steering", "server", "clients", "feature_packs")
# Not part of a build: this venv, git, build outputs and local data (see .gitignore).
SKIP_TOP = {".venv", ".git", "build", "dist", "models", "data", ".cache", ".pytest_cache"}
SKIP_ANY = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info", "*.gguf")
# Eager: the quickest engine start; the rest as the suite's servers.
SERVER_ARGS = (*DEFAULT_SERVER_ARGS, "--enforce-eager")
STARTUP_TIMEOUT_S = 600


def _run(cmd: list[str], **kw) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, **kw)
    assert proc.returncode == 0, f"{cmd} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


def _copy_tree(dst: Path) -> Path:
    dst.mkdir()
    for entry in REPO.iterdir():
        if entry.name in SKIP_TOP or entry.name.endswith(".egg-info"):
            continue
        if entry.is_dir():
            shutil.copytree(entry, dst / entry.name, ignore=SKIP_ANY)
        else:
            shutil.copy2(entry, dst / entry.name)
    return dst


def _data_files(root: Path) -> dict[str, bytes]:
    """Relative path → bytes of every file under ``root`` (bytecode caches aside)."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and "__pycache__" not in p.parts}


def _clean_env(venv: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env["VIRTUAL_ENV"] = str(venv)
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    return env


def test_installed_wheel_serves_the_bundled_packs(tmp_path: Path) -> None:
    t0 = time.monotonic()
    # 1. Build the wheel from a copy of the tree (no network, no build isolation).
    src = _copy_tree(tmp_path / "src")
    dist = tmp_path / "dist"
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
          "-q", "-w", str(dist), str(src)])
    (wheel,) = dist.glob("steer_server-*.whl")
    source_data = _data_files(bundled_packs_dir())
    assert "presets.yaml" in source_data and "__init__.py" in source_data
    assert any(name.startswith("recipes/") for name in source_data)
    # Every file of the package folders ships (templates, prompts, packs, ...), not only the code.
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
    in_tree = {f"{pkg}/{rel}" for pkg in PACKAGES for rel in _data_files(src / pkg)}
    missing = sorted(in_tree - names)
    assert not missing, f"not in the wheel (add them to [tool.setuptools.package-data]): {missing}"

    print(f"wheel built in {time.monotonic() - t0:.0f} s: {wheel.name}, {wheel.stat().st_size} bytes")

    # 2. A fresh venv with the wheel installed, then this venv's site-packages as a plain path.
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)])
    py = venv / "bin" / "python"
    _run([sys.executable, "-m", "pip", "--python", str(py), "install", "--no-deps", "--no-index",
          "-q", str(wheel)])
    site = Path(_run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).strip())
    ours = dict.fromkeys(sysconfig.get_paths()[k] for k in ("purelib", "platlib"))
    (site / "_steer_test_reuse_deps.pth").write_text("".join(f"{p}\n" for p in ours))

    # 3. From an unrelated directory, the packages (and the data) are the wheel's.
    work = tmp_path / "elsewhere"
    work.mkdir()
    env = _clean_env(venv)
    probe = ("import json, steering, server, clients, feature_packs, vllm; "
             "from steering.packs import bundled_packs_dir; "
             "print(json.dumps({m.__name__: m.__file__ for m in (steering, server, clients, feature_packs, vllm)}"
             " | {'data': str(bundled_packs_dir())}))")
    where = json.loads(_run([str(py), "-c", probe], cwd=work, env=env))
    for pkg in PACKAGES:
        assert Path(where[pkg]).resolve().is_relative_to(site.resolve()), (pkg, where[pkg])
    assert Path(where["data"]).resolve() == (site / "feature_packs").resolve()
    assert not Path(where["vllm"]).resolve().is_relative_to(venv.resolve())  # reused, not installed
    installed_data = _data_files(site / "feature_packs")
    assert installed_data == source_data

    # The catalog must list exactly what the installed pack manifests define.
    shipped = {p.name: json.loads((p / MANIFEST_FILE).read_text()) for p in discover_packs([site / "feature_packs"])}
    assert set(shipped) == {"smollm2-tone", "smollm2-sae-l12", "qwen2.5-0.5b-tone"}
    packs = {name: m for name, m in shipped.items() if m["model"]["id"] == "HuggingFaceTB/SmolLM2-135M-Instruct"}
    assert set(packs) == {"smollm2-tone", "smollm2-sae-l12"}  # the packs of the model it serves
    want_features = {f"{name}/{f['name']}" for name, m in packs.items() for f in m["features"]}
    want_presets = set(yaml.safe_load((site / "feature_packs" / "presets.yaml").read_text())["presets"])

    # 4. The installed `steer serve`, run from there.
    print(f"installed and checked at {time.monotonic() - t0:.0f} s")
    with local_server(SERVER_ARGS, api_key=API_KEY, timeout=STARTUP_TIMEOUT_S,
                      command=[str(venv / "bin" / "steer"), "serve"], cwd=work, env=env) as srv:
        print(f"healthy at {time.monotonic() - t0:.0f} s")
        with httpx.Client(base_url=srv.url, headers=srv.headers, timeout=300) as http:
            r = http.get("/v1/packs")
            assert r.status_code == 200, r.text
            assert {p["name"] for p in r.json()["data"]} == set(packs)

            r = http.get("/v1/features", params={"limit": 500})
            assert r.status_code == 200, r.text
            body = r.json()
            assert body["total"] == len(want_features) and not body["has_more"], body
            assert {f["id"] for f in body["data"]} == want_features

            r = http.get("/v1/presets")
            assert r.status_code == 200, r.text
            assert want_presets <= {p["name"] for p in r.json()["data"]}

            r = http.post("/v1/chat/completions", json={
                "model": MODEL, "max_tokens": 8, "temperature": 0.0,
                "messages": [{"role": "user", "content": "Tell me about your weekend."}],
                "steering": {"features": {"formality": 1.0}}})
            assert r.status_code == 200, r.text
            steering = r.json()["steering"]
            assert [a["feature"] for a in steering["applied"]] == ["smollm2-tone/formality"], steering
            assert r.headers["x-steering-hash"] == steering["hash"]

            r = http.post("/v1/chat/completions", json={
                "model": f"{MODEL}:pirate", "max_tokens": 4, "temperature": 0.0,
                "messages": [{"role": "user", "content": "Hi!"}]})
            assert r.status_code == 200, r.text
            assert [a["feature"] for a in r.json()["steering"]["applied"]] == ["smollm2-tone/pirate"]
