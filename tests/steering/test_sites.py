"""Engine-free checks of steering.worker.sites: finding decoder layers and the stream from what a layer
returns, and the op on a one-tensor stream (``residual`` None) equal to the pair form."""

import numpy as np
import pytest
import torch

from steering.config import SteeringConfig
from steering.request import SteeringCompiler
from steering.worker.runtime import SteeringRuntime, set_runtime
from steering.worker.sites import UnsupportedModelError, decoder_layers, install_on_model

D, L = 4, 3


class PairLayer(torch.nn.Module):  # vLLM's usual convention: (hidden, residual)
    def forward(self, positions, hidden, residual):
        return hidden * 2, hidden if residual is None else residual


class StreamLayer(torch.nn.Module):  # Granite / the Transformers backend: the stream itself
    def forward(self, positions, hidden):
        return hidden + 1


class PPMissingLayer(torch.nn.Module):  # vLLM's name for another pipeline stage's layer
    def forward(self, *args):
        raise AssertionError("never called")


class Odd(torch.nn.Module):
    def __init__(self, out):
        super().__init__()
        self.out = out

    def forward(self, x):
        return self.out


def nested(layers):
    """A model whose layer list is at an unusual path (decoder.blocks)."""
    m = torch.nn.Module()
    m.decoder = torch.nn.Module()
    m.decoder.blocks = torch.nn.ModuleList(layers)
    m.heads = torch.nn.ModuleList([torch.nn.Linear(1, 1)])  # a ModuleList of another length
    return m


def runtime_with_add(vec: np.ndarray, layer: int) -> tuple[SteeringRuntime, int]:
    cfg = SteeringConfig(max_slots=2, max_features=2)
    rt = SteeringRuntime(cfg, num_layers=L, hidden_size=D, max_tokens=16, dtype=torch.float64,
                         device=torch.device("cpu"), host_gating=True)
    prog = SteeringCompiler(cfg, D, L).compile({"vectors": [
        {"layer": layer, "values": vec.tolist()},
        {"layer": layer, "values": [1.0, 0, 0, 0], "mode": "clamp", "target": 5.0}]})
    slot, _ = rt.allocator.acquire("r", prog.table_hash)
    rt.write_slot(slot, prog.program)
    return rt, slot


def step(rt, slot, n):
    rt.begin_step(np.array([slot]), np.array([0]), np.array([n]), np.array([0]), np.array([n]), [])


def test_layers_are_found_structurally_and_placeholders_skipped():
    m = nested([PairLayer(), PPMissingLayer(), StreamLayer()])
    assert decoder_layers(m, L) is m.decoder.blocks
    assert install_on_model(m, SteeringConfig(), L, D) == [0, 2]
    assert "forward" not in vars(m.decoder.blocks[1])
    with pytest.raises(UnsupportedModelError, match="cannot find decoder layers of 5 layers"):
        decoder_layers(m, 5)


@pytest.mark.parametrize("out,what", [
    ({"h": torch.ones(2, D)}, "dict"),
    (torch.ones(2, D + 1), "shape \\(2, 5\\)"),
    ((torch.ones(2, D), torch.ones(3, D)), "tuple of"),
])
def test_a_layer_without_a_stream_is_refused_naming_it(out, what):
    m = nested([Odd(out) for _ in range(L)])
    install_on_model(m, SteeringConfig(), L, D)
    with pytest.raises(UnsupportedModelError, match=f"decoder layer 0 \\(Odd\\) returns .*{what}"):
        m.decoder.blocks[0](None)


def test_tuple_led_by_the_stream_is_steered_and_extras_kept():
    extra = object()
    m = nested([Odd((torch.zeros(2, D, dtype=torch.float64), extra)) for _ in range(L)])
    install_on_model(m, SteeringConfig(), L, D)
    vec = np.array([0.5, -1.0, 2.0, 0.25])
    rt, slot = runtime_with_add(vec, 0)
    step(rt, slot, 2)
    set_runtime(rt)
    try:
        h, e = m.decoder.blocks[0](None)
    finally:
        set_runtime(None)
    assert e is extra
    assert torch.allclose(h[:, 1:], torch.from_numpy(vec[1:]).expand(2, 3))
    assert torch.allclose(h[:, 0], torch.full((2,), 5.0, dtype=h.dtype))  # the clamp held on the stream


def test_one_tensor_stream_equals_the_pair_form():
    """steer_(x, None) leaves x where steer_(h, r) leaves h + r, for x = h + r."""
    rng = np.random.default_rng(0)
    vec = rng.standard_normal(D)
    rt, slot = runtime_with_add(vec, 1)
    h, r = torch.from_numpy(rng.standard_normal((3, D))), torch.from_numpy(rng.standard_normal((3, D)))
    x = h + r
    set_runtime(rt)
    try:
        step(rt, slot, 3)
        torch.ops.steering.steer_(h, r, 1)
        rt.end_step()
        step(rt, slot, 3)
        torch.ops.steering.steer_(x, None, 1)
        rt.end_step()
    finally:
        set_runtime(None)
    assert torch.allclose(h + r, x, atol=1e-6)
    assert torch.allclose(x[:, 0], torch.full((3,), 5.0, dtype=x.dtype), atol=1e-6)


def test_pair_layer_steers_hidden_only():
    m = nested([PairLayer() for _ in range(L)])
    install_on_model(m, SteeringConfig(layers=[2]), L, D)
    vec = np.array([0.0, 1.0, 0.0, 0.0])
    rt, slot = runtime_with_add(vec, 2)
    hid, res = torch.zeros(2, D, dtype=torch.float64), torch.ones(2, D, dtype=torch.float64)
    step(rt, slot, 2)
    set_runtime(rt)
    try:
        h, r = m.decoder.blocks[2](None, hid, res)
    finally:
        set_runtime(None)
    assert r is res and torch.equal(r, torch.ones(2, D, dtype=torch.float64))  # residual untouched
    assert torch.allclose((h + r)[:, 1], torch.full((2,), 2.0, dtype=torch.float64))
    assert torch.allclose((h + r)[:, 0], torch.full((2,), 5.0, dtype=torch.float64))


def test_batch_of_one_stream_is_steered_through_a_token_view():
    """The Transformers backend runs transformers' layers on [1, T, d]."""
    m = nested([Odd(torch.zeros(1, 3, D, dtype=torch.float64)) for _ in range(L)])
    install_on_model(m, SteeringConfig(), L, D)
    vec = np.array([0.0, 1.0, -2.0, 0.5])
    rt, slot = runtime_with_add(vec, 0)
    step(rt, slot, 3)
    set_runtime(rt)
    try:
        out = m.decoder.blocks[0](None)
    finally:
        set_runtime(None)
    assert out.shape == (1, 3, D)
    assert torch.allclose(out[0, :, 1:], torch.from_numpy(vec[1:]).expand(3, 3))
    assert torch.allclose(out[0, :, 0], torch.full((3,), 5.0, dtype=out.dtype))
