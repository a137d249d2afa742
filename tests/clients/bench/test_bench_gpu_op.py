"""clients/bench/gpu_op.py on small sizes on the CPU: the harness, and the op it times, are the real ones."""

from __future__ import annotations

import json

import torch

from clients.bench import gpu_op
from steering.worker import runtime as rt_mod


def test_gpu_op_tiny_on_cpu_reports_every_scenario(tmp_path) -> None:
    out = tmp_path / "gpu_op.json"
    assert gpu_op.main(["--device", "cpu", "--tiny", "--iters", "1", "--repeats", "1",
                        "--clamp-k", "4,8", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert [(r["tokens"], r["op"]) for r in res["rows"]] == [
        (t, op) for t in (1, 8) for op in ("add", "clamp K=4", "clamp K=8")]
    for r in res["rows"]:
        assert r["layer_ms"] > 0 and r["op_ms"] > 0
        assert abs(r["op_over_layer"] - r["op_ms"] / r["layer_ms"]) < 1e-9
    assert res["graphs"] is False and rt_mod.get_runtime() is None


def test_bench_runtime_steers_the_tokens_it_says() -> None:
    """The timed op really changes steered rows: slot-1 token moves by add[1] (+ clamp delta)."""
    d, T = 32, 3
    rt = gpu_op.make_runtime(d, T, slots=2, k=0, dtype=torch.float32, device=torch.device("cpu"))
    assert rt.token_slots[:T].tolist() == [1, 2, 0]
    h, r = torch.zeros(T, d), torch.zeros(T, d)
    rt_mod.set_runtime(rt)
    try:
        torch.ops.steering.steer_(h, r, 0)
    finally:
        rt_mod.set_runtime(None)
    torch.testing.assert_close(h[0], rt.tables[0].add[1])
    torch.testing.assert_close(h[1], rt.tables[0].add[2])
    assert h[2].abs().max() == 0  # slot 0: unsteered


def test_decoder_layer_shapes() -> None:
    s = gpu_op.TINY
    layer = gpu_op.DecoderLayer(s, tokens=3, dtype=torch.float32, device=torch.device("cpu"))
    h, r = layer(torch.randn(3, s.d), torch.randn(3, s.d))
    assert h.shape == r.shape == (3, s.d) and torch.isfinite(h).all()
