"""Monitors through the API server, engine-free: a key's policy imposes its monitors, presets and
experiment variants carry theirs, the workers' report becomes ``steering.monitors`` and the
``content_filter`` finish, triggers are counted with bounded labels, bad monitors are 400s."""

from __future__ import annotations

import textwrap
from types import SimpleNamespace
from typing import Any

import pytest
from fakes import MODEL, FakeEngine, chat, load_parts, make_state
from fastapi.testclient import TestClient

from server.app import create_app
from server.auth import hash_key
from server.config import ServeConfig
from steering.wire import WireRecord

ADMIN_KEY, USER_KEY = "sk-steer-admin", "sk-steer-user"
ADMIN = {"authorization": f"Bearer {ADMIN_KEY}"}
USER = {"authorization": f"Bearer {USER_KEY}"}
WATCH = {"feature": "refusal", "above": 3.0, "action": "stop"}


class MonitoringEngine(FakeEngine):
    """FakeEngine whose workers report every monitor of a request as fired at token 2 (peak 5.0),
    and end its generation with EOS as a stop monitor makes them."""

    def __init__(self) -> None:
        super().__init__()
        self.rpcs: list[tuple[str, Any]] = []

    async def generate(self, prompt, params, request_id):
        self.params.append(params)
        wire = WireRecord.from_extra_args(params.extra_args)
        stops = wire is not None and wire.monitors is not None and any(wire.monitors["stop"])
        out = SimpleNamespace(index=0, text="Hello there", token_ids=[1, 2, 3, 0] if stops else [1, 2, 3, 4],
                              finish_reason="stop" if stops else "length", logprobs=None)
        yield SimpleNamespace(outputs=[out], finished=True, prompt_logprobs=None)

    async def collective_rpc(self, method, args=()):
        self.rpcs.append((method, args))
        assert method == "steering_monitor_events"
        keys, final = args
        wire = WireRecord.from_extra_args(self.params[-1].extra_args)
        n = wire.monitors["n"] if wire is not None and wire.monitors is not None else 0
        return [{k: [{"fired": True, "first_token": 2, "peak": 5.0}] * n for k in keys if n}]


@pytest.fixture(scope="module")
def parts() -> dict[str, Any]:
    return load_parts()


@pytest.fixture
def api(parts, tmp_path):
    path = tmp_path / "auth.yaml"
    path.write_text(textwrap.dedent(f"""\
        policies: {{watched: {{monitors: [{{feature: refusal, above: 3.0, action: flag}}]}}}}
        keys:
          - {{name: ops, role: admin, sha256: "{hash_key(ADMIN_KEY)}"}}
          - {{name: alice, role: user, policy: watched, sha256: "{hash_key(USER_KEY)}"}}
        """))
    state = make_state(parts, tmp_path, ServeConfig(auth=str(path)), engine=MonitoringEngine())
    client = TestClient(create_app(state))
    state.experiments.ready()
    yield client, state
    state.experiments.close()


def sent_monitors(state) -> dict[str, Any] | None:
    wire = WireRecord.from_extra_args(state.engine.params[-1].extra_args)
    return None if wire is None else wire.monitors


def test_a_policy_imposes_its_monitors_on_every_generation_of_the_key(api):
    client, state = api
    r = chat(client, USER)  # no steering of its own
    assert r.status_code == 200, r.text
    (m,) = r.json()["steering"]["monitors"]
    assert (m["feature"], m["above"], m["action"], m["fired"], m["first_token"], m["peak"]) == \
        ("smollm2-tone/refusal", 3.0, "flag", True, 2, 5.0)
    assert sent_monitors(state)["n"] == 1
    assert r.json()["choices"][0]["finish_reason"] == "length"  # a flag ends nothing
    # with the user's own steering and monitor, the key's monitor still rides along (last)
    r = chat(client, USER, steering={"features": {"formality": 0.5}, "monitors": [WATCH]})
    assert [x["action"] for x in r.json()["steering"]["monitors"]] == ["stop", "flag"]
    assert r.json()["choices"][0]["finish_reason"] == "content_filter"
    # the admin key has no policy: nothing imposed, nothing sent
    r = chat(client, ADMIN)
    assert r.status_code == 200 and "steering" not in r.json() and sent_monitors(state) is None
    metrics = client.get("/metrics", headers=ADMIN).text
    assert 'steer_monitor_triggers_total{action="flag",feature="smollm2-tone/refusal"} 2.0' in metrics
    assert 'steer_monitor_triggers_total{action="stop",feature="smollm2-tone/refusal"} 1.0' in metrics


def test_presets_and_variants_carry_monitors(api):
    client, state = api
    r = client.post("/v1/presets", headers=ADMIN, json={"name": "watched", "steering": {"monitors": [WATCH]}})
    assert r.status_code == 200, r.text
    r = chat(client, ADMIN, model=f"{MODEL}:watched")
    assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] == "content_filter"
    assert [m["action"] for m in r.json()["steering"]["monitors"]] == ["stop"]
    assert client.post("/v1/experiments", headers=ADMIN, json={
        "name": "guard", "variants": [{"name": "watch", "preset": "watched", "control": True}]}).status_code == 200
    r = chat(client, ADMIN, steering={"experiment": "guard"})
    assert r.status_code == 200 and r.json()["steering"]["monitors"][0]["feature"] == "smollm2-tone/refusal"


def test_streamed_monitors_announce_the_trigger_and_agree_with_the_body(api):
    client, _ = api
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4,
            "temperature": 0, "stream": True, "steering": {"monitors": [WATCH]}}
    with client.stream("POST", "/v1/chat/completions", json=body, headers=ADMIN) as r:
        lines = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    import json

    events = [json.loads(x) for x in lines[:-1]]
    assert lines[-1] == "[DONE]"
    fired = [e["steering"]["monitor_event"] for e in events if "monitor_event" in e.get("steering", {})]
    final = [e["steering"]["monitors"] for e in events if "monitors" in e.get("steering", {})]
    finish = [c["finish_reason"] for e in events for c in e["choices"] if c.get("finish_reason")]
    assert fired and fired[0]["first_token"] == 2 and finish == ["content_filter"]
    plain = chat(client, ADMIN, steering={"monitors": [WATCH]}).json()["steering"]["monitors"]
    assert final == [plain]


@pytest.mark.parametrize("extra,param", [
    ({"steering": {"monitors": [WATCH]}, "n": 2, "temperature": 1.0}, "steering.monitors"),
    ({"steering": {"monitors": [WATCH]}, "ignore_eos": True}, "ignore_eos"),
    ({"steering": {"monitors": [WATCH]}, "min_tokens": 2}, "min_tokens"),
    ({"steering": {"monitors": [WATCH]}, "response_format": {"type": "json_object"}}, "response_format"),
    ({"steering": {"monitors": [{**WATCH, "above": "high"}]}}, "steering.monitors[0].above"),
    ({"steering": {"monitors": [{**WATCH, "extra": 1}]}}, "steering.monitors[0].extra"),
    ({"steering": {"monitors": [WATCH] * 9}}, "steering.monitors"),
    ({"steering": {"features": {"formality": {"strength": 1, "when": {"feature": "code", "above": 1}}}}},
     "steering.features.formality.when.feature"),
])
def test_bad_monitors_and_conditions_are_400s_naming_the_field(api, extra, param):
    client, state = api
    before = len(state.engine.params)
    r = chat(client, ADMIN, **extra)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param, r.json()
    assert len(state.engine.params) == before


def test_trigger_labels_are_bounded():
    from server.metrics import Metrics

    m = Metrics()
    m.monitor_triggered("smollm2-sae-l12/L12:123", "flag")
    m.monitor_triggered("smollm2-sae-l12/L12:4000", "flag")
    m.monitor_triggered("smollm2-tone/code", "stop")
    text = m.exposition().decode()
    assert 'steer_monitor_triggers_total{action="flag",feature="other"} 2.0' in text
    assert 'steer_monitor_triggers_total{action="stop",feature="smollm2-tone/code"} 1.0' in text
