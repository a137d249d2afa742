"""Engine-free checks of the plugin's model surgery and engine arguments."""

import pytest
import torch

from steering.config import SteeringConfig
from steering.worker.vllm_shim import UnsupportedModelError, engine_kwargs, install_on_model


class LlamaDecoderLayer(torch.nn.Module):  # same name as vLLM's: what the plugin checks
    def forward(self, positions, hidden, residual):
        return hidden * 2, residual


class Model(torch.nn.Module):
    def __init__(self, layer_cls, n=3):
        super().__init__()
        self.model = torch.nn.Module()
        self.model.layers = torch.nn.ModuleList(layer_cls() for _ in range(n))


def test_wraps_only_the_steered_layers_and_keeps_outputs():
    m = Model(LlamaDecoderLayer)
    assert install_on_model(m, SteeringConfig(layers=[0, 2])) == [0, 2]
    h, r = torch.ones(2, 4), torch.zeros(2, 4)
    # no runtime installed in this process: the op is the identity
    out_h, out_r = m.model.layers[0](None, h, r)
    assert torch.equal(out_h, 2 * h) and out_r is r
    assert "forward" in vars(m.model.layers[0]) and "forward" not in vars(m.model.layers[1])


def test_layer_without_a_residual_stream_is_refused_at_its_first_call():
    class GPT2Block(torch.nn.Module):  # any class is wrapped; its output decides (steering.worker.sites)
        def forward(self, x):
            return {"hidden": x}

    m = Model(GPT2Block)
    install_on_model(m, SteeringConfig(), hidden_size=4)
    with pytest.raises(UnsupportedModelError, match="GPT2Block"):
        m.model.layers[0](torch.ones(2, 4))


def test_model_without_decoder_layers_is_refused():
    with pytest.raises(UnsupportedModelError, match="cannot find decoder layers"):
        install_on_model(torch.nn.Linear(2, 2), SteeringConfig())


def test_engine_kwargs_carry_the_config():
    kw = engine_kwargs(SteeringConfig(max_slots=3, max_features=5, layers=[4, 1]))
    assert kw["worker_cls"] == "steering.vllm_shim.SteeringCPUWorker"
    assert kw["additional_config"]["steering"]["max_slots"] == 3
    assert kw["additional_config"]["steering"]["layers"] == [1, 4]
    assert SteeringConfig.from_dict(kw["additional_config"]["steering"]).max_features == 5


# -- the stock vLLM server path: the worker compiles a JSON steering string -------------------
import base64 as _base64  # noqa: E402
import json as _json  # noqa: E402
from types import SimpleNamespace  # noqa: E402

import numpy as _np  # noqa: E402

from steering.config import SteeringConfig as _Cfg  # noqa: E402
from steering.worker.runtime import SteeringRuntime  # noqa: E402
from steering.spec import SteeringError  # noqa: E402
from steering.worker.vllm_shim import SpecCompiler, _seat, build_compiler, parse_spec_string  # noqa: E402
from steering.wire import WireRecord  # noqa: E402


def test_config_packs_round_trip_and_default_empty():
    cfg = _Cfg(max_slots=2, layers=[3, 1], packs=["bundled", "/srv/packs"])
    assert _Cfg.from_dict(cfg.to_dict()) == cfg
    assert _Cfg().packs == [] and _Cfg.from_dict(_Cfg().to_dict()).packs == []
    assert engine_kwargs(_Cfg())["additional_config"]["steering"]["packs"] == []
    with pytest.raises(ValueError, match="packs"):
        _Cfg(packs="bundled")


@pytest.fixture(scope="module")
def bundled():
    """The worker's compiler (packs "bundled") and steer serve's (server.engine.load_packs)."""
    from server.config import ServeConfig
    from server.engine import load_packs
    from steering.model_store import resolve_model
    from steering.request import SteeringCompiler

    model = resolve_model(None)
    cfg = _Cfg(packs=["bundled"])
    worker = build_compiler(cfg, 576, 30, str(model))
    serve_cfg = ServeConfig(dtype="float32").steering_config()
    serve = SteeringCompiler(serve_cfg, hidden_size=576, num_layers=30,
                             feature_source=load_packs(ServeConfig(), model))
    return worker, serve


def _spec_cases():
    v = _np.random.default_rng(3).standard_normal(576).astype(_np.float32)
    b64 = _base64.b64encode(v.astype("<f4").tobytes()).decode()
    return [
        {"features": {"pirate": 1.0}},
        {"features": {"smollm2-tone/formality": {"strength": 0.5, "mode": "clamp"}},
         "apply_to": "generated"},
        {"features": {"golden_gate": {"mode": "ablate"}}, "apply_to": "prompt"},
        {"features": {"enthusiasm": {"strength": 2.0, "mode": "scale"}}},
        {"vectors": [{"layer": 10, "values": v.tolist(), "scale": 0.5}]},
        {"vectors": [{"layer": 12, "base64": b64, "mode": "clamp", "target": 3.0},
                     {"layer": 4, "base64": b64, "mode": "ablate"}],
         "features": {"humor": 0.7}},
    ]


@pytest.mark.parametrize("spec", _spec_cases())
def test_worker_compiles_the_same_record_as_steer_serve(bundled, spec):
    worker, serve = bundled
    mine = SpecCompiler(worker).wire(_json.dumps(spec))
    theirs = serve.compile(spec)
    assert mine is not None and mine.hash == theirs.table_hash
    assert mine.to_extra_args() == theirs.wire(readout_key="chatcmpl-x").to_extra_args()


def test_spec_compiler_caches_and_refuses(bundled):
    specs = SpecCompiler(bundled[0], cache_size=2)
    text = _json.dumps({"features": {"pirate": 1.0}})
    assert specs.wire(text) is specs.wire(text)
    assert specs.wire("{}") is None and specs.wire('{"features": {}}') is None
    for bad, param in [
        ("{not json", "steering"),
        ("[1, 2]", "steering"),
        (_json.dumps({"features": {"nope": 1.0}}), "steering.features.nope"),
        (_json.dumps({"vectors": [{"layer": 1, "values": [1.0] * 3}]}), "steering.vectors[0].values"),
        (_json.dumps({"features": {"pirate": {"strength": 1, "mode": "twist"}}}),
         "steering.features.pirate.mode"),
        (_json.dumps({"experiment": "ab"}), "steering.experiment"),
        (_json.dumps({"features": {"pirate": 1}, "return_activations": True}),
         "steering.return_activations"),
        (_json.dumps({"monitors": [{"feature": "pirate", "above": 1.0}]}), "steering.monitors"),
    ]:
        with pytest.raises(SteeringError) as err:
            specs.wire(bad)
        assert err.value.param == param, (bad, err.value.param)
    assert len(specs._cache) <= 2


def test_parse_spec_string_needs_a_string():
    with pytest.raises(SteeringError, match="string"):
        parse_spec_string({"features": {}})  # type: ignore[arg-type]


def _runtime(slots=2):
    return SteeringRuntime(_Cfg(max_slots=slots, max_features=4), num_layers=30, hidden_size=576,
                           max_tokens=64, dtype=torch.float32, device=torch.device("cpu"),
                           host_gating=True)


def test_seat_compiles_strings_and_refuses_bad_ones_without_raising(bundled):
    rt, specs = _runtime(), SpecCompiler(bundled[0])
    sp = lambda s: SimpleNamespace(extra_args={"steering": s})  # noqa: E731
    good = _seat(rt, "r1", sp(_json.dumps({"features": {"pirate": 1.0}})), specs)
    assert good is not None and good.slot == 1 and not good.unseated
    assert _seat(rt, "r0", sp("{}"), specs) is None  # asks for nothing: unsteered
    assert _seat(rt, "r2", SimpleNamespace(extra_args=None), specs) is None
    for i, bad in enumerate(["{oops", _json.dumps({"features": {"nope": 1}}), "[]"]):
        rs = _seat(rt, f"bad{i}", sp(bad), specs)
        assert rs.unseated and rs.slot == 0
    # a string reaching a worker without a compiler is refused too
    assert _seat(rt, "r3", sp("{}"), None).unseated
    assert rt.take_unseated(["bad0", "bad1", "bad2", "r3", "r1"]) == ["bad0", "bad1", "bad2", "r3"]
    # the dict (steer serve) path is unchanged
    wire = bundled[1].compile({"features": {"pirate": 1.0}}).wire()
    rs = _seat(rt, "r4", SimpleNamespace(extra_args=wire.to_extra_args()), specs)
    assert rs.slot == good.slot  # same program, same slot
    assert isinstance(WireRecord.from_extra_args(wire.to_extra_args()), WireRecord)
