"""Helpers for tests against a live ``steer serve`` (a :class:`clients.launch.RunningServer`):
OpenAI error checks, the steering occupancy, and finding the server's processes. Import as
``from live import ...`` from tests under tests/server."""

from __future__ import annotations

import time
from typing import Any

import httpx
import numpy as np
import psutil

MODEL = "SmolLM2-135M-Instruct"
D = 576
"""The bundled model's hidden size."""


def completion(prompt: str = "The capital of France is", **fields: Any) -> dict[str, Any]:
    """A small greedy ``/v1/completions`` body."""
    return {"model": MODEL, "prompt": prompt, "max_tokens": 2, "temperature": 0.0, **fields}


def vector_steering(seed: int, layer: int = 10, norm: float = 30.0, **kw: Any) -> dict[str, Any]:
    """A random raw vector of ``norm`` at ``layer`` (a distinct configuration per seed)."""
    v = np.random.default_rng(seed).standard_normal(D)
    return {"vectors": [{"layer": layer, "values": (v / np.linalg.norm(v) * norm).tolist(), **kw}]}


def error_of(r: httpx.Response, status: int, param: str | None, code: str | None = None) -> dict:
    """The OpenAI error of ``r``, after checking its status, shape, ``param`` and ``code``."""
    assert r.status_code == status, (r.status_code, r.text[:500])
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    assert err["param"] == param, err
    if code is not None:
        assert err["code"] == code, err
    return err


def steering_status(srv: Any) -> dict[str, Any]:
    r = httpx.get(f"{srv.url}/v1/steering", headers=srv.headers, timeout=30)
    assert r.status_code == 200, r.text
    return r.json()


def metric(srv: Any, name: str) -> float:
    """One unlabelled sample of ``/metrics``."""
    text = httpx.get(f"{srv.url}/metrics", timeout=30).text
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} is not in /metrics")


def wait_until_idle(srv: Any, timeout: float = 60.0) -> dict[str, Any]:
    """Poll ``/v1/steering`` until no configuration is resident or busy, nothing waits and no
    readout is held (workers and API server). A one-token request first makes the engine run a
    step: workers release finished requests at the start of the next step."""
    r = httpx.post(f"{srv.url}/v1/completions", json=completion(max_tokens=1), headers=srv.headers,
                   timeout=120)
    assert r.status_code == 200, r.text
    deadline = time.monotonic() + timeout
    while True:
        st = steering_status(srv)
        w = st["worker"]
        held = (st["resident"], st["waiting"], w["busy_slots"], w["requests"], w["readouts"],
                w["readout_bytes"], metric(srv, "steer_readout_bytes_in_flight"))
        if held == (0, 0, 0, 0, 0, 0, 0.0):
            return st
        assert time.monotonic() < deadline, f"still held after {timeout:.0f}s: {st}"
        time.sleep(0.5)


def still_serving(srv: Any) -> None:
    """``/health`` is 200 and a completion still answers."""
    assert httpx.get(f"{srv.url}/health", timeout=10).status_code == 200
    r = httpx.post(f"{srv.url}/v1/completions", json=completion(), headers=srv.headers, timeout=120)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"]


def server_processes(srv: Any) -> list[psutil.Process]:
    """The ``steer serve`` process listening on ``srv``'s port and its descendants (the vLLM
    engine core and its workers)."""
    port = srv.url.rsplit(":", 1)[1]
    for proc in psutil.process_iter(["cmdline"]):
        cmd = proc.info["cmdline"] or []
        if "serve" in cmd and "--port" in cmd and cmd[cmd.index("--port") + 1] == port:
            return [proc, *proc.children(recursive=True)]
    raise AssertionError(f"no steer serve process on port {port}")


def rss_bytes(procs: list[psutil.Process]) -> dict[int, int]:
    """Resident set size of each process still alive, by pid."""
    out = {}
    for p in procs:
        try:
            out[p.pid] = p.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return out
