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
