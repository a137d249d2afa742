"""Per-key steering policies over HTTP (engine-free) and as a function: each rule is a 403 naming
the field with nothing sent to the engine; presets and experiment variants (made by admins) are
exempt while ``protect`` still holds on the request's own steering; ``max_slots`` is a 429."""

from __future__ import annotations

import asyncio
import threading
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fakes import FakeEngine, MODEL, chat, load_parts, make_state
from fastapi.testclient import TestClient

from server.app import create_app
from server.auth import hash_key
from server.config import ServeConfig
from server.policy import Policy, PolicyViolation, check, matches
from steering.spec import SteeringSpec

ADMIN_KEY, USER_KEY = "sk-steer-admin", "sk-steer-user"
ADMIN = {"authorization": f"Bearer {ADMIN_KEY}"}
USER = {"authorization": f"Bearer {USER_KEY}"}

PUBLIC = """{
  max_strength: 1.0, raw_vectors: false, return_activations: false,
  features: {deny: [pirate, code]}, protect: {refusal: {min: 0.0}}}"""


@pytest.fixture(scope="module")
def parts() -> dict[str, Any]:
    return load_parts()


def serve(parts: dict[str, Any], tmp_path: Path, policy: str, engine: Any = None,
          ) -> tuple[TestClient, Any]:
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "auth.yaml"
    path.write_text(textwrap.dedent(f"""\
        policies: {{public: {policy}}}
        keys:
          - {{name: ops, role: admin, sha256: "{hash_key(ADMIN_KEY)}"}}
          - {{name: alice, role: user, policy: public, sha256: "{hash_key(USER_KEY)}"}}
        """))
    state = make_state(parts, tmp_path, ServeConfig(auth=str(path)), engine=engine)
    client = TestClient(create_app(state))
    state.experiments.ready()
    return client, state


@pytest.fixture
def api(parts, tmp_path) -> Iterator[tuple[TestClient, Any]]:
    client, state = serve(parts, tmp_path, PUBLIC)
    yield client, state
    state.experiments.close()


def applied(r: Any) -> dict[str, Any]:
    """feature → strength, or its mode when not ``add``."""
    return {a["feature"]: a["strength"] if a["mode"] == "add" else a["mode"]
            for a in r.json()["steering"]["applied"]}


VECTOR = {"layer": 12, "values": [0.01] * 576}
DENIED = [  # (own steering, param, reason)
    ({"features": {"pirate": 1.0}}, "steering.features.pirate", "feature"),
    ({"features": {"smollm2-tone/code": 0.5}}, "steering.features.smollm2-tone/code", "feature"),
    ({"features": {"formality": 1.5}}, "steering.features.formality", "strength"),
    ({"features": {"formality": {"strength": -1.2}}}, "steering.features.formality.strength", "strength"),
    ({"vectors": [VECTOR]}, "steering.vectors[0]", "raw_vectors"),
    ({"features": {"formality": 0.5}, "return_activations": True}, "steering.return_activations",
     "return_activations"),
    ({"features": {"refusal": {"mode": "ablate"}}}, "steering.features.refusal.mode", "protected"),
    ({"features": {"refusal": {"strength": 0.5, "mode": "clamp"}}}, "steering.features.refusal.mode",
     "protected"),
    ({"features": {"refusal": -0.5}}, "steering.features.refusal", "protected"),
    ({"features": {"smollm2-tone/refusal": {"strength": -0.1}}},
     "steering.features.smollm2-tone/refusal.strength", "protected"),
]


def test_each_rule_is_a_403_naming_the_field_and_nothing_runs(api):
    client, state = api
    for steering, param, _ in DENIED:
        r = chat(client, USER, steering=steering)
        assert r.status_code == 403, (steering, r.text)
        err = r.json()["error"]
        assert (err["param"], err["code"], err["type"]) == (param, "permission_denied", "permission_error")
    assert state.engine.params == []  # no request reached the engine
    m = client.get("/metrics").text
    for reason in ("feature", "strength", "protected"):
        n = sum(1 for _, _, why in DENIED if why == reason)
        assert f'steer_policy_denials_total{{reason="{reason}"}} {float(n)}' in m
    assert 'steer_policy_denials_total{reason="raw_vectors"} 1.0' in m


def test_what_the_policy_allows_runs(api):
    client, state = api
    for steering in ({"features": {"formality": 1.0}}, {"features": {"refusal": 0.8}},
                     {"features": {"refusal": {"strength": 0.0, "mode": "add"}}}):
        r = chat(client, USER, steering=steering)
        assert r.status_code == 200, (steering, r.text)
    assert len(state.engine.params) == 3


def test_admin_key_without_policy_is_not_limited(api):
    client, _ = api
    for steering, _, _ in DENIED:
        r = chat(client, ADMIN, steering={k: v for k, v in steering.items() if k != "return_activations"})
        assert r.status_code == 200, (steering, r.text)


def test_presets_and_variants_are_vetted_protect_still_holds(api):
    """The README's rule: the admin's preset or variant runs as made; the user's own layer is
    checked in full, and ``protect`` on the user's own entries even on top of a preset."""
    client, state = api
    # A policy that denies pirate still lets the user call the admin's pirate preset.
    r = chat(client, USER, model=f"{MODEL}:pirate")
    assert r.status_code == 200 and applied(r) == {"smollm2-tone/pirate": 1.5}
    r = chat(client, USER, model=f"{MODEL}:pirate", steering={"features": {"pirate": 0.5}})
    assert (r.status_code, r.json()["error"]["param"]) == (403, "steering.features.pirate")
    # An admin's preset that ablates refusal is vetted: the user may call it.
    assert client.post("/v1/presets", headers=ADMIN, json={
        "name": "unrefused", "steering": {"features": {"refusal": {"mode": "ablate"}}}}).status_code == 200
    r = chat(client, USER, model=f"{MODEL}:unrefused")
    assert r.status_code == 200 and applied(r) == {"smollm2-tone/refusal": "ablate"}
    # ...but the user cannot push refusal down on top of a preset, nor ablate it themselves.
    r = chat(client, USER, model=f"{MODEL}:formal", steering={"features": {"refusal": -1.0}})
    assert (r.status_code, r.json()["error"]["param"]) == (403, "steering.features.refusal")
    r = chat(client, USER, steering={"features": {"refusal": {"mode": "ablate"}}})
    assert (r.status_code, r.json()["error"]["param"]) == (403, "steering.features.refusal.mode")
    # Variants are vetted the same way.
    assert client.post("/v1/experiments", headers=ADMIN, json={
        "name": "tone", "variants": [{"name": "pirate", "preset": "pirate", "control": True}]}).status_code == 200
    r = chat(client, USER, steering={"experiment": "tone"})
    assert r.status_code == 200 and applied(r) == {"smollm2-tone/pirate": 1.5}
    # Inside an experiment a user key may add no steering at all (the variant is measured).
    r = chat(client, USER, steering={"experiment": "tone", "features": {"formality": 0.2}})
    assert (r.status_code, r.json()["error"]["code"]) == (403, "permission_denied")
    assert len(state.engine.params) == 3


def test_allow_list_and_pack_patterns(parts, tmp_path):
    client, state = serve(parts, tmp_path, "{features: {allow: [formality, smollm2-tone/humor]}}")
    assert chat(client, USER, steering={"features": {"smollm2-tone/formality": 0.5}}).status_code == 200
    assert chat(client, USER, steering={"features": {"humor": 0.5}}).status_code == 200
    r = chat(client, USER, steering={"features": {"positivity": 0.5}})
    assert (r.status_code, r.json()["error"]["param"]) == (403, "steering.features.positivity")
    r = chat(client, USER, steering={"features": {"no_such_feature": 0.5}})
    assert r.status_code == 400  # unknown names are the compiler's 400, as without a policy
    state.experiments.close()
    assert matches("smollm2-sae-l12/*", "smollm2-sae-l12/L12:123")
    assert not matches("smollm2-sae-l12/*", "smollm2-tone/pirate")
    assert matches("pirate", "any-pack/pirate") and not matches("pirate", "p/pirate_latent")


def test_max_vector_norm_bounds_own_vectors_not_presets(parts, tmp_path):
    client, state = serve(parts, tmp_path, "{max_vector_norm: 0.01}")
    compiler = state.compiler
    saved = compiler.layer_norms
    compiler.layer_norms = {12: 100.0}  # as if measured at start: ‖h‖ ≈ 100 at layer 12
    try:
        big = {"layer": 12, "values": [0.1] * 576}  # ‖v‖ = 2.4 > 0.01 × 100, fine for the server
        r = chat(client, USER, steering={"vectors": [{"layer": 12, "values": [0.001] * 576}, big]})
        assert (r.status_code, r.json()["error"]["param"]) == (403, "steering.vectors[1].values"), r.text
        assert "max_vector_norm" in r.json()["error"]["message"]
        assert chat(client, ADMIN, steering={"vectors": [big]}).status_code == 200
        assert client.post("/v1/presets", headers=ADMIN, json={
            "name": "pushy", "steering": {"vectors": [big]}}).status_code == 200
        assert chat(client, USER, model=f"{MODEL}:pushy").status_code == 200  # vetted
        r = chat(client, USER, steering={"vectors": [{"layer": 99, "values": [0.1] * 576}]})
        assert r.status_code == 400  # what the server refuses anyway stays its 400
    finally:
        compiler.layer_norms = saved
        state.experiments.close()
    assert 'steer_policy_denials_total{reason="vector_norm"} 1.0' in client.get("/metrics").text


def test_inspect_is_a_readout(api, parts, tmp_path):
    client, _ = api
    r = client.post("/v1/features/inspect", headers=USER, json={"text": "Hi", "features": ["formality"]})
    assert r.status_code == 403 and r.json()["error"]["code"] == "permission_denied"
    client2, state2 = serve(parts, tmp_path / "b", "{features: {deny: [refusal]}}")
    r = client2.post("/v1/features/inspect", headers=USER, json={"text": "Hi", "features": ["formality", "refusal"]})
    assert (r.status_code, r.json()["error"]["param"]) == (403, "features[1]")
    r = client2.post("/v1/features/inspect", headers=USER,
                     json={"text": "Hi", "features": ["formality"], "steering": {"features": {"refusal": 1}}})
    assert (r.status_code, r.json()["error"]["param"]) == (403, "steering.features.refusal")
    assert state2.engine.params == []
    state2.experiments.close()


def test_check_as_a_function(parts):
    packs = parts["packs"]
    policy = Policy.model_validate({"max_strength": 1.0, "protect": {"refusal": {"max": 0.5}}})
    check(policy, None, packs)
    check(policy, SteeringSpec.parse({"features": {"refusal": 0.5, "humor": -1.0}}), packs)
    with pytest.raises(PolicyViolation) as exc:
        check(policy, SteeringSpec.parse({"features": {"refusal": 0.75}}), packs)
    assert (exc.value.param, exc.value.reason) == ("steering.features.refusal", "protected")
    with pytest.raises(PolicyViolation) as exc:
        check(policy, SteeringSpec.parse({"vectors": [{**VECTOR, "scale": 2.0}]}), packs)
    assert exc.value.param == "steering.vectors[0].scale"


class BlockingEngine(FakeEngine):
    """Holds its first request until ``release`` is set."""

    def __init__(self) -> None:
        super().__init__()
        self.started, self.release = threading.Event(), threading.Event()

    async def generate(self, prompt, params, request_id):
        if not self.started.is_set():
            self.started.set()
            await asyncio.to_thread(self.release.wait, 30)
        async for out in super().generate(prompt, params, request_id):
            yield out


def test_max_slots_is_a_429_per_key(parts, tmp_path):
    engine = BlockingEngine()
    client, state = serve(parts, tmp_path, "{max_slots: 1}", engine=engine)
    first: list[Any] = []
    held = threading.Thread(target=lambda: first.append(
        chat(client, USER, steering={"features": {"formality": 0.5}})))
    held.start()
    try:
        assert engine.started.wait(30)
        r = chat(client, USER, steering={"features": {"humor": 0.5}})  # a second configuration
        assert r.status_code == 429, r.text
        assert (r.json()["error"]["code"], r.json()["error"]["param"]) == ("steering_capacity_exceeded", "steering")
        assert r.headers["retry-after"] == "1"
        assert chat(client, USER, steering={"features": {"formality": 0.5}}).status_code == 200  # same one
        assert chat(client, USER).status_code == 200  # unsteered takes no slot
        assert chat(client, ADMIN, steering={"features": {"humor": 0.5}}).status_code == 200  # other key
    finally:
        engine.release.set()
        held.join(30)
    assert first[0].status_code == 200
    assert chat(client, USER, steering={"features": {"humor": 0.5}}).status_code == 200  # freed
    assert app_auth(client).slots.held("alice") == 0
    assert 'steer_policy_denials_total{reason="max_slots"} 1.0' in client.get("/metrics").text
    state.experiments.close()


def app_auth(client: TestClient) -> Any:
    return client.app.state.auth


def test_a_policy_monitor_on_an_unknown_feature_stops_the_server_at_start(parts, tmp_path) -> None:
    """Caught when the packs are loaded (the app's start-up runs check_monitors after the
    presets), not as a 400 on every request of that key."""
    client, state = serve(parts, tmp_path, "{monitors: [{feature: no_such_feature, above: 1.0}]}")
    with pytest.raises(ValueError, match="auth policy 'public'.*no_such_feature"):
        client.app.state.auth.check_monitors(state.compiler)
    state.experiments.close()
    good, state = serve(parts, tmp_path / "ok", "{monitors: [{feature: refusal, above: 1.0}]}")
    good.app.state.auth.check_monitors(state.compiler)  # a known feature passes
    state.experiments.close()
