"""The same steering semantics on a Hugging Face transformers model, through forward hooks.

This is the reference our vLLM op is tested against, and the "usual alternative" the benchmarks
compare with (transformers ``generate()`` plus a hook). One program applies to every row.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch

from steering.program import SteeringProgram


def _layer_delta_fn(program: SteeringProgram, layer: int, dtype, device):
    lp = program.layers[layer]
    add = lp.add_f32()
    add_t = None if add is None else torch.from_numpy(add).to(device=device, dtype=dtype)
    e = lp.entries_f32()
    enc = torch.from_numpy(e["enc"]).to(device=device, dtype=dtype)  # [K, d]
    dec = torch.from_numpy(e["dec"]).to(device=device, dtype=dtype)  # [K, d]
    bias, theta, alpha, beta = (
        torch.from_numpy(e[n]).to(device=device, dtype=dtype) for n in ("bias", "theta", "alpha", "beta")
    )
    rect = torch.from_numpy(e["rectify"].astype(bool)).to(device)

    def steer(x: torch.Tensor) -> torch.Tensor:  # x [..., d] → steered stream
        if add_t is not None:
            x = x + add_t
        if lp.num_entries:
            pre = x @ enc.T + bias  # [..., K]
            act = torch.where(rect & (pre <= theta), torch.zeros_like(pre), pre)
            x = x + (alpha * act + beta) @ dec
        return x

    return steer


HF_LAYER_PATHS = ("model.layers", "model.language_model.layers", "language_model.model.layers")
"""Where transformers' causal LMs keep their decoder layers (text models; multimodal wrappers
such as Gemma 3's ``Gemma3ForConditionalGeneration``)."""


def hf_decoder_layers(model) -> torch.nn.ModuleList:
    """The decoder layers of a transformers causal LM (their outputs are ``hook_resid_post``)."""
    for path in HF_LAYER_PATHS:
        obj = model
        for part in path.split("."):
            obj = getattr(obj, part, None)
        if isinstance(obj, torch.nn.ModuleList):
            return obj
    raise ValueError(f"no decoder layers at {', '.join(HF_LAYER_PATHS)} in {type(model).__name__}")


@contextmanager
def hf_steering(model, program: SteeringProgram, mask: torch.Tensor | None = None) -> Iterator[None]:
    """Steer ``model`` (a transformers causal LM) with ``program`` inside the block.

    ``mask`` (optional, [batch, seq] bool) limits steering to some positions of the first call.
    """
    layers = hf_decoder_layers(model)
    handles = []
    for layer in program.layers:
        fn = _layer_delta_fn(program, layer, model.dtype, model.device)

        def hook(_module, _inputs, output, fn=fn):
            hs = output[0] if isinstance(output, tuple) else output
            steered = fn(hs)
            if mask is not None and steered.shape[:2] == mask.shape:
                steered = torch.where(mask[..., None], steered, hs)
            return (steered, *output[1:]) if isinstance(output, tuple) else steered

        handles.append(layers[layer].register_forward_hook(hook))
    try:
        yield
    finally:
        for h in handles:
            h.remove()
