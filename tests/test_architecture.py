"""The package layers: clients → server → steering, and no import circles (import-linter).

The contracts live in pyproject.toml (``[tool.importlinter]``). The first test checks the real
tree; the others copy the three packages, plant one bad import each, and check that the same
contracts catch it — so the contracts themselves are known to bite."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("clients", "server", "steering")

_LINT = """
import sys
from importlinter.cli import lint_imports
sys.exit(lint_imports(config_filename="pyproject.toml", no_cache=True, no_logo=True))
"""


def lint(root: Path) -> subprocess.CompletedProcess[str]:
    """Run the contracts over the packages under ``root`` (a fresh interpreter whose first
    import path is ``root``, so a copy shadows the installed packages)."""
    return subprocess.run([sys.executable, "-c", _LINT], cwd=root, capture_output=True, text=True,
                          env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"}, timeout=300)


def test_the_tree_keeps_its_layers_and_has_no_circles() -> None:
    out = lint(REPO)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "0 broken" in out.stdout


WORKER_BUILDERS = "steering worker and builders are independent"
CORE = "steering core imports neither worker nor builders"


def test_the_core_contract_names_every_core_module() -> None:
    """Every module of steering/ is the worker side, a builder, the public shim alias, or listed
    as the core in the forbidden contract (a new core module cannot slip past it)."""
    import tomllib

    contracts = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]
    core = next(c for c in contracts if c["name"] == CORE)
    listed = set(core["source_modules"])
    top = {f"steering.{p.stem}" if p.is_file() else f"steering.{p.name}"
           for p in (REPO / "steering").iterdir()
           if (p.suffix == ".py" and p.stem != "__init__") or (p / "__init__.py").exists()}
    assert top - {"steering.worker", "steering.builders", "steering.vllm_shim"} == listed
    assert {c["name"] for c in contracts} >= {WORKER_BUILDERS, CORE}


@pytest.fixture(scope="module")
def copy(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("layers")
    for pkg in PACKAGES:
        shutil.copytree(REPO / pkg, root / pkg, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    shutil.copy(REPO / "pyproject.toml", root / "pyproject.toml")
    out = lint(root)
    assert out.returncode == 0, out.stdout + out.stderr  # the copy is the tree
    return root


@pytest.mark.parametrize("module,line,broken", [
    # the engine core reaching up into the server
    ("steering/config.py", "import server.errors", "clients -> server -> steering"),
    # the server reaching up into a client tool
    ("server/metrics.py", "from clients import launch", "clients -> server -> steering"),
    # a circle inside the server (under TYPE_CHECKING too: it still couples the modules)
    ("server/metrics.py", "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import server.app",
     "no import circles"),
    # a circle inside the engine core
    ("steering/program.py", "import steering.request", "no import circles"),
    # the worker side reaching into the pack builders, and back
    ("steering/worker/runtime.py", "import steering.builders.collect", WORKER_BUILDERS),
    ("steering/builders/train.py", "from steering.worker import sites", WORKER_BUILDERS),
    # the request-side core reaching into the worker side or the builders
    ("steering/request.py", "import steering.worker.slots", CORE),
    ("steering/packs/registry.py", "from steering.builders import corpora", CORE),
])
def test_a_planted_bad_import_breaks_a_contract(copy: Path, module: str, line: str, broken: str) -> None:
    path = copy / module
    original = path.read_text()
    try:
        path.write_text(original + "\n" + line + "\n")
        out = lint(copy)
    finally:
        path.write_text(original)
    assert out.returncode == 1, out.stdout + out.stderr
    assert f"{broken} BROKEN" in out.stdout, out.stdout


# -- the reference: docs/architecture.md names every module; long modules say why --------------
def _modules() -> list[Path]:
    return sorted(p for pkg in PACKAGES for p in (REPO / pkg).rglob("*.py")
                  if p.name != "__init__.py" and "__pycache__" not in p.parts)


def test_the_architecture_doc_names_every_module() -> None:
    """Each module under clients/, server/ and steering/ appears in docs/architecture.md by its
    path (``server/pipeline.py``), so the map cannot silently drift from the tree."""
    doc = (REPO / "docs" / "architecture.md").read_text()
    missing = [str(p.relative_to(REPO)) for p in _modules() if str(p.relative_to(REPO)) not in doc]
    assert not missing, f"docs/architecture.md does not mention: {missing}"


MAX_LINES = 400


def test_a_module_over_400_lines_says_why_at_its_top() -> None:
    """A module longer than 400 lines carries, in its docstring, a sentence starting
    "Over 400 lines" that says why it is one module."""
    import ast

    unexplained = []
    for p in _modules():
        text = p.read_text()
        if text.count("\n") <= MAX_LINES:
            continue
        doc = ast.get_docstring(ast.parse(text)) or ""
        if "Over 400 lines" not in doc:
            unexplained.append(f"{p.relative_to(REPO)} ({text.count(chr(10))} lines)")
    assert not unexplained, f"long modules without a reason at their top: {unexplained}"
