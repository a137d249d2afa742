"""The vLLM shim: the one module that reaches into vLLM's internals (no fork, no edits to vLLM).

Public extension points:
* ``worker_cls`` (an engine argument): :class:`SteeringCPUWorker` / :class:`SteeringGPUWorker`
  subclass vLLM's workers.
* ``additional_config["steering"]`` carries :class:`SteeringConfig` to the workers; it is part of
  vLLM's config hash, so compiled graphs with and without steering are cached apart.
* ``vllm.general_plugins`` entry point :func:`register` loads the custom op in every process.

Private ones (this is why it is a shim, and why vLLM is pinned):
* after the model loads (and before vLLM traces and compiles it), each steered decoder layer's
  ``forward`` is wrapped so it ends in the custom op ``steering::steer_``;
* the model runner instance's ``execute_model`` and ``_prepare_inputs`` are replaced by wrappers
  that release finished requests and fill the per-token slot index (:func:`_hook_runner`); they
  read ``runner.input_batch``, ``runner.requests`` and ``num_computed_tokens_cpu``.

Requests carry their compiled program as a :class:`steering.wire.WireRecord` in
``SamplingParams.extra_args["steering"]``.

Nothing a request carries may stop the engine: an exception in a worker's step kills the engine
core, and vLLM's V1 model runner cannot finish or fail one request from inside a step (requests
end only by the scheduler's stop checks or an abort; ``FINISHED_ERROR`` is reserved to the
scheduler's own grammar and KV-transfer failures). So a request the worker cannot seat — no free
slot although the gate admitted it, a malformed record, a program that cannot be written — runs
on slot 0 and is recorded as unseated (:meth:`steering.runtime.SteeringRuntime.refuse`); the API
server, which knows which of its requests are steered, collects those ids once after each steered
generation (``steering_take_unseated``) and fails that response (503 ``steering_unavailable``, or
an error event before ``[DONE]`` in a stream). See :mod:`steering.slots`.

Collective RPCs for the API server: ``steering_readout`` (pop a readout), ``steering_drop_readout``
(free it unread), ``steering_take_unseated`` and ``steering_stats``.
Supported: the V1 model runner (vLLM's default on CPU). Model Runner V2 is refused at start-up.
"""

from __future__ import annotations

import logging
import os
import types
from typing import Any

import numpy as np
import torch

from steering.config import SteeringConfig
from steering.runtime import SteeringRuntime, get_runtime, set_runtime
from steering.wire import WireError, WireRecord

logger = logging.getLogger(__name__)

ADDITIONAL_CONFIG_KEY = "steering"
SUPPORTED_LAYER_CLASSES = {
    "LlamaDecoderLayer",
    "MistralDecoderLayer",
    "Qwen2DecoderLayer",
    "Qwen3DecoderLayer",
}


class UnsupportedModelError(RuntimeError):
    """Steering was asked of a model whose decoder layers we cannot steer."""


def register() -> None:
    """vLLM general-plugin entry point: make sure the op is registered in this process."""
    import steering.runtime  # noqa: F401


def engine_kwargs(cfg: SteeringConfig) -> dict[str, Any]:
    """Extra AsyncEngineArgs that enable steering with ``cfg``."""
    from vllm.platforms import current_platform

    # The V1 runner is where we hook input preparation; force it where V2 is the default.
    os.environ.setdefault("VLLM_USE_V2_MODEL_RUNNER", "0")
    worker = "SteeringCPUWorker" if current_platform.is_cpu() else "SteeringGPUWorker"
    return {
        "worker_cls": f"steering.vllm_shim.{worker}",
        "additional_config": {ADDITIONAL_CONFIG_KEY: cfg.to_dict()},
    }


# -- model surgery ---------------------------------------------------------------------------
def _decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    for path in ("model.layers", "language_model.model.layers", "model.language_model.layers"):
        obj: Any = model
        for part in path.split("."):
            obj = getattr(obj, part, None)
            if obj is None:
                break
        if isinstance(obj, torch.nn.ModuleList):
            return obj
    raise UnsupportedModelError(
        f"steering: cannot find decoder layers in {type(model).__name__}; supported layer "
        f"types: {sorted(SUPPORTED_LAYER_CLASSES)}"
    )


def _wrap_layer(layer: torch.nn.Module, index: int) -> None:
    inner = layer.forward

    def forward(self, *args, **kwargs):
        hidden, residual = inner(*args, **kwargs)
        torch.ops.steering.steer_(hidden, residual, index)
        return hidden, residual

    layer.forward = types.MethodType(forward, layer)


def install_on_model(model: torch.nn.Module, cfg: SteeringConfig) -> list[int]:
    """Wrap the steered decoder layers of ``model``; returns the layers wrapped on this rank."""
    layers = _decoder_layers(model)
    wrapped = []
    for i in cfg.steered_layers(len(layers)):
        layer = layers[i]
        name = type(layer).__name__
        if name == "PPMissingLayer":
            continue  # another pipeline stage owns it
        if name not in SUPPORTED_LAYER_CLASSES:
            raise UnsupportedModelError(
                f"steering: decoder layer type {name} is not supported (supported: "
                f"{sorted(SUPPORTED_LAYER_CLASSES)}); start with --no-steering"
            )
        _wrap_layer(layer, i)
        wrapped.append(i)
    return wrapped


# -- the worker mixin ------------------------------------------------------------------------
class _SteeringWorkerMixin:
    """Installs steering after the model loads; per step fills the slot index."""

    def load_model(self, *args, **kwargs):  # type: ignore[override]
        out = super().load_model(*args, **kwargs)
        self._install_steering()
        return out

    def _install_steering(self) -> None:
        vcfg = self.vllm_config
        extra = (vcfg.additional_config or {}).get(ADDITIONAL_CONFIG_KEY)
        if extra is None:
            return
        if getattr(self, "use_v2_model_runner", False):
            raise RuntimeError(
                "steering: vLLM Model Runner V2 is not supported; set VLLM_USE_V2_MODEL_RUNNER=0"
            )
        cfg = SteeringConfig.from_dict(extra)
        runner = self.model_runner
        model = runner.get_model()
        hf = vcfg.model_config.hf_text_config
        num_layers = int(hf.num_hidden_layers)
        # Host-side gating (skip idle layers, slice to the slots in use) is only sound when
        # the op's Python runs every step, i.e. without CUDA-graph replay.
        cudagraphs = runner.device.type == "cuda" and not vcfg.model_config.enforce_eager
        max_tokens = max(
            int(getattr(runner, "max_num_tokens", 0)),
            int(vcfg.scheduler_config.max_num_batched_tokens),
        ) + 1024
        rt = SteeringRuntime(
            cfg,
            num_layers=num_layers,
            hidden_size=int(hf.hidden_size),
            max_tokens=max_tokens,
            dtype=vcfg.model_config.dtype,
            device=runner.device,
            host_gating=not cudagraphs,
        )
        set_runtime(rt)
        wrapped = install_on_model(model, cfg)
        _hook_runner(runner, rt)
        logger.info(
            "steering: %d slots × %d features on layers %s (host gating %s)",
            cfg.max_slots, cfg.max_features, wrapped, rt.host_gating,
        )

    # Callable from the API server through collective_rpc.
    def steering_readout(self, key: str):
        rt = get_runtime()
        return None if rt is None else rt.pop_readout(key)

    def steering_drop_readout(self, key: str) -> int:
        """Free the readout filed under ``key`` unread (its request ended or was aborted)."""
        rt = get_runtime()
        return 0 if rt is None else rt.drop_readout(key)

    def steering_take_unseated(self, keys: list[str]) -> list[str]:
        """Those of ``keys`` (API request ids) this worker ran unsteered because it could not
        seat them (see the module docstring)."""
        rt = get_runtime()
        return [] if rt is None else rt.take_unseated(keys)

    def steering_stats(self) -> dict[str, int]:
        rt = get_runtime()
        if rt is None:
            return {"busy_slots": 0, "requests": 0, "readouts": 0, "readout_bytes": 0,
                    "unseated_total": 0}
        return {"busy_slots": rt.allocator.busy, "requests": rt.allocator.active_requests,
                "readouts": len(rt.readouts), "readout_bytes": rt.readout_bytes,
                "unseated_total": rt.unseated_total}


def _hook_runner(runner, rt: SteeringRuntime) -> None:
    """Wrap this runner instance's execute_model and _prepare_inputs (instance attributes)."""
    orig_execute = runner.execute_model
    orig_prepare = runner._prepare_inputs

    def execute_model(scheduler_output, *args, **kwargs):
        # Release first: a step that schedules no tokens still reports finished/aborted ids.
        rt.release(scheduler_output.finished_req_ids)
        try:
            return orig_execute(scheduler_output, *args, **kwargs)
        finally:
            rt.end_step()

    def _prepare_inputs(scheduler_output, num_scheduled_tokens, *args, **kwargs):
        out = orig_prepare(scheduler_output, num_scheduled_tokens, *args, **kwargs)
        batch = runner.input_batch
        num_reqs = batch.num_reqs
        req_slots = np.zeros(num_reqs, dtype=np.int64)
        apply_to = np.zeros(num_reqs, dtype=np.int64)
        num_prompt = np.zeros(num_reqs, dtype=np.int64)
        readout: list[tuple[int, str]] = []
        for i, rid in enumerate(batch.req_ids[:num_reqs]):
            rs = rt.requests.get(rid)
            state = runner.requests[rid]
            if rs is None:
                rs = _seat(rt, rid, state.sampling_params)
                if rs is None:
                    continue
            req_slots[i] = rs.slot
            apply_to[i] = rs.apply_to
            num_prompt[i] = state.num_prompt_tokens
            if rs.readout_key is not None:
                readout.append((i, rs))
        rt.begin_step(
            req_slots,
            apply_to,
            np.asarray(num_scheduled_tokens[:num_reqs], dtype=np.int64),
            batch.num_computed_tokens_cpu[:num_reqs].astype(np.int64),
            num_prompt,
            readout,
        )
        return out

    runner.execute_model = execute_model
    runner._prepare_inputs = _prepare_inputs


def _seat(rt: SteeringRuntime, rid: str, sp):
    """``rid``'s steering state on its first step, None when it is unsteered; whatever goes wrong
    fails this request (runs on slot 0, reported to the API server), never the step."""
    try:
        wire = WireRecord.from_extra_args(sp.extra_args) if sp is not None else None
    except WireError as exc:
        return rt.refuse(rid, str(exc))
    if wire is None:
        return None
    try:
        return rt.admit(rid, wire)
    except Exception as exc:  # noqa: BLE001  (one request's problem must not stop the engine)
        logger.exception("steering: admitting %s failed", rid)
        return rt.refuse(rid, f"{type(exc).__name__}: {exc}", wire)


def _worker_base(kind: str):
    if kind == "cpu":
        from vllm.v1.worker.cpu_worker import CPUWorker

        return CPUWorker
    from vllm.v1.worker.gpu_worker import Worker

    return Worker


_WORKERS = {"SteeringCPUWorker": "cpu", "SteeringGPUWorker": "gpu"}


def __getattr__(name: str):
    # Worker classes are built on first use: importing vLLM's workers is slow and
    # platform-specific, and the API server only needs engine_kwargs().
    if name in _WORKERS:
        cls = type(name, (_SteeringWorkerMixin, _worker_base(_WORKERS[name])), {
            "__doc__": f"vLLM's {_WORKERS[name].upper()} worker with steering installed.",
            "__module__": __name__,
        })
        globals()[name] = cls
        return cls
    raise AttributeError(name)
