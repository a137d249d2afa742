"""deploy/compose: the compose file is valid Compose (the ``compose-spec`` validator from PyPI,
always; ``docker compose config`` too where a compose tool is installed), its services fit
together (health checks, depends_on, ports, mounts, env names the server reads), Prometheus
scrapes steer, Grafana is provisioned, and every metric the dashboard queries is exported by a
live server's ``/metrics``."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
COMPOSE_DIR = REPO_ROOT / "deploy" / "compose"
COMPOSE_FILE = COMPOSE_DIR / "docker-compose.yml"
ENV_EXAMPLE = COMPOSE_DIR / ".env.example"
DASHBOARD = COMPOSE_DIR / "grafana" / "dashboards" / "steer.json"
PLACEHOLDER = "change-me"


# -- Compose's variable interpolation (what `docker compose` does before it validates) ---------

_VAR = re.compile(r"\$(?:(?P<esc>\$)|\{(?P<braced>[^}]*)\}|(?P<named>[A-Za-z_][A-Za-z0-9_]*))")


def interpolate(value: Any, env: dict[str, str]) -> Any:
    """``value`` (a loaded YAML tree) with ``$VAR``, ``${VAR}``, ``${VAR:-default}``,
    ``${VAR-default}``, ``${VAR:?error}``, ``${VAR?error}`` resolved from ``env`` and ``$$``
    turned into ``$``, as the Compose specification describes; a required variable that is
    missing raises ``KeyError``."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def one(m: re.Match[str]) -> str:
        if m["esc"]:
            return "$"
        if m["named"]:
            return env.get(m["named"], "")
        body = m["braced"]
        op = re.match(r"([A-Za-z_][A-Za-z0-9_]*)(:?[-?])?(.*)$", body, re.S)
        assert op is not None, f"bad interpolation ${{{body}}}"
        name, kind, arg = op.groups()
        present = name in env and (env[name] != "" or not (kind or "").startswith(":"))
        if kind in (":-", "-"):
            return env[name] if present else arg
        if kind in (":?", "?"):
            if not present:
                raise KeyError(f"{name}: {arg}")
            return env[name]
        return env.get(name, "")

    return _VAR.sub(one, value)


def read_env_file(path: Path) -> dict[str, str]:
    env = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, val = line.partition("=")
            env[key.strip()] = val.strip()
    return env


@pytest.fixture(scope="module")
def env() -> dict[str, str]:
    return read_env_file(ENV_EXAMPLE)


@pytest.fixture(scope="module")
def raw() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE_FILE.read_text())


@pytest.fixture(scope="module")
def compose(raw, env) -> dict[str, Any]:
    return interpolate(raw, env)


def test_interpolation_follows_the_spec() -> None:
    env = {"A": "a", "E": ""}
    assert interpolate("${A}-$A-${B:-b}-${E:-e}-${E-e}-$${A}", env) == "a-a-b-e--${A}"
    assert interpolate({"k": ["${A:?need A}"]}, env) == {"k": ["a"]}
    with pytest.raises(KeyError, match="need B"):
        interpolate("${B:?need B}", env)
    with pytest.raises(KeyError):
        interpolate("${E:?empty is missing}", env)


# -- the compose file -------------------------------------------------------------------------

def test_compose_file_is_valid_compose_spec(compose) -> None:
    """Validated by the compose-spec package from PyPI: its Rust parser (the specification's
    types; no unknown keys; valid durations, images, ports and depends_on conditions), then its
    pydantic models generated from the specification's JSON schema."""
    from compose_spec import PyCompose

    parsed = PyCompose.from_json(json.dumps(compose))
    assert sorted(parsed.service_names()) == ["grafana", "postgres", "prometheus", "steer"]
    spec = parsed.to_spec()
    assert spec.services["steer"].healthcheck is not None


def test_the_validator_rejects_a_broken_file(compose) -> None:
    """The check above can fail: a misspelt key, a bad duration and an unknown condition are
    each refused."""
    from compose_spec import PyCompose

    broken = [
        {**compose, "services": {**compose["services"], "steer": {
            **compose["services"]["steer"], "imgae": "x"}}},
        {**compose, "services": {**compose["services"], "postgres": {
            **compose["services"]["postgres"], "healthcheck": {"test": ["CMD", "true"], "interval": "soon"}}}},
        {**compose, "services": {**compose["services"], "grafana": {
            **compose["services"]["grafana"], "depends_on": {"prometheus": {"condition": "service_ready"}}}}},
    ]
    for bad in broken:
        with pytest.raises(ValueError):
            PyCompose.from_json(json.dumps(bad))


def test_every_required_variable_is_in_env_example(raw) -> None:
    """Interpolating with an empty environment names exactly the variables .env.example must
    set, and it sets each of them (to a placeholder, never a real secret)."""
    env = read_env_file(ENV_EXAMPLE)
    for var in ("STEER_API_KEY", "POSTGRES_PASSWORD", "GRAFANA_ADMIN_PASSWORD"):
        with pytest.raises(KeyError, match=var):
            interpolate(raw, {k: v for k, v in env.items() if k != var})
        assert env[var] == PLACEHOLDER, f"{var} in .env.example must be the placeholder"
    used = {m["braced"].split(":")[0].split("-")[0].split("?")[0] if m["braced"] else m["named"]
            for m in _VAR.finditer(COMPOSE_FILE.read_text()) if not m["esc"]}
    assert used <= set(env), f"not in .env.example: {sorted(used - set(env))}"


def test_services_fit_together(compose) -> None:
    services = compose["services"]
    for name, svc in services.items():
        assert "healthcheck" in svc and svc["healthcheck"]["test"], f"{name} has no healthcheck"
        for dep in svc.get("depends_on", {}):
            assert dep in services, f"{name} depends on unknown service {dep}"
    assert services["steer"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert services["grafana"]["depends_on"]["prometheus"]["condition"] == "service_healthy"
    assert "steer" in services["prometheus"]["depends_on"]

    steer = services["steer"]
    assert steer["image"] == "steer-server:cpu"
    assert steer["build"]["dockerfile"] == "deploy/docker/Dockerfile"
    assert (COMPOSE_DIR / steer["build"]["context"]).resolve() == REPO_ROOT
    assert any(str(p).endswith(":8000") for p in steer["ports"]), steer["ports"]
    assert "steer-data:/data" in steer["volumes"]
    health = " ".join(steer["healthcheck"]["test"])
    assert "http://127.0.0.1:8000/health" in health
    # No secret on a command line; only placeholders in the rendered file.
    assert "command" not in steer and "entrypoint" not in steer

    declared = set(compose.get("volumes", {}))
    for name, svc in services.items():
        for mount in svc.get("volumes", []):
            source = mount.split(":")[0]
            if source.startswith((".", "/")):
                assert (COMPOSE_DIR / source).exists(), f"{name}: {source} does not exist"
            else:
                assert source in declared, f"{name}: volume {source} is not declared"


def test_the_server_reads_the_env_compose_sets(compose) -> None:
    """The variable names are the ones ``steer serve`` reads (parsed by its real parser)."""
    from server.cli import build_parser

    env = compose["services"]["steer"]["environment"]
    url = env["STEER_EXPERIMENTS_DB"]
    assert re.fullmatch(r"postgresql://steer:change-me@postgres:5432/steer", url), url
    saved = {k: os.environ.get(k) for k in env}
    try:
        os.environ.update(env)
        args = build_parser().parse_args(["serve"])
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    assert args.experiments_db == url
    assert args.api_key == PLACEHOLDER


def _compose_tool() -> list[str] | None:
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "compose", "version"], capture_output=True).returncode == 0:
        return [docker, "compose"]
    legacy = shutil.which("docker-compose")
    return [legacy] if legacy else None


def test_docker_compose_config_accepts_it() -> None:
    """``docker compose config`` (or Debian's ``docker-compose``), where one is installed;
    needs no Docker daemon."""
    tool = _compose_tool()
    if tool is None:
        pytest.skip("no docker compose / docker-compose installed")
    r = subprocess.run([*tool, "--env-file", str(ENV_EXAMPLE), "-f", str(COMPOSE_FILE), "config", "-q"],
                       cwd=COMPOSE_DIR, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr


# -- Prometheus and Grafana -------------------------------------------------------------------

def test_prometheus_scrapes_steer(compose) -> None:
    prom = yaml.safe_load((COMPOSE_DIR / "prometheus.yml").read_text())
    jobs = {j["job_name"]: j for j in prom["scrape_configs"]}
    steer = jobs["steer"]
    assert steer.get("metrics_path", "/metrics") == "/metrics"
    targets = [t for sc in steer["static_configs"] for t in sc["targets"]]
    assert targets == ["steer:8000"]
    host, port = targets[0].split(":")
    assert host in compose["services"]
    assert any(str(p).endswith(f":{port}") for p in compose["services"][host]["ports"])
    mounts = compose["services"]["prometheus"]["volumes"]
    assert "./prometheus.yml:/etc/prometheus/prometheus.yml:ro" in mounts
    assert "--config.file=/etc/prometheus/prometheus.yml" in compose["services"]["prometheus"]["command"]


def test_grafana_is_provisioned(compose) -> None:
    grafana = compose["services"]["grafana"]
    mounts = dict(m.split(":")[:2] for m in grafana["volumes"])
    assert mounts["./grafana/provisioning"] == "/etc/grafana/provisioning"
    ds = yaml.safe_load((COMPOSE_DIR / "grafana/provisioning/datasources/prometheus.yml").read_text())
    (source,) = ds["datasources"]
    assert source["type"] == "prometheus" and source["url"] == "http://prometheus:9090"
    assert "prometheus" in compose["services"]
    dashboards = yaml.safe_load((COMPOSE_DIR / "grafana/provisioning/dashboards/steer.yml").read_text())
    (provider,) = dashboards["providers"]
    assert mounts["./grafana/dashboards"] == provider["options"]["path"]
    assert grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"] == \
        f"{provider['options']['path']}/{DASHBOARD.name}"


# -- the dashboard ----------------------------------------------------------------------------

REQUIRED_PANELS = {
    "Requests/s by route and status", "Tokens/s", "Time to first token", "Inter-token latency",
    "Steered vs unsteered", "Steering slots", "Policy denials", "Exposures", "Feedback",
    "Experiment store errors",
}


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def queries(dashboard: dict[str, Any]) -> list[str]:
    return [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]


def test_dashboard_has_the_panels(dashboard) -> None:
    assert dashboard["uid"] and dashboard["title"]
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    titles = {p["title"] for p in panels}
    assert REQUIRED_PANELS <= titles, REQUIRED_PANELS - titles
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for p in panels:
        assert p["targets"], p["title"]
        assert p["datasource"]["uid"] == "${datasource}" and "datasource" in variables
        for t in p["targets"]:
            assert t["expr"].count("(") == t["expr"].count(")"), t["expr"]
            assert 'instance=~"$instance"' in t["expr"] and "instance" in variables
    latency = [e for e in queries(dashboard) if "histogram_quantile" in e]
    for name in ("steer_time_to_first_token_seconds", "steer_inter_token_latency_seconds"):
        qs = [e for e in latency if f"{name}_bucket" in e]
        assert {re.search(r"histogram_quantile\(([\d.]+)", e)[1] for e in qs} >= {"0.5", "0.9", "0.99"}
        assert all("by (le" in e for e in qs)


# PromQL: the metric names of an expression, and which exported family each one belongs to.

_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or",
             "unless", "offset", "inf", "nan"}


def metric_names(expr: str) -> set[str]:
    """The metric names ``expr`` selects: identifiers left after removing strings, label
    matchers, ranges, grouping clauses and variables, that are not functions or keywords."""
    s = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    s = re.sub(r"\{[^}]*\}", " ", s)
    s = re.sub(r"\[[^\]]*\]", " ", s)
    s = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", s)
    s = re.sub(r"\$\{?\w+\}?", " ", s)
    names = set()
    for m in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", s):
        before = s[:m.start()]
        if before and (before[-1].isdigit() or before[-1] == "."):
            continue  # a number's exponent or a duration unit
        if s[m.end():].lstrip().startswith("(") or m.group(0).lower() in _KEYWORDS:
            continue
        names.add(m.group(0))
    return names


def families(exposition: str) -> dict[str, str]:
    """``# TYPE`` lines: family name → type (present even for labelled metrics with no sample)."""
    out = {}
    for line in exposition.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(maxsplit=3)
            out[name] = kind.strip()
    return out


def family_of(series: str, fams: dict[str, str]) -> str | None:
    """The family a queried series name belongs to, by the suffix its type gives its samples:
    counters ``_total`` (prometheus_client writes the family with or without it), histograms
    ``_bucket``/``_count``/``_sum``, summaries ``_count``/``_sum``; None if nothing exports it."""
    if fams.get(series) in ("gauge", "untyped", "unknown", "info", "stateset", "summary"):
        return series
    if series.endswith("_total"):
        if fams.get(series) == "counter":
            return series
        base = series[:-len("_total")]
        if fams.get(base) == "counter" and not base.endswith("_total"):
            return base
    for suffix in ("_bucket", "_count", "_sum"):
        if series.endswith(suffix):
            base = series[:-len(suffix)]
            if fams.get(base) in ("histogram", "gaugehistogram") or (
                    fams.get(base) == "summary" and suffix != "_bucket"):
                return base
    return None


def test_promql_names_and_families() -> None:
    expr = ('histogram_quantile(0.99, sum by (le, steered) (rate(a_seconds_bucket{i=~"$x",s="b{c}"}[$__rate_interval])))'
            ' / on (pod) group_left sum(rate(b_total[5m] offset 1h)) + c:gauge * 1e3 + sum(d) by (le)')
    assert metric_names(expr) == {"a_seconds_bucket", "b_total", "c:gauge", "d"}
    fams = {"a_seconds": "histogram", "b_total": "counter", "b2": "counter", "c:gauge": "gauge",
            "it_total": "histogram", "s": "summary"}
    assert family_of("a_seconds_bucket", fams) == "a_seconds"
    assert family_of("a_seconds_count", fams) == "a_seconds"
    assert family_of("b_total", fams) == "b_total"
    assert family_of("b2_total", fams) == "b2"
    assert family_of("it_total_bucket", fams) == "it_total"
    assert family_of("s_sum", fams) == "s" and family_of("s_bucket", fams) is None
    assert family_of("c:gauge", fams) == "c:gauge"
    for wrong in ("a_seconds", "a_seconds_total", "b2", "b_total_total", "c:gauge_total", "it_total"):
        assert family_of(wrong, fams) is None, wrong


def test_dashboard_queries_live_metrics(server, dashboard) -> None:
    """Every metric the dashboard queries is exported by a real server (steer's and vLLM's), and
    the steered label has both values after one steered and one unsteered request."""
    body = {"model": "SmolLM2-135M-Instruct", "prompt": "The capital of France is", "max_tokens": 3,
            "temperature": 0.0}
    for steering in (None, {"features": {"formality": 0.5}}):
        r = httpx.post(f"{server.url}/v1/completions", headers=server.headers, timeout=120,
                       json={**body, **({"steering": steering} if steering else {})})
        assert r.status_code == 200, r.text
    text = httpx.get(f"{server.url}/metrics", timeout=30).text
    fams = families(text)
    missing = {}
    for expr in queries(dashboard):
        names = metric_names(expr)
        assert names, expr
        for name in names:
            if family_of(name, fams) is None:
                missing[name] = expr
    assert not missing, f"queried but not exported: {missing}"
    for steered in ("true", "false"):
        assert f'steer_e2e_request_latency_seconds_count{{steered="{steered}"}}' in text
        assert f'steer_time_to_first_token_seconds_bucket{{le="+Inf",steered="{steered}"}}' in text \
            or re.search(rf'steer_time_to_first_token_seconds_bucket{{[^}}]*steered="{steered}"', text)
    slots = re.search(r"^steer_steering_slots (\S+)$", text, re.M)
    assert slots and float(slots[1]) > 0, "steer_steering_slots is not bound to the slot gate"
    assert re.search(r"^steer_steering_slots_busy \S+$", text, re.M)
