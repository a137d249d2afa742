"""Multi-layer and lowrank features over HTTP (engine-free, issue #28): the catalog shows their
kind, layers and rank; a request compiles them into the record the engine receives and echoes
them; lowrank clamp is a 400 on ``.mode``; ``return_activations`` reads a lowrank feature at
its readout layer and skips its rows' entry values."""

from __future__ import annotations

import asyncio
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from fakes import AUTH, chat, load_parts, make_state
from fastapi.testclient import TestClient

from server import runner as gen
from server.app import create_app
from steering.packs import PackWriter, model_fingerprint
from steering.program import SteeringProgram
from steering.wire import WireRecord

D, RANK = 576, 2


@pytest.fixture(scope="module")
def parts(tmp_path_factory) -> dict[str, Any]:
    """The bundled parts plus a pack ``kinds`` for the bundled model: ``multi`` (direction,
    layers 4, 6, 8, readout 6) and ``lora`` (lowrank rank 2 at layers 6, 7, readout 6)."""
    from steering.model_store import resolve_model

    p = load_parts()
    rng = np.random.default_rng(0)
    w = PackWriter("kinds", "0.1.0", model_fingerprint(resolve_model(None)))
    dirs = rng.standard_normal((3, D))
    w.add_feature("multi", layer=6, kind="direction", direction=dirs[1], layers=[4, 6, 8],
                  directions=dirs, calibration={"scale": 4.0}, description="three layers")
    R = np.stack([np.linalg.qr(rng.standard_normal((D, RANK)))[0].T for _ in range(2)])
    w.add_feature("lora", layer=6, kind="lowrank", direction=R[0, 0], layers=[6, 7],
                  lowrank={"R": R, "W": rng.standard_normal((2, RANK, D)) * 0.01,
                           "b": rng.standard_normal((2, RANK))},
                  calibration={"scale": 1.0}, description="a rank-2 edit")
    p["packs"].load(w.write(tmp_path_factory.mktemp("packs") / "kinds"))
    return p


@pytest.fixture
def api(parts, tmp_path: Path):
    state = make_state(parts, tmp_path)
    client = TestClient(create_app(state))
    state.experiments.ready()
    yield client, state
    state.experiments.close()


def test_catalog_shows_kind_layers_and_rank(api):
    client, _ = api
    lora = client.get("/v1/features/kinds/lora", headers=AUTH).json()
    assert (lora["kind"], lora["layer"], lora["layers"], lora["rank"]) == ("lowrank", 6, [6, 7], RANK)
    multi = client.get("/v1/features/multi", headers=AUTH).json()
    assert (multi["id"], multi["kind"], multi["layers"]) == ("kinds/multi", "direction", [4, 6, 8])
    assert "rank" not in multi
    listed = client.get("/v1/features", params={"pack": "kinds"}, headers=AUTH).json()["data"]
    assert {f["name"]: f.get("rank") for f in listed} == {"multi": None, "lora": RANK}
    tone = client.get("/v1/features/smollm2-tone/formality", headers=AUTH).json()
    assert "layers" not in tone and "rank" not in tone


def test_request_compiles_both_kinds_into_the_engine_record(api):
    client, state = api
    r = chat(client, AUTH, steering={"features": {"kinds/lora": 1.5, "kinds/multi": 0.5}})
    assert r.status_code == 200, r.text
    assert r.json()["steering"]["applied"] == [
        {"feature": "kinds/lora", "layer": 6, "layers": [6, 7], "mode": "add", "strength": 1.5},
        {"feature": "kinds/multi", "layer": 6, "layers": [4, 6, 8], "mode": "add", "strength": 0.5}]
    record = WireRecord.from_extra_args(state.engine.seen[-1])
    prog = SteeringProgram.from_wire(record.program)
    assert sorted(prog.layers) == [4, 6, 7, 8]
    assert [prog.layers[x].num_entries for x in (4, 6, 7, 8)] == [0, RANK, RANK, 0]
    assert prog.layers[7].alpha == [1.5] * RANK and prog.layers[6].add is not None


def test_lowrank_clamp_is_a_400_on_mode(api):
    client, state = api
    r = chat(client, AUTH, steering={"features": {"kinds/lora": {"mode": "clamp", "strength": 1}}})
    assert r.status_code == 400
    assert r.json()["error"]["param"] == "steering.features.kinds/lora.mode"
    assert state.engine.seen == []  # nothing reached the engine


def test_readout_skips_lowrank_rows_and_reads_the_feature_at_its_readout_layer(parts):
    compiled = parts["compiler"].compile({
        "features": {"smollm2-tone/hedging": {"mode": "clamp", "strength": 1.0}, "kinds/lora": 1.0},
        "return_activations": True})
    assert compiled.entry_labels[6] == ["smollm2-tone/hedging", None, None]
    assert compiled.capture == (6,)
    stream = np.random.default_rng(1).standard_normal(D).astype(np.float32)
    records = [("act", 6, 0, np.array([0.25, 7.0, 8.0], np.float32)),  # hedging, lora rows 0 and 1
               ("act", 7, 0, np.array([9.0, 9.5], np.float32)),  # lora rows at layer 7 only
               ("resid", 6, 0, stream)]

    async def collective_rpc(name, args):
        assert name == "steering_readout"
        return [records]

    state = SimpleNamespace(require_engine=lambda: SimpleNamespace(collective_rpc=collective_rpc))
    job = SimpleNamespace(compiled=compiled, request_id="r", held=None, captured=[])
    rows = asyncio.run(gen.steering_activations(state, job))
    lora = parts["packs"].resolve("kinds/lora")
    assert rows == [{"position": 0, "layer": 6, "features": {
        "smollm2-tone/hedging": pytest.approx(0.25),
        "kinds/lora": pytest.approx(float(stream @ lora.unit_direction()), rel=1e-6)}}]
