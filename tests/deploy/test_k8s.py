"""deploy/k8s: both overlays render with ``kubectl kustomize`` (skipped without kubectl), every
built-in object is a valid Kubernetes object (deserialized into the ``kubernetes`` client's typed
models, and nothing is lost on the way back: no unknown or misspelt field), and the objects fit
together: probes on the container's port, the Service's targetPort, selectors, Secret and
ConfigMap references, the flags ``steer serve`` is given (parsed by its real parser), the GPU
limit equal to the tensor-parallel size set in one place, /dev/shm in memory."""

from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
K8S_DIR = REPO_ROOT / "deploy" / "k8s"
OVERLAYS = ("cpu", "gpu")
MODELS = {
    ("apps/v1", "Deployment"): "V1Deployment",
    ("v1", "Service"): "V1Service",
    ("v1", "ConfigMap"): "V1ConfigMap",
    ("v1", "Secret"): "V1Secret",
    ("policy/v1", "PodDisruptionBudget"): "V1PodDisruptionBudget",
}
ENGINE_START_S = 600  # the startup probe must wait at least this long for the engine
GRACEFUL_SHUTDOWN_S = 5  # uvicorn's timeout_graceful_shutdown in server/cli.py


def _kustomize() -> list[str] | None:
    if shutil.which("kubectl"):
        return ["kubectl", "kustomize"]
    if shutil.which("kustomize"):
        return ["kustomize", "build"]
    return None


def render(path: Path) -> list[dict[str, Any]]:
    tool = _kustomize()
    if tool is None:
        pytest.skip("neither kubectl nor kustomize is installed")
    r = subprocess.run([*tool, str(path)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return [d for d in yaml.safe_load_all(r.stdout) if d]


@pytest.fixture(scope="module", params=OVERLAYS)
def overlay(request) -> tuple[str, list[dict[str, Any]]]:
    return request.param, render(K8S_DIR / "overlays" / request.param)


def one(objs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    (obj,) = [o for o in objs if o["kind"] == kind]
    return obj


def by_name(objs: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {o["metadata"]["name"]: o for o in objs if o["kind"] == kind}


def container(objs: list[dict[str, Any]]) -> dict[str, Any]:
    (c,) = one(objs, "Deployment")["spec"]["template"]["spec"]["containers"]
    return c


def serve_args(c: dict[str, Any]) -> list[str]:
    """The container's args with Kubernetes' ``$(VAR)`` expanded from its plain env values."""
    env = {e["name"]: e["value"] for e in c.get("env", []) if "value" in e}
    return [re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", lambda m: env.get(m[1], m[0]), a)
            for a in c["args"]]


def parsed_args(c: dict[str, Any]):
    """The ``steer serve`` flags the image's entrypoint is given, through the server's parser."""
    from server.cli import build_parser

    args = serve_args(c)
    assert all(a.startswith("--") for a in args[:1]), "the entrypoint prepends steer serve to flags"
    return build_parser().parse_args(["serve", *args])


# -- every object is a valid object -------------------------------------------------------------

def test_every_object_is_a_valid_kubernetes_object(overlay) -> None:
    from kubernetes.client import ApiClient

    name, objs = overlay
    api = ApiClient()
    kinds = sorted(o["kind"] for o in objs)
    assert kinds == ["ConfigMap", "Deployment", "PodDisruptionBudget", "Secret", "Service",
                     "ServiceMonitor"], kinds
    for obj in objs:
        if obj["kind"] == "ServiceMonitor":
            continue  # a CRD: checked structurally below
        model = MODELS.get((obj["apiVersion"], obj["kind"]))
        assert model, f"{name}: unexpected {obj['apiVersion']} {obj['kind']}"
        typed = api.deserialize(json.dumps(obj), model, "application/json")
        assert type(typed).__name__ == model
        back = api.sanitize_for_serialization(typed)
        assert back == obj, f"{name}: {obj['kind']} {obj['metadata']['name']} has fields the " \
                            f"{model} model does not know"


def test_the_round_trip_catches_a_misspelt_field() -> None:
    from kubernetes.client import ApiClient

    api = ApiClient()
    obj = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "x"},
           "spec": {"ports": [{"port": 80, "targetPort": "http"}], "selectr": {"a": "b"}}}
    assert api.sanitize_for_serialization(api.deserialize(json.dumps(obj), "V1Service", None)) != obj
    with pytest.raises(Exception):  # noqa: B017  (pydantic's ValidationError)
        api.deserialize(json.dumps({**obj, "spec": {"ports": [{"port": "eighty"}]}}), "V1Service", None)


# -- the Deployment ------------------------------------------------------------------------------

def test_probes_and_termination(overlay) -> None:
    _, objs = overlay
    pod = one(objs, "Deployment")["spec"]["template"]["spec"]
    c = container(objs)
    port_names = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert port_names == {"http": 8000}
    assert parsed_args(c).port == 8000
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        get = c[probe]["httpGet"]
        assert get["path"] == "/health" and get["port"] in port_names, (probe, get)
    startup = c["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= ENGINE_START_S
    assert parsed_args(c).startup_timeout <= startup["periodSeconds"] * startup["failureThreshold"]
    sleep = c["lifecycle"]["preStop"]["exec"]["command"]
    assert sleep[0] == "sleep" and int(sleep[1]) >= 15
    assert pod["terminationGracePeriodSeconds"] >= int(sleep[1]) + GRACEFUL_SHUTDOWN_S + 10
    assert pod["securityContext"]["runAsNonRoot"] is True


def test_references_resolve(overlay, tmp_path) -> None:
    """Every Secret and ConfigMap the pod names (kustomize's hashed names) is in the render and
    has the keys the pod reads; the --presets and --auth files are mounted from them, and the
    server's own loaders accept them."""
    from server.auth import load_auth
    from server.experiments.presets import read_presets_file

    _, objs = overlay
    secrets, configmaps = by_name(objs, "Secret"), by_name(objs, "ConfigMap")
    pod = one(objs, "Deployment")["spec"]["template"]["spec"]
    c = container(objs)
    for env in c["env"]:
        ref = env.get("valueFrom", {}).get("secretKeyRef")
        if ref:
            assert ref["key"] in secrets[ref["name"]]["data"], env
    mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
    assert set(mounts) <= {v["name"] for v in pod["volumes"]}
    files: dict[str, str] = {}  # path in the container -> content
    for vol in pod["volumes"]:
        if "configMap" in vol:
            data = configmaps[vol["configMap"]["name"]]["data"]
            files.update({f"{mounts[vol['name']]}/{k}": v for k, v in data.items()})
        elif "secret" in vol:
            data = secrets[vol["secret"]["secretName"]]["data"]
            for item in vol["secret"].get("items") or [{"key": k, "path": k} for k in data]:
                files[f"{mounts[vol['name']]}/{item['path']}"] = \
                    base64.b64decode(data[item["key"]]).decode()
    args = parsed_args(c)
    assert args.presets in files and args.auth in files, sorted(files)

    (tmp_path / "presets.yaml").write_text(files[args.presets])
    presets = read_presets_file(tmp_path / "presets.yaml")
    assert presets
    tone = json.loads((REPO_ROOT / "feature_packs" / "smollm2-tone" / "pack.json").read_text())
    known = {f["name"] for f in tone["features"]}
    for p in presets:
        assert set(p.steering.features or {}) <= known, p
    (tmp_path / "auth.yaml").write_text(files[args.auth])
    auth = load_auth(tmp_path / "auth.yaml")
    assert {k.role for k in auth.keys} == {"admin", "user"}


def test_example_secrets_are_placeholders(overlay) -> None:
    _, objs = overlay
    data = one(objs, "Secret")["data"]
    assert base64.b64decode(data["api-key"]) == b""  # no usable admin key as shipped
    url = base64.b64decode(data["experiments-db"]).decode()
    assert url.startswith("postgresql://") and "change-me" in url
    from server.experiments.backend import check_url

    assert check_url(url) == url  # a URL --experiments-db accepts


def test_service_pdb_and_servicemonitor_select_the_pods(overlay) -> None:
    _, objs = overlay
    deploy = one(objs, "Deployment")
    pod_labels = deploy["spec"]["template"]["metadata"]["labels"]
    assert deploy["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    svc, pdb, mon = one(objs, "Service"), one(objs, "PodDisruptionBudget"), one(objs, "ServiceMonitor")
    assert svc["spec"]["selector"].items() <= pod_labels.items()
    (port,) = svc["spec"]["ports"]
    assert port["targetPort"] in {p["name"] for p in container(objs)["ports"]} | \
        {p["containerPort"] for p in container(objs)["ports"]}
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert "maxUnavailable" in pdb["spec"] or "minAvailable" in pdb["spec"]
    # ServiceMonitor (monitoring.coreos.com/v1): selects the Service, scrapes its port's /metrics.
    assert mon["apiVersion"] == "monitoring.coreos.com/v1"
    assert set(mon["spec"]) <= {"selector", "endpoints", "namespaceSelector", "jobLabel",
                                "targetLabels", "podTargetLabels", "sampleLimit"}
    assert mon["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    for ep in mon["spec"]["endpoints"]:
        assert ep["port"] == port["name"] and ep["path"] == "/metrics"
        assert re.fullmatch(r"\d+s", ep["interval"]) and re.fullmatch(r"\d+s", ep["scrapeTimeout"])
        assert int(ep["scrapeTimeout"][:-1]) <= int(ep["interval"][:-1])


# -- CPU and GPU ---------------------------------------------------------------------------------

def gpu_limit(c: dict[str, Any]) -> int | None:
    value = c["resources"].get("limits", {}).get("nvidia.com/gpu")
    return None if value is None else int(value)


def test_cpu_overlay() -> None:
    objs = render(K8S_DIR / "overlays" / "cpu")
    c = container(objs)
    assert c["image"].endswith(":cpu")
    assert gpu_limit(c) is None
    assert parsed_args(c).tensor_parallel_size == 1


def test_gpu_overlay() -> None:
    objs = render(K8S_DIR / "overlays" / "gpu")
    pod = one(objs, "Deployment")["spec"]["template"]["spec"]
    c = container(objs)
    assert c["image"].endswith(":gpu")
    tp = parsed_args(c).tensor_parallel_size
    assert gpu_limit(c) == tp == int(c["resources"]["requests"]["nvidia.com/gpu"])
    shm = [v for v in pod["volumes"] if v["name"] == "shm"]
    assert shm and shm[0]["emptyDir"]["medium"] == "Memory"
    assert {"name": "shm", "mountPath": "/dev/shm"} in c["volumeMounts"]
    assert any(t["key"] == "nvidia.com/gpu" for t in pod.get("tolerations", []))
    assert "set-by-replacement" not in json.dumps(objs)
    assert not [o for o in objs if o["metadata"]["name"] == "steer-tensor-parallel"]


def test_gpu_tensor_parallel_size_is_set_in_one_place(tmp_path) -> None:
    """Changing tensor-parallel.yaml alone changes both the GPU limit and the flag."""
    tree = tmp_path / "k8s"
    shutil.copytree(K8S_DIR, tree)
    tp_file = tree / "overlays" / "gpu" / "tensor-parallel.yaml"
    doc = yaml.safe_load(tp_file.read_text())
    doc["data"]["tensor-parallel-size"] = "4"
    tp_file.write_text(yaml.safe_dump(doc))
    c = container(render(tree / "overlays" / "gpu"))
    assert gpu_limit(c) == parsed_args(c).tensor_parallel_size == 4
