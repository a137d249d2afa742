"""Schemathesis over the live server's ``/openapi.json``: every operation, valid and invalid
inputs generated from the document itself, against the real engine.

Asserted for every response: no 5xx (``not_a_server_error``), the status is one the document
lists (``status_code_conformance``), its content type too (``content_type_conformance``), and
the body matches the documented schema (``response_schema_conformance`` — the OpenAI error
shape for every 4xx). A body the schema forbids is refused with a 4xx
(``negative_data_rejection``).

Bounded: seeded and derandomized (the same requests every run), ``EXAMPLES`` positive and
``EXAMPLES`` negative cases per operation (23 operations: a few hundred requests), generations
capped at ``MAX_TOKENS`` tokens, and a wall-clock budget that fails the test if exceeded. No
operation is excluded. Presets, experiments, workshop jobs and custom features the fuzzer
manages to create are cancelled or deleted afterwards, so the rest of the session sees the server
as it was.
"""

from __future__ import annotations

import time
from collections import Counter
from typing import Any

import httpx
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.core.failures import Failure, FailureGroup

from server.protocol import INT32_MAX

EXAMPLES = 10
"""Hypothesis examples per operation and mode (positive, negative)."""
MAX_TOKENS = 4
"""Generated ``max_tokens`` and friends are capped: the fuzz explores shapes, not long outputs."""
BUDGET_S = 120.0
REQUEST_TIMEOUT_S = 60.0

CHECKS = [schemathesis.checks.not_a_server_error, schemathesis.checks.status_code_conformance,
          schemathesis.checks.content_type_conformance,
          schemathesis.checks.response_schema_conformance,
          schemathesis.checks.negative_data_rejection]

# field: (cap, the schema's maximum) — a value above the maximum is a negative case's point.
_BOUNDED = {"max_tokens": (MAX_TOKENS, INT32_MAX), "max_completion_tokens": (MAX_TOKENS, INT32_MAX),
            "min_tokens": (MAX_TOKENS, INT32_MAX), "n": (2, 64)}


def _bound(case: schemathesis.Case, model: str, positive: bool) -> None:
    """Cap the output a generated body asks for (a positive int stays positive, other values —
    the negative cases' wrong types — are left for the server to refuse), and in valid bodies
    name the served model, so that they reach the engine instead of a 404 (unknown models are
    test_hostile_inputs' and test_api_errors' business)."""
    body = case.body
    if not isinstance(body, dict):
        return
    if positive and isinstance(body.get("model"), str):
        body["model"] = model
    if ("messages" in body or "prompt" in body) and "max_tokens" not in body \
            and "max_completion_tokens" not in body:
        body["max_tokens"] = MAX_TOKENS  # a chat body without one generates to the end of the context
    for name, (cap, maximum) in _BOUNDED.items():
        value = body.get(name)
        if type(value) is int and cap < value <= maximum:
            body[name] = cap


def _names(client: httpx.Client, path: str) -> set[str]:
    r = client.get(path)
    assert r.status_code == 200, r.text
    return {item.get("name") or item.get("id") for item in r.json()["data"]}


def fuzz(url: str, headers: dict[str, str]) -> tuple[Counter[tuple[str, int]], list[str], dict[str, str]]:
    """Run every operation of ``url``'s document: responses by (operation, status), failure
    reports, and the first refusal of a valid body per operation."""
    schema = schemathesis.openapi.from_url(f"{url}/openapi.json", timeout=30)
    schema.config.update(base_url=url, headers=headers)
    model = httpx.get(f"{url}/v1/models", headers=headers, timeout=30).json()["data"][0]["id"]
    statuses: Counter[tuple[str, int]] = Counter()
    refusals: dict[str, str] = {}  # first refusal of a valid body per operation, for failure messages
    problems: list[str] = []
    started = time.monotonic()
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 20, [op.label for op in operations]
    for op in operations:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            @settings(max_examples=EXAMPLES, derandomize=True, database=None, deadline=None,
                      phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
            @given(case=op.as_strategy(generation_mode=mode))
            def run(case: schemathesis.Case) -> None:
                if time.monotonic() - started > BUDGET_S:
                    return
                _bound(case, model, mode is GenerationMode.POSITIVE)
                try:
                    response = case.call(base_url=url, headers=headers, timeout=REQUEST_TIMEOUT_S)
                except requests.RequestException as exc:  # no answer in time, or a reset connection
                    problems.append(f"{op.label} [{mode.value}]: {type(exc).__name__}: {exc}"
                                    f"\n  body sent: {case.body!r:.400}")
                    return
                statuses[(op.label, response.status_code)] += 1
                if mode is GenerationMode.POSITIVE and response.status_code >= 400:
                    refusals.setdefault(op.label, response.text[:300])
                try:
                    case.validate_response(response, checks=CHECKS, headers=headers)
                except (Failure, FailureGroup) as exc:
                    body = case.body if not isinstance(case.body, (bytes, str)) else case.body[:300]
                    problems.append(f"{op.label} [{mode.value}] {response.status_code}: "
                                    f"{type(exc).__name__}: {str(exc)[:600]}\n  body sent: {body!r:.400}"
                                    f"\n  answer: {response.text[:300]}")
            try:
                run()
            except Unsatisfiable:
                # No parameters and no body (GET /health, /v1/models, ...): nothing to negate.
                assert mode is GenerationMode.NEGATIVE, op.label
    elapsed = time.monotonic() - started
    assert elapsed <= BUDGET_S + REQUEST_TIMEOUT_S, f"fuzz took {elapsed:.0f}s (budget {BUDGET_S:.0f}s)"
    return statuses, problems, refusals


@pytest.fixture
def restore_admin_state(server):
    """Delete the presets, experiments and custom features the fuzz created (and only those),
    after cancelling the workshop jobs it started."""
    with httpx.Client(base_url=server.url, headers=server.headers, timeout=30) as client:
        presets, experiments = _names(client, "/v1/presets"), _names(client, "/v1/experiments")
        custom = _custom(client)
        yield
        for job in client.get("/v1/features/jobs").json()["data"]:
            if job["status"] in ("queued", "running"):
                client.delete(f"/v1/features/jobs/{job['id']}")  # 409 if it is storing: deleted below
        for name in _names(client, "/v1/presets") - presets:
            client.delete(f"/v1/presets/{name}")
        for name in _names(client, "/v1/experiments") - experiments:
            client.delete(f"/v1/experiments/{name}")
        for name in _custom(client) - custom:
            client.delete(f"/v1/features/custom/{name}")
        assert _names(client, "/v1/presets") == presets
        assert _names(client, "/v1/experiments") == experiments
        assert _custom(client) == custom


def _custom(client: httpx.Client) -> set[str]:
    r = client.get("/v1/features", params={"limit": 500})
    assert r.status_code == 200, r.text
    return {f["name"] for f in r.json()["data"] if f["pack"] == "custom"}


def test_every_operation_answers_as_documented(server, restore_admin_state) -> None:
    statuses, problems, refusals = fuzz(server.url, server.headers)
    sent = sum(statuses.values())
    assert not problems, f"{len(problems)} of {sent} responses break the document:\n" + "\n".join(problems[:25])
    assert sent >= 150, f"only {sent} requests went out: the budget ran out early"
    table = "\n".join(f"{op} {status}: {n}" for (op, status), n in sorted(statuses.items()) if n)
    generation = ("POST /v1/chat/completions", "POST /v1/completions")
    assert sum(statuses[(label, 200)] for label in generation) >= 1, (  # the fuzz reached the engine
        f"{table}\nfirst refusals: {[refusals.get(label) for label in generation]}")
    assert httpx.get(f"{server.url}/health", timeout=10).status_code == 200


# -- the document itself (engine-free) -------------------------------------------------------
def _refs(node: Any) -> list[str]:
    if isinstance(node, dict):
        return ([node["$ref"]] if "$ref" in node else []) + [r for v in node.values() for r in _refs(v)]
    if isinstance(node, list):
        return [r for v in node for r in _refs(v)]
    return []


def test_every_body_is_documented_and_steering_fully_typed(tmp_path) -> None:
    from server.app import AppState, create_app
    from server.config import ServeConfig

    doc = create_app(AppState(config=ServeConfig(api_key="k", data_dir=str(tmp_path)))).openapi()
    bodies = {}
    for path, ops in doc["paths"].items():
        for method, op in ops.items():
            errors = op["responses"]["4XX"]["content"]["application/json"]["schema"]
            assert errors["properties"]["error"]["required"] == ["message", "type", "param", "code"]
            if method in ("post", "patch", "put"):
                assert op["requestBody"]["required"] is True, (method, path)
                bodies[f"{method.upper()} {path}"] = op["requestBody"]["content"]["application/json"]["schema"]
    assert set(bodies) == {
        "POST /v1/chat/completions", "POST /v1/completions", "POST /v1/features/inspect",
        "POST /v1/presets", "POST /v1/experiments", "PATCH /v1/experiments/{name}",
        "POST /v1/experiments/{name}/feedback", "POST /v1/features"}
    workshop = bodies["POST /v1/features"]
    assert workshop["additionalProperties"] is False and workshop["required"] == ["name", "description"]
    components = doc.get("components", {}).get("schemas", {})
    for ref in _refs(doc):
        assert ref.startswith("#/components/schemas/") and ref.rsplit("/", 1)[1] in components, ref
    for route in ("POST /v1/chat/completions", "POST /v1/completions", "POST /v1/features/inspect"):
        steering = next(s for s in bodies[route]["properties"]["steering"]["anyOf"] if s.get("type") == "object")
        assert steering["additionalProperties"] is False
        assert {"features", "vectors", "apply_to", "return_activations"} <= set(steering["properties"])
        vector = steering["properties"]["vectors"]["items"]
        assert {"layer", "values", "base64", "scale", "mode", "target", "when"} == set(vector["properties"])
        assert vector["required"] == ["layer"]
        assert "ablate" in str(steering["properties"]["features"]["additionalProperties"])
    seed = next(s for s in bodies["POST /v1/completions"]["properties"]["seed"]["anyOf"] if s.get("type") == "integer")
    # FastAPI writes the document's numbers as floats: int64's bounds come out as ±2**63.
    assert float(seed["maximum"]) == float(2**63 - 1) and float(seed["minimum"]) == float(-(2**63))
    schemathesis.openapi.from_dict(doc)  # loads as a valid document
