"""Steering sites in vLLM's model code: where ``blocks.L.hook_resid_post`` is, per family.

``blocks.L.hook_resid_post`` is the residual stream after decoder layer L — what transformers'
decoder layer L returns. vLLM's model code exposes it in one of two ways, and this module finds
which from what each layer returns, not from a list of layer classes:

* **a pair** ``(hidden, residual)`` (Llama, Mistral, Qwen2/3, Qwen3-MoE, Mixtral, Phi-3, Gemma 2/3,
  and most of vLLM's own model code): the layer leaves the last residual add to the next layer's
  input norm (or the final norm), fused as ``norm(hidden, residual)``, so the stream is
  ``hidden + residual``. Gemma's extra post-attention / post-feedforward norms are applied to
  ``hidden`` inside the layer, before it returns, and MoE blocks are the layer's MLP: neither moves
  the site. The op reads ``hidden + residual`` and adds its delta to ``hidden`` only, so the
  fused add that follows carries it into the stream exactly once.
* **one tensor** (Granite, whose residual multiplier is applied inside the layer; the Transformers
  modeling backend, e.g. OLMo 2, whose layers are transformers' own): the output *is* the stream,
  and the op adds its delta to it in place (``residual`` is None).

Embedding scaling (Gemma's √d, Granite's ``embedding_multiplier``) happens before layer 0 and the
final norm after the last layer, so neither changes what layer L's output is.

The decoder layers are the model's ``ModuleList`` of ``num_hidden_layers`` modules (the usual
attribute paths first, else the one nearest the model's root); layers another pipeline stage owns
are ``PPMissingLayer`` placeholders and are skipped. Refused, with the reason, at start-up (the
check runs on the layer's first call, which is vLLM's profiling run, before any request): a model
with no such list, and a layer whose output is not one of the two shapes above with a last
dimension of ``hidden_size``. A stream shaped [1, T, d] (the Transformers backend runs
transformers' layers on a batch of one) is steered through a [T, d] view of it.
"""

from __future__ import annotations

import types
from typing import Any

import torch

from steering.config import SteeringConfig

LAYER_LIST_PATHS = ("model.layers", "language_model.model.layers", "model.language_model.layers")
"""Where vLLM's text models, and its multimodal wrappers' language models, keep their layers."""
PIPELINE_PLACEHOLDER = "PPMissingLayer"
"""vLLM's stand-in for a layer that another pipeline stage runs."""


class UnsupportedModelError(RuntimeError):
    """Steering was asked of a model whose decoder layers we cannot steer."""


def _attr_path(obj: Any, path: str) -> Any:
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def decoder_layers(model: torch.nn.Module, num_layers: int | None = None) -> torch.nn.ModuleList:
    """The decoder-layer list of ``model``: a usual path, else the ``ModuleList`` of
    ``num_layers`` modules nearest the root. UnsupportedModelError when there is none."""
    for path in LAYER_LIST_PATHS:
        obj = _attr_path(model, path)
        if isinstance(obj, torch.nn.ModuleList) and (num_layers is None or len(obj) == num_layers):
            return obj
    if num_layers is not None:
        found = [(name.count("."), name, m) for name, m in model.named_modules()
                 if isinstance(m, torch.nn.ModuleList) and len(m) == num_layers]
        if found:
            return min(found, key=lambda f: (f[0], f[1]))[2]
    want = f" of {num_layers} layers" if num_layers is not None else ""
    raise UnsupportedModelError(
        f"steering: cannot find decoder layers{want} in {type(model).__name__} (looked for a "
        f"ModuleList at {', '.join(LAYER_LIST_PATHS)} or anywhere below the model); start with "
        f"--no-steering"
    )


def _refuse(layer: torch.nn.Module, index: int, what: str) -> UnsupportedModelError:
    return UnsupportedModelError(
        f"steering: decoder layer {index} ({type(layer).__name__}) returns {what}, not the "
        f"residual stream as one [tokens, hidden_size] tensor or a (hidden, residual) pair of "
        f"them; this model cannot be steered, start with --no-steering"
    )


def _describe(out: Any) -> str:
    if isinstance(out, torch.Tensor):
        return f"a tensor of shape {tuple(out.shape)}"
    if isinstance(out, (tuple, list)):
        return f"a {type(out).__name__} of ({', '.join(_describe(o) for o in out)})"
    return type(out).__name__


def wrap_layer(layer: torch.nn.Module, index: int, hidden_size: int | None = None) -> None:
    """Make ``layer`` end in ``steering::steer_`` on its output stream (see the module docstring).

    Semantics: pair output → steer_(hidden, residual); one tensor (or a tuple led by one, as
    transformers' layers may return) → steer_(stream, None); anything else is refused."""
    inner = layer.forward

    def stream_shaped(t: Any) -> bool:
        return isinstance(t, torch.Tensor) and t.dim() >= 2 and (
            hidden_size is None or t.shape[-1] == hidden_size)

    def tokens(t: torch.Tensor) -> torch.Tensor:
        # [T, d]: the Transformers backend runs transformers' layers on [1, T, d]; a view, so
        # the op's in-place write lands in the layer's output
        return t if t.dim() == 2 else t.view(-1, t.shape[-1])

    def forward(self, *args, **kwargs):
        out = inner(*args, **kwargs)
        if isinstance(out, torch.Tensor):
            if not stream_shaped(out):
                raise _refuse(self, index, _describe(out))
            torch.ops.steering.steer_(tokens(out), None, index)
            return out
        if isinstance(out, tuple) and out and stream_shaped(out[0]):
            hidden = out[0]
            if len(out) == 2 and isinstance(out[1], torch.Tensor):
                if out[1].shape != hidden.shape:
                    raise _refuse(self, index, _describe(out))
                torch.ops.steering.steer_(tokens(hidden), tokens(out[1]), index)  # hidden + residual
            else:
                torch.ops.steering.steer_(tokens(hidden), None, index)  # (stream, extras…)
            return out
        raise _refuse(self, index, _describe(out))

    layer.forward = types.MethodType(forward, layer)


def install_on_model(model: torch.nn.Module, cfg: SteeringConfig, num_layers: int | None = None,
                     hidden_size: int | None = None) -> list[int]:
    """Wrap the steered decoder layers of ``model`` (``cfg.layers``, those this pipeline stage
    runs); returns the indices wrapped on this rank."""
    found = decoder_layers(model, num_layers)
    wrapped = []
    for i in cfg.steered_layers(len(found)):
        layer = found[i]
        if type(layer).__name__ == PIPELINE_PLACEHOLDER:
            continue  # another pipeline stage owns it
        wrap_layer(layer, i, hidden_size)
        wrapped.append(i)
    return wrapped
