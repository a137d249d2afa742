"""Conditional entries and monitors in the batched op, against a per-token reference of the
documented semantics (steering/monitors.py), on CPU tensors; and their compile-time checks."""

import numpy as np
import pytest
import torch

from steering.worker import runtime
from steering.config import SteeringConfig
from steering.features import Feature, StaticFeatureSource
from steering.monitors import MAX_CONDITIONS
from steering.program import SteeringProgram
from steering.request import SteeringCompiler
from steering.worker.runtime import SteeringRuntime, set_runtime
from steering.spec import MAX_MONITORS, SteeringError
from steering.wire import WireRecord

D, L, S, K = 12, 3, 4, 4
RNG = np.random.default_rng(7)
FEATS = StaticFeatureSource([
    Feature("f/dir0", 0, "direction", RNG.standard_normal(D), scale=2.0),
    Feature("f/dir1", 1, "direction", RNG.standard_normal(D), scale=2.0),
    Feature("f/sae1", 1, "sae", RNG.standard_normal(D), encoder=RNG.standard_normal(D),
            bias=0.1, threshold=0.3),
    Feature("f/dir2", 2, "direction", RNG.standard_normal(D), scale=1.0),
])
V = RNG.standard_normal(D)


def compiler():
    return SteeringCompiler(SteeringConfig(max_slots=S, max_features=K), D, L, FEATS)


def make_runtime(host_gating=True, dtype=torch.float64, max_tokens=64):
    return SteeringRuntime(SteeringConfig(max_slots=S, max_features=K), num_layers=L, hidden_size=D,
                           max_tokens=max_tokens, dtype=dtype, device=torch.device("cpu"),
                           host_gating=host_gating)


def reference(program: SteeringProgram, x: np.ndarray) -> list[np.ndarray]:
    """x [d] through every layer: conditions at L read x before L's steering; returns x after
    each layer."""
    gate = {0: 1.0}
    out = []
    for layer in range(L):
        for c, cond in enumerate(program.conditions, start=1):
            if cond.layer == layer:
                pre = float(cond.enc.astype(np.float64) @ x) + cond.bias
                act = 0.0 if (cond.rectify and pre <= cond.theta) else pre
                gate[c] = 1.0 if cond.sign * (act - cond.threshold) > 0 else 0.0
        lp = program.layers.get(layer)
        if lp is not None:
            if lp.add is not None:
                x = x + lp.add
            delta = np.zeros_like(x)
            for k in range(lp.num_entries):
                pre = float(lp.enc[k].astype(np.float64) @ x) + lp.bias[k]
                act = 0.0 if (lp.rectify[k] and pre <= lp.theta[k]) else pre
                delta += (lp.alpha[k] * act + lp.beta[k]) * gate[lp.cond[k]] * lp.dec[k].astype(np.float64)
            x = x + delta
        out.append(x)
    return out


def forward(rt, req_slots, n_sched, h, r):
    """One engine step: the slot index once, then every layer in order."""
    n = len(req_slots)
    rt.begin_step(np.array(req_slots), np.zeros(n, np.int64), np.array(n_sched), np.zeros(n, np.int64),
                  np.full(n, 10**6), [])
    set_runtime(rt)
    outs = []
    try:
        for layer in range(L):
            torch.ops.steering.steer_(h, r, layer)
            outs.append((h + r).clone())
    finally:
        set_runtime(None)
        rt.end_step()
    return outs


def conditioned_programs(c):
    return [
        # clamp at 1 when dir0 (layer 0) is above 0; a conditional add at 2 when sae1 is below 0.5
        c.compile({"features": {"dir1": {"strength": 1.5, "mode": "clamp",
                                         "when": {"feature": "dir0", "above": 0.0}}},
                   "vectors": [{"layer": 2, "values": V.tolist(), "scale": 0.5,
                                "when": {"feature": "sae1", "below": 0.5}}]}),
        # a condition at the layer it steers: reads dir1 before the clamp there
        c.compile({"features": {"dir1": {"strength": -2.0, "mode": "clamp",
                                         "when": {"feature": "dir1", "above": 0.2}},
                                "dir2": 0.8}}),
        c.compile({"features": {"sae1": {"strength": 2.0, "mode": "clamp"}}}),  # unconditioned
    ]


@pytest.mark.parametrize("host_gating,gather", [(True, False), (True, True), (False, False)])
def test_conditioned_entries_match_the_per_token_reference(host_gating, gather, monkeypatch):
    if gather:
        monkeypatch.setattr(runtime, "GATHER_COLUMNS_PER_ENTRY", 0)
        monkeypatch.setattr(runtime, "GATHER_CHUNK", 2)
    rt = make_runtime(host_gating)
    progs = conditioned_programs(compiler())
    assert progs[0].program.conditions and progs[1].program.conditions
    for slot, p in enumerate(progs, start=1):
        rt.write_slot(slot, p.program)
    req_slots, req_prog = [0, 1, 2, 3, 1], [None, *progs, progs[0]]
    n_sched = [3, 6, 5, 2, 4]
    T = sum(n_sched)
    torch.manual_seed(1)
    h, r = torch.randn(T, D, dtype=torch.float64), torch.randn(T, D, dtype=torch.float64)
    x0 = (h + r).numpy().copy()
    outs = forward(rt, req_slots, n_sched, h, r)
    t, fired = 0, set()
    for prog, n in zip(req_prog, n_sched):
        for _ in range(n):
            want = [x0[t]] * L if prog is None else reference(prog.program, x0[t])
            for layer in range(L):
                np.testing.assert_allclose(outs[layer][t].numpy(), want[layer], rtol=1e-6, atol=1e-6)
            if prog is not None and prog is not progs[2]:
                fired.add(bool(rt.gates[t, 1]))
            t += 1
    assert fired == {True, False}  # the random streams hit both sides of the conditions


def strip_conditions(program: SteeringProgram) -> SteeringProgram:
    """The same tables with every entry unconditioned (today's arithmetic)."""
    out = SteeringProgram.from_wire(program.to_wire())
    out.conditions = []
    for lp in out.layers.values():
        lp.cond = [0] * lp.num_entries
    return out


@pytest.mark.parametrize("host_gating", [True, False])
def test_unconditioned_requests_are_unaffected_in_float32(host_gating):
    """Tokens of unconditioned programs (and unsteered ones) in a batch with conditioned programs
    equal the same batch where nothing is conditioned (no gate is multiplied): unsteered tokens
    bit for bit; an unconditioned slot's to float32 rounding, since with the feature bank
    (#30) its activations come from one product over every used bank row, conditions' rows
    included, whose width changes how BLAS blocks it (measured: one element 1.9e-6 apart on
    one CPU, bit-equal on another)."""
    progs = conditioned_programs(compiler())
    torch.manual_seed(2)
    h, r = torch.randn(9, D), torch.randn(9, D)
    req_slots, n_sched = [0, 3, 1, 2], [2, 3, 2, 2]
    runs = []
    for strip in (False, True):
        rt = make_runtime(host_gating, dtype=torch.float32)
        for slot, p in enumerate(progs, start=1):
            rt.write_slot(slot, strip_conditions(p.program) if strip else p.program)
        if strip and host_gating:
            assert not rt.slot_gated.any()
        hh = h.clone()
        forward(rt, req_slots, n_sched, hh, r)
        runs.append(hh)
    assert torch.equal(runs[0][:2], runs[1][:2])  # slot 0: unsteered
    torch.testing.assert_close(runs[0][2:5], runs[1][2:5], rtol=1e-6, atol=1e-5)  # slot 3
    assert (runs[0][5:] - runs[1][5:]).abs().max() > 1e-2  # the conditioned ones did change


@pytest.mark.parametrize("threshold,expect", [(1e4, "none"), (-1e4, "always")])
def test_never_and_always_conditions_equal_no_steering_and_the_unconditioned_entry(threshold, expect):
    c = compiler()
    cond = {"feature": "dir0", "above": threshold}
    gated = c.compile({"features": {"dir1": {"strength": 1.0, "when": cond},
                                    "dir2": {"strength": 3.0, "mode": "clamp", "when": cond}}})
    plain = c.compile({"features": {"dir1": 1.0, "dir2": {"strength": 3.0, "mode": "clamp"}}})
    torch.manual_seed(3)
    h, r = torch.randn(6, D), torch.randn(6, D)
    got = make_runtime(dtype=torch.float32)
    got.write_slot(1, gated.program)
    h_got = h.clone()
    forward(got, [1], [6], h_got, r)
    if expect == "none":
        assert torch.equal(h_got, h)
        return
    ref = make_runtime(dtype=torch.float32)
    ref.write_slot(1, plain.program)
    h_ref = h.clone()
    forward(ref, [1], [6], h_ref, r)
    torch.testing.assert_close(h_got, h_ref, rtol=1e-5, atol=1e-5)


def test_a_rewritten_slot_forgets_its_conditions():
    c = compiler()
    rt = make_runtime()
    rt.write_slot(1, conditioned_programs(c)[0].program)
    plain = c.compile({"features": {"dir1": {"strength": 1.5, "mode": "clamp"}}})
    rt.write_slot(1, plain.program)
    for tab in rt.tables.values():
        assert not tab.csign[1].any() and not tab.cond[1].any()
    assert not rt.slot_conds[1].any() and not rt.slot_gated[1].any()


def test_conditions_travel_on_the_wire_and_change_the_hash():
    c = compiler()
    p = conditioned_programs(c)[0]
    back = SteeringProgram.from_wire(p.wire().program)
    assert back.table_hash() == p.program.table_hash()
    assert [x.key() for x in back.conditions] == [x.key() for x in p.program.conditions]
    other = c.compile({"features": {"dir1": {"strength": 1.5, "mode": "clamp",
                                             "when": {"feature": "dir0", "above": 0.5}}},
                       "vectors": [{"layer": 2, "values": V.tolist(), "scale": 0.5,
                                    "when": {"feature": "sae1", "below": 0.5}}]})
    assert other.table_hash != p.table_hash and other.cache_salt != p.cache_salt


@pytest.mark.parametrize("steering,param", [
    ({"features": {"dir0": {"strength": 1, "when": {"feature": "dir2", "above": 1}}}},
     "steering.features.dir0.when.feature"),
    ({"features": {"dir1": {"strength": 1, "when": {"feature": "nope", "above": 1}}}},
     "steering.features.dir1.when.feature"),
    ({"features": {"dir1": {"strength": 1, "when": {"feature": "dir0", "above": 1, "below": 2}}}},
     "steering.features.dir1.when"),
    ({"features": {"dir1": {"strength": 1, "when": {"feature": "dir0", "above": 1e9}}}},
     "steering.features.dir1.when.above"),
    ({"vectors": [{"layer": 0, "values": V.tolist(), "when": {"feature": "dir1", "below": 0}}]},
     "steering.vectors[0].when.feature"),
    ({"monitors": [{"feature": "dir1", "above": 1, "action": "shout"}]}, "steering.monitors[0].action"),
    ({"monitors": [{"feature": "dir1"}]}, "steering.monitors[0]"),
    ({"monitors": [{"feature": "zzz", "above": 1}]}, "steering.monitors[0].feature"),
    ({"monitors": [{"feature": "dir1", "above": 1}] * (MAX_MONITORS + 1)}, "steering.monitors"),
])
def test_invalid_conditions_and_monitors_name_their_field(steering, param):
    with pytest.raises(SteeringError) as e:
        compiler().compile(steering)
    assert e.value.param == param, e.value.message


def test_too_many_distinct_conditions_are_refused():
    feats = {f"dir{i % 2}": None for i in range(2)}
    assert feats
    vectors = [{"layer": 2, "values": V.tolist(), "when": {"feature": "dir0", "above": float(i)}}
               for i in range(MAX_CONDITIONS + 1)]
    c = SteeringCompiler(SteeringConfig(max_slots=S, max_features=8), D, L, FEATS)
    with pytest.raises(SteeringError, match="distinct conditions"):
        c.compile({"vectors": vectors})


def monitored_wire(c, monitors, key="cmpl-1"):
    compiled = c.compile({"monitors": monitors})
    assert compiled is not None and not compiled.program.layers and compiled.cache_salt is None
    return compiled, compiled.wire(readout_key=key)


def test_monitors_read_generated_tokens_after_the_op_and_stop_by_eos():
    c = compiler()
    compiled, wire = monitored_wire(c, [{"feature": "dir1", "above": 0.5, "action": "stop"},
                                        {"feature": "dir2", "below": -1e4}])
    rt = make_runtime()
    rs = rt.admit("req-a", wire)
    assert rs.slot == 0 and rs.monitor is not None
    rs.monitor.eos = 5
    unit = FEATS.resolve("dir1").unit_direction()
    # a decode step: request row 1 holds generated token 3 (prompt 10, 13 computed)
    h = torch.zeros(2, D, dtype=torch.float64)
    r = torch.zeros(2, D, dtype=torch.float64)
    r[1] = torch.from_numpy(unit * 2.0)  # act(dir1) = 2 > 0.5
    r[0] = torch.from_numpy(unit * 9.0)  # another request's token: never read
    rt.begin_step(np.array([0, 0]), np.zeros(2, np.int64), np.array([1, 1]), np.array([4, 13]),
                  np.array([3, 10]), [], [(1, rs.monitor)])
    set_runtime(rt)
    try:
        for layer in range(L):
            torch.ops.steering.steer_(h, r, layer)
    finally:
        set_runtime(None)
        rt.end_step()
    assert rt.monitor_step.stop_rows == {1: 5}
    logits = torch.randn(2, 8)
    before = logits[0].clone()
    rt.monitor_step.force_stops(logits)
    assert torch.equal(logits[0], before)
    assert logits[1].argmax().item() == 5 and torch.isinf(logits[1]).sum().item() == 7
    report = rt.monitors.events(["cmpl-1"], final=False)["cmpl-1"]
    assert report[0] == {"fired": True, "first_token": 3, "peak": pytest.approx(2.0)}
    assert report[1]["fired"] is False and report[1]["first_token"] is None
    summary = compiled.monitor_report(report)
    assert summary[0]["action"] == "stop" and summary[0]["feature"] == "f/dir1"
    assert rt.monitors.events(["cmpl-1"], final=True) and not rt.monitors.events(["cmpl-1"], True)


def test_prompt_tokens_are_not_monitored_and_unmonitored_steps_read_nothing():
    c = compiler()
    _, wire = monitored_wire(c, [{"feature": "dir1", "above": 0.5}])
    rt = make_runtime()
    rs = rt.admit("req-b", wire)
    unit = torch.from_numpy(FEATS.resolve("dir1").unit_direction())
    h, r = torch.zeros(4, D, dtype=torch.float64), (unit * 3.0).repeat(4, 1)
    # a prefill chunk of 4 prompt tokens (prompt 10): nothing is read
    rt.begin_step(np.array([0]), np.zeros(1, np.int64), np.array([4]), np.array([0]), np.array([10]),
                  [], [(0, rs.monitor)])
    assert not rt.site_monitor.any()
    rt.end_step()
    # the last 2 prompt tokens and the first 2 generated ones (a recompute): generated 0 and 1
    rt.begin_step(np.array([0]), np.zeros(1, np.int64), np.array([4]), np.array([8]), np.array([10]),
                  [], [(0, rs.monitor)])
    set_runtime(rt)
    try:
        torch.ops.steering.steer_(h, r, 1)
    finally:
        set_runtime(None)
        rt.end_step()
    assert rt.monitors.events(["cmpl-1"], False)["cmpl-1"][0]["first_token"] == 0


def test_without_host_gating_monitors_are_not_seated_so_the_server_fails_them():
    """Under CUDA-graph replay the op's Python does not run each step: a worker keeps no report
    (the API server then fails the request, never reports it as quiet)."""
    _, wire = monitored_wire(compiler(), [{"feature": "dir1", "above": 0.5}], key="cmpl-g")
    rt = make_runtime(host_gating=False)
    rs = rt.admit("req-g", wire)
    assert rs.monitor is None and rt.monitors.events(["cmpl-g"], final=True) == {}
