"""The container images of deploy/docker/.

``test_gpu_dockerfile_follows_the_cpu_one`` reads the two Dockerfiles and pyproject.toml only: it
runs in every ``make test``. The others need Docker and a built CPU image, and run only with
``STEER_IMAGE_TESTS=1`` (``make test-images`` sets it after building the image): they start the
image on the host network with a named volume on /data and an admin key in ``STEER_API_KEY``,
wait until Docker's HEALTHCHECK reports it healthy, steer a chat request with a bundled feature,
check that the server is not root, create a preset, then replace the container by a new one on
the same volume and find the preset again.

env: ``STEER_IMAGE`` (default ``steer-server:cpu``), ``STEER_DOCKER`` (the docker CLI),
``STEER_IMAGE_STARTUP_TIMEOUT`` (seconds until healthy, default 600).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import socket
import subprocess
import time
import tomllib
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from packaging.specifiers import SpecifierSet
from packaging.version import Version

REPO = Path(__file__).resolve().parents[2]
DOCKER_DIR = REPO / "deploy" / "docker"
IMAGE = os.environ.get("STEER_IMAGE", "steer-server:cpu")
DOCKER = os.environ.get("STEER_DOCKER", "docker")
STARTUP_TIMEOUT_S = float(os.environ.get("STEER_IMAGE_STARTUP_TIMEOUT", "600"))
MODEL = "SmolLM2-135M-Instruct"
ADMIN_KEY = "sk-steer-image-test"
AUTH = {"Authorization": f"Bearer {ADMIN_KEY}"}
PORTS = range(18240, 18300)  # this project's test range; the containers use the host network
SERVER_FLAGS = ("--max-model-len", "2048", "--enforce-eager")

needs_images = pytest.mark.skipif(
    os.environ.get("STEER_IMAGE_TESTS") != "1",
    reason="container tests run with STEER_IMAGE_TESTS=1 (make test-images)")


# --- the Dockerfiles, statically ---------------------------------------------------------------

@dataclass
class Dockerfile:
    args: dict[str, str] = field(default_factory=dict)  # ARG defaults before the first FROM
    base: str = ""  # FROM, ARG defaults substituted
    env: dict[str, str] = field(default_factory=dict)
    user: str | None = None
    healthcheck: str | None = None
    entrypoint: list[str] | None = None
    cmd: list[str] | None = None
    expose: list[str] = field(default_factory=list)
    volumes: list[str] = field(default_factory=list)


def _instructions(text: str) -> Iterator[tuple[str, str]]:
    """(KEYWORD, rest) per instruction: comments dropped, backslash continuations joined."""
    logical = ""
    for line in text.splitlines():
        stripped = line.strip()
        if not logical and (not stripped or stripped.startswith("#")):
            continue
        if stripped.startswith("#"):  # a comment inside a continued instruction
            continue
        if stripped.endswith("\\"):
            logical += stripped[:-1] + " "
            continue
        logical += stripped
        keyword, _, rest = logical.partition(" ")
        yield keyword.upper(), rest.strip()
        logical = ""


def _env_pairs(rest: str) -> dict[str, str]:
    words = shlex.split(rest)
    if len(words) >= 2 and "=" not in words[0]:  # legacy form: ENV KEY value
        return {words[0]: " ".join(words[1:])}
    return dict(w.split("=", 1) for w in words)


def parse_dockerfile(path: Path) -> Dockerfile:
    df = Dockerfile()
    seen_from = False
    for keyword, rest in _instructions(path.read_text()):
        if keyword == "ARG" and not seen_from:
            name, _, default = rest.partition("=")
            df.args[name] = default
        elif keyword == "FROM":
            seen_from = True
            image = rest.split()[0]
            df.base = re.sub(r"\$\{?(\w+)\}?", lambda m: df.args.get(m.group(1), ""), image)
        elif keyword == "ENV":
            df.env.update(_env_pairs(rest))
        elif keyword == "USER":
            df.user = rest
        elif keyword == "HEALTHCHECK":
            df.healthcheck = rest
        elif keyword in ("ENTRYPOINT", "CMD"):
            setattr(df, keyword.lower(), json.loads(rest))
        elif keyword == "EXPOSE":
            df.expose += rest.split()
        elif keyword == "VOLUME":
            df.volumes += json.loads(rest) if rest.startswith("[") else rest.split()
    return df


def test_gpu_dockerfile_follows_the_cpu_one():
    cpu = parse_dockerfile(DOCKER_DIR / "Dockerfile")
    gpu = parse_dockerfile(DOCKER_DIR / "Dockerfile.gpu")
    # The GPU base: an official vLLM image at an exact release the gpu extra accepts.
    m = re.fullmatch(r"vllm/vllm-openai:v(\d+\.\d+\.\d+)", gpu.base)
    assert m, f"Dockerfile.gpu: FROM {gpu.base!r} is not a pinned vllm/vllm-openai:vX.Y.Z"
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    (gpu_req,) = [r for r in extras["gpu"] if re.match(r"vllm\b", r)]
    spec = SpecifierSet(gpu_req[len("vllm"):].strip())
    assert Version(m.group(1)) in spec, f"vllm {m.group(1)} of the GPU base is outside {gpu_req!r}"
    # The CPU base: an argument, by default the official Python image of a pinned minor version.
    assert "BASE_IMAGE" in cpu.args and re.fullmatch(r"python:3\.\d+-slim-bookworm", cpu.base), cpu.base
    for df in (cpu, gpu):
        assert df.user and df.user not in ("root", "0") and not df.user.startswith("0:"), df.user
        assert df.healthcheck and "CMD" in df.healthcheck
        assert df.env.get("STEER_DATA_DIR") == "/data" and "/data" in df.volumes
        assert df.expose == ["8000"]
    # Same conventions: environment names, entrypoint, default command, health check.
    assert set(gpu.env) == set(cpu.env), set(gpu.env) ^ set(cpu.env)
    assert gpu.entrypoint == cpu.entrypoint == ["/usr/local/bin/steer-entrypoint"]
    assert gpu.cmd == cpu.cmd == ["steer", "serve", "--host", "0.0.0.0"]
    assert gpu.healthcheck == cpu.healthcheck
    assert gpu.user == cpu.user


# --- the CPU image, for real -------------------------------------------------------------------

def _docker(*args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
    proc = subprocess.run([DOCKER, *args], capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"docker {' '.join(args)} exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    return proc


def _free_port() -> int:
    for port in PORTS:
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in {PORTS}")


@dataclass
class Deployment:
    """One named volume and the containers started on it, one at a time."""

    volume: str
    port: int
    containers: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def container(self) -> str:
        return self.containers[-1]

    def start(self, *flags: str) -> float:
        """Run the image with ``flags`` (given to steer serve); seconds until Docker says healthy."""
        name = f"steer-image-test-{uuid.uuid4().hex[:8]}"
        self.containers.append(name)
        started = time.monotonic()
        _docker("run", "-d", "--name", name, "--network", "host", "--shm-size", "1g",
                "-v", f"{self.volume}:/data", "-e", f"STEER_API_KEY={ADMIN_KEY}",
                IMAGE, "--port", str(self.port), *flags)
        while True:
            state = json.loads(_docker("inspect", "-f", "{{json .State}}", name).stdout)
            health = (state.get("Health") or {}).get("Status")
            if health == "healthy":
                return time.monotonic() - started
            if state.get("Status") != "running" or health == "unhealthy" \
                    or time.monotonic() - started > STARTUP_TIMEOUT_S:
                logs = _docker("logs", name, check=False)
                lines = [ln for ln in (logs.stdout + logs.stderr).splitlines() if "GET /health" not in ln]
                tail = "\n".join(lines[-80:])
                raise AssertionError(f"{name}: {state.get('Status')}, health {health} after "
                                     f"{time.monotonic() - started:.0f}s; its log, without health checks:\n{tail}")
            time.sleep(1)

    def stop(self) -> float:
        """docker stop the current container (SIGTERM); seconds it took."""
        started = time.monotonic()
        _docker("stop", "-t", "60", self.container, timeout=120)
        return time.monotonic() - started

    def remove(self) -> None:
        for name in self.containers:
            _docker("rm", "-f", "-v", name, check=False)
        _docker("volume", "rm", "-f", self.volume, check=False)


@pytest.fixture(scope="module")
def deployment() -> Iterator[Deployment]:
    if _docker("image", "inspect", IMAGE, check=False).returncode != 0:
        pytest.fail(f"image {IMAGE} is not built (make test-images builds it)")
    dep = Deployment(volume=f"steer-image-test-{uuid.uuid4().hex[:8]}", port=_free_port())
    _docker("volume", "create", dep.volume)
    try:
        yield dep
    finally:
        dep.remove()
        print(f"\nimage timings: {json.dumps({k: round(v, 1) for k, v in dep.timings.items()})}")


@needs_images
def test_image_serves_steers_and_keeps_presets(deployment: Deployment):
    dep = deployment
    # First start: the default command with flags only (the entrypoint puts them after
    # `steer serve --host 0.0.0.0`); the health check finds the port in the command line.
    # Eager (no torch.compile), as the suite's other servers that are not about speed: on a busy
    # CPU the compiled start takes minutes.
    dep.timings["start_to_healthy_s"] = dep.start(*SERVER_FLAGS)
    with httpx.Client(base_url=dep.url, timeout=120) as client:
        assert client.get("/health").status_code == 200
        assert client.get("/v1/models").status_code == 401  # STEER_API_KEY reached the server

        body = {"model": MODEL, "messages": [{"role": "user", "content": "Tell me about your day."}],
                "max_tokens": 16, "temperature": 0, "steering": {"features": {"formality": 1.0}}}
        r = client.post("/v1/chat/completions", json=body, headers=AUTH)
        assert r.status_code == 200, r.text
        out = r.json()
        assert out["choices"][0]["message"]["content"]
        applied = out["steering"]["applied"]
        assert [a["feature"] for a in applied] == ["smollm2-tone/formality"], applied
        assert applied[0]["strength"] == 1.0
        assert out["steering"]["hash"] == r.headers["x-steering-hash"]

        r = client.post("/v1/presets", headers=AUTH, json={
            "name": "image-calm", "steering": {"features": {"enthusiasm": -1.0}}})
        assert r.status_code == 200, r.text

    # Not root: the container's user and the server process (PID 1 after the entrypoint's exec).
    ids = _docker("exec", dep.container, "id", "-u").stdout.strip(), \
        _docker("exec", dep.container, "id", "-g").stdout.strip()
    assert "0" not in ids, ids
    status = _docker("exec", dep.container, "cat", "/proc/1/status").stdout
    uids = re.search(r"^Uid:\s+(.*)$", status, re.M).group(1).split()
    assert uids and all(u != "0" for u in uids), uids
    cmdline = _docker("exec", dep.container, "cat", "/proc/1/cmdline").stdout.split("\0")
    assert "serve" in cmdline and "0.0.0.0" in cmdline, cmdline
    # The store is on the volume, written by that user.
    listing = _docker("exec", dep.container, "ls", "-n", "/data").stdout
    assert re.search(r"\b10001 +10001\b.*steer\.db", listing), listing
    dep.timings["stop_s"] = dep.stop()

    # A new container on the same volume still has the preset.
    dep.timings["restart_to_healthy_s"] = dep.start(*SERVER_FLAGS)
    with httpx.Client(base_url=dep.url, timeout=120) as client:
        r = client.get("/v1/presets/image-calm", headers=AUTH)
        assert r.status_code == 200, r.text
        assert r.json()["source"] == "api" and "enthusiasm" in r.json()["steering"]["features"]
        models = [m["id"] for m in client.get("/v1/models", headers=AUTH).json()["data"]]
        assert f"{MODEL}:image-calm" in models
        r = client.post("/v1/chat/completions", headers=AUTH, json={
            "model": f"{MODEL}:image-calm", "messages": [{"role": "user", "content": "Hi!"}],
            "max_tokens": 8, "temperature": 0})
        assert r.status_code == 200, r.text
        assert [a["feature"] for a in r.json()["steering"]["applied"]] == ["smollm2-tone/enthusiasm"]
