"""Slow and idle clients over real sockets (server/connections.py): the real app over a fake
engine, served by uvicorn with the guarded protocol on a loopback port."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import uvicorn
from fakes import AUTH, MODEL, load_parts, make_state

from server.app import create_app
from server.config import ServeConfig
from server.connections import ConnectionLimits, uvicorn_options

LIMITS = ConnectionLimits(header_timeout_s=1.0, body_timeout_s=1.5, max_connections=64, keep_alive_s=1.0)
STALLED = 40


@pytest.fixture(scope="module")
def served(tmp_path_factory) -> Iterator[tuple[str, Any]]:
    from clients.launch import free_port

    state = make_state(load_parts(), tmp_path_factory.mktemp("conn"),
                       ServeConfig(api_key=AUTH["authorization"][7:], connections=LIMITS))
    app = create_app(state)
    state.experiments.ready()
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                           lifespan="off",
                                           **uvicorn_options(LIMITS, state.metrics.connections_closed_by)))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}", state
    server.should_exit = True
    thread.join(10)
    state.experiments.close()


def _open(url: str, first: bytes) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    s = socket.create_connection((host, int(port)), timeout=10)
    if first:
        s.sendall(first)
    return s


def _closed_within(s: socket.socket, seconds: float) -> tuple[bool, bytes]:
    """(whether the server closed ``s`` within ``seconds``, what it sent before)."""
    s.settimeout(seconds)
    got = b""
    try:
        while chunk := s.recv(4096):
            got += chunk
        return True, got
    except TimeoutError:
        return False, got
    except ConnectionResetError:
        return True, got


def _chat(url: str) -> httpx.Response:
    return httpx.post(f"{url}/v1/chat/completions", headers=AUTH, timeout=10, json={
        "model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4})


def _closed_count(state: Any, reason: str) -> float:
    return state.metrics.connections_closed.labels(reason)._value.get()


def test_stalled_headers_are_closed_in_bounded_time_and_others_are_served(served) -> None:
    url, state = served
    before = _closed_count(state, "header_timeout")
    stalled = [_open(url, b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Le") for _ in range(STALLED)]
    silent = _open(url, b"")  # connects and never sends a byte
    try:
        assert _chat(url).status_code == 200  # served while they stall
        t0 = time.monotonic()
        for s in [*stalled, silent]:
            closed, got = _closed_within(s, max(0.1, t0 + 5 - time.monotonic()))
            assert closed, "a stalled connection was still open 5 s after the 1 s header timeout"
            assert got.startswith(b"HTTP/1.1 408"), got[:80]
        assert _closed_count(state, "header_timeout") - before == STALLED + 1
        assert _chat(url).status_code == 200
    finally:
        for s in [*stalled, silent]:
            s.close()


def test_a_stalled_body_is_closed(served) -> None:
    url, state = served
    before = _closed_count(state, "body_timeout")
    s = _open(url, b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: "
              + AUTH["authorization"].encode() + b"\r\nContent-Type: application/json\r\n"
              b"Content-Length: 1000\r\n\r\n{\"model\":")
    try:
        t0 = time.monotonic()
        closed, _ = _closed_within(s, 6)
        assert closed and time.monotonic() - t0 < 6
        assert _closed_count(state, "body_timeout") - before == 1
    finally:
        s.close()
    assert _chat(url).status_code == 200


def test_an_idle_kept_alive_connection_is_closed(served) -> None:
    url, _ = served
    s = _open(url, b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
    try:
        s.settimeout(5)
        assert s.recv(4096).startswith(b"HTTP/1.1 ")
        t0 = time.monotonic()
        closed, _ = _closed_within(s, 5)
        assert closed and time.monotonic() - t0 < 4
    finally:
        s.close()


def test_connections_past_the_cap_get_503_and_are_closed(served) -> None:
    url, state = served
    before = _closed_count(state, "max_connections")
    held = [_open(url, b"GET /health HTTP/1.1\r\nHost: x\r\n") for _ in range(LIMITS.max_connections)]
    try:
        time.sleep(0.2)
        extra = _open(url, b"")
        closed, got = _closed_within(extra, 3)
        extra.close()
        assert closed and got.startswith(b"HTTP/1.1 503") and b"retry-after: 1" in got.lower(), got[:200]
        body = json.loads(got.split(b"\r\n\r\n", 1)[1])
        assert body["error"]["type"] == "service_unavailable", body  # the table's 503 type
        assert body["error"]["code"] == "too_many_connections", body
        assert _closed_count(state, "max_connections") - before >= 1
    finally:
        for s in held:
            s.close()
    deadline = time.monotonic() + 5
    while True:  # the held ones are gone: new connections are served again
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline
        time.sleep(0.1)


def test_a_body_of_millions_of_containers_does_not_stall_other_requests(served) -> None:
    """2.4 M empty lists (7 MiB): refused, and /health answered meanwhile within a second (it
    was stalled 2.6 s when the parse ran with the garbage collector scanning)."""
    url, _ = served
    hostile = b'{"model":"m","messages":[{"role":"user","content":"Hi"}],"x":[' + b"[]," * 2_400_000 + b"[]]}"
    gaps: list[float] = []
    done = threading.Event()

    def probe() -> None:
        with httpx.Client(timeout=10) as c:
            while not done.is_set():
                t0 = time.monotonic()
                c.get(f"{url}/health")
                gaps.append(time.monotonic() - t0)

    prober = threading.Thread(target=probe)
    prober.start()
    try:
        time.sleep(0.3)
        for _ in range(3):
            r = httpx.post(f"{url}/v1/chat/completions", content=hostile, timeout=30,
                           headers={**AUTH, "content-type": "application/json"})
            assert r.status_code == 400 and r.json()["error"]["code"] == "json_too_complex", r.text[:200]
        time.sleep(0.3)
    finally:
        done.set()
        prober.join()
    print(f"\nlongest /health while 3 hostile bodies were refused: {max(gaps) * 1000:.0f} ms "
          f"({len(gaps)} probes)")
    assert len(gaps) > 10 and max(gaps) < 1.0


def test_the_connection_cap_fits_the_open_file_limit(monkeypatch) -> None:
    import resource

    from server import connections

    monkeypatch.setattr(resource, "getrlimit", lambda _: (1024, 4096))
    assert connections.fitted(ConnectionLimits(max_connections=2048)).max_connections == 1024 - connections.FD_RESERVE
    assert connections.fitted(ConnectionLimits(max_connections=500)).max_connections == 500
