"""Engine-free checks of the plugin's model surgery and engine arguments."""

import pytest
import torch

from steering.config import SteeringConfig
from steering.vllm_shim import UnsupportedModelError, engine_kwargs, install_on_model


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


def test_unsupported_layer_type_is_refused_at_start():
    class GPT2Block(torch.nn.Module):
        def forward(self, x):
            return x

    with pytest.raises(UnsupportedModelError, match="GPT2Block"):
        install_on_model(Model(GPT2Block), SteeringConfig())


def test_model_without_decoder_layers_is_refused():
    with pytest.raises(UnsupportedModelError, match="cannot find decoder layers"):
        install_on_model(torch.nn.Linear(2, 2), SteeringConfig())


def test_engine_kwargs_carry_the_config():
    kw = engine_kwargs(SteeringConfig(max_slots=3, max_features=5, layers=[4, 1]))
    assert kw["worker_cls"] == "steering.vllm_shim.SteeringCPUWorker"
    assert kw["additional_config"]["steering"]["max_slots"] == 3
    assert kw["additional_config"]["steering"]["layers"] == [1, 4]
    assert SteeringConfig.from_dict(kw["additional_config"]["steering"]).max_features == 5
