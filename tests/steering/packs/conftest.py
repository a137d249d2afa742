"""Fixtures for the feature-pack tests: a tiny fake model folder and a pack factory.

Seeding comes from the autouse fixture in tests/steering/conftest.py (random, numpy, torch)."""

from __future__ import annotations

from pathlib import Path

import pytest

from packtools import make_fake_model, write_pack


@pytest.fixture
def fake_model(tmp_path) -> Path:
    return make_fake_model(tmp_path / "model")


@pytest.fixture
def pack_factory(tmp_path, fake_model):
    def make(name="tone", **kw):
        return write_pack(tmp_path / "packs", fake_model, name=name, **kw)
    return make
