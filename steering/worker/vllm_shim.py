"""The vLLM shim: the one module that reaches into vLLM's internals (no fork, no edits to vLLM).

Public extension points:
* ``worker_cls`` (an engine argument): :class:`SteeringCPUWorker` / :class:`SteeringGPUWorker`
  subclass vLLM's workers.
* ``additional_config["steering"]`` carries :class:`SteeringConfig` to the workers; it is part of
  vLLM's config hash, so compiled graphs with and without steering are cached apart.
* ``vllm.general_plugins`` entry point :func:`register` loads the custom op in every process.

Private ones (this is why it is a shim, and why vLLM is pinned):
* after the model loads (and before vLLM traces and compiles it), each steered decoder layer's
  ``forward`` is wrapped so it ends in the custom op ``steering::steer_`` (:mod:`steering.worker.sites`
  finds the layers and the residual stream per family);
* the model runner instance's ``execute_model`` and ``_prepare_inputs`` are replaced by wrappers
  that release finished requests and fill the per-token slot index (:func:`_hook_runner`); they
  read ``runner.input_batch``, ``runner.requests`` and ``num_computed_tokens_cpu``;
* ``_sample`` (stop monitors) and ``_bookkeeping_sync``: on CPU, a seeded request whose sampled
  token is discarded (a prefill chunk that is not the last) gets its generator state restored,
  instead of vLLM's CUDA-only ``set_offset`` rewind, which raises on CPU and kills the engine.

Requests carry their compiled program as a :class:`steering.wire.WireRecord` in
``SamplingParams.extra_args["steering"]`` (``steer serve``), or, through stock ``vllm serve`` with
this worker class, the request's steering object as a JSON *string* (``vllm_xargs.steering``):
the worker then compiles it itself (:class:`SpecCompiler`, built at start from the configured
``packs``) into the very record ``steer serve`` would have sent — same program, same hash — and
seats that. The worker bounds raw vectors by the float32 limits only (it measures no residual
norms); the API-server middleware :mod:`server.vllm_plugin` validates first, with the norm bound,
sets the prefix-cache salt and holds the slot gate.

Nothing a request carries may stop the engine: an exception in a worker's step kills the engine
core, and vLLM's V1 model runner cannot finish or fail one request from inside a step (requests
end only by the scheduler's stop checks or an abort; ``FINISHED_ERROR`` is reserved to the
scheduler's own grammar and KV-transfer failures). So a request the worker cannot seat — no free
slot although the gate admitted it, a malformed record, a program that cannot be written — runs
on slot 0 and is recorded as unseated (:meth:`steering.worker.runtime.SteeringRuntime.refuse`); the API
server, which knows which of its requests are steered, collects those ids once after each steered
generation (``steering_take_unseated``) and fails that response (503 ``steering_unavailable``, or
an error event before ``[DONE]`` in a stream). See :mod:`steering.worker.slots`.

Collective RPCs for the API server: ``steering_readout`` (pop a readout), ``steering_drop_readout``
(free it unread), ``steering_take_unseated``, ``steering_monitor_events`` (monitor results) and
``steering_stats``.
Supported: the V1 model runner (vLLM's default on CPU). Model Runner V2 is refused at start-up.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import numpy as np
import torch

from steering.config import SteeringConfig
from steering.request import build_compiler  # the compiler of steer serve and the plugin too
from steering.worker.runtime import SteeringRuntime, get_runtime, set_runtime
from steering.worker.sites import UnsupportedModelError, install_on_model  # noqa: F401  (model surgery)
from steering.spec import SteeringError
from steering.wire import EXTRA_ARGS_KEY, WireError, WireRecord

logger = logging.getLogger(__name__)

ADDITIONAL_CONFIG_KEY = "steering"


def register() -> None:
    """vLLM general-plugin entry point: make sure the op is registered in this process."""
    import steering.worker.runtime  # noqa: F401


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


# -- compiling JSON steering in the worker (stock vLLM server) ------------------------------
SPEC_CACHE_SIZE = 64
"""Compiled steering strings a worker keeps (a repeated configuration is compiled once)."""


def parse_spec_string(text: str) -> dict[str, Any]:
    """The steering object inside ``vllm_xargs.steering`` (a JSON string); SteeringError when
    it is not one (param ``steering``)."""
    import json

    if not isinstance(text, str):
        raise SteeringError("steering must be a JSON object encoded as a string")
    try:
        obj = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise SteeringError(f"steering is not valid JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise SteeringError("steering must be a JSON object encoded as a string")
    if "experiment" in obj:
        raise SteeringError("experiments (and presets) are served by steer serve only, not "
                            "through vLLM's server", "steering.experiment",
                            "unsupported_parameter")
    if obj.get("monitors"):
        raise SteeringError("monitors are served by steer serve only: vLLM's server cannot report "
                            "them (or end a generation with content_filter)", "steering.monitors",
                            "unsupported_parameter")
    if obj.get("return_activations") is True:
        raise SteeringError("return_activations is served by steer serve only: vLLM's server "
                            "cannot return activations", "steering.return_activations",
                            "unsupported_parameter")
    return obj


class SpecCompiler:
    """Worker-side: a request's steering JSON string → the :class:`WireRecord` ``steer serve``
    would send for it (cached by content). SteeringError when it is invalid."""

    def __init__(self, compiler, cache_size: int = SPEC_CACHE_SIZE) -> None:
        from collections import OrderedDict

        self.compiler = compiler
        self.cache_size = cache_size
        self._cache: OrderedDict[bytes, WireRecord | None] = OrderedDict()

    def wire(self, text: str) -> WireRecord | None:
        """None when the steering asks for nothing."""
        import hashlib

        key = hashlib.sha256(text.encode("utf-8", "surrogatepass")).digest()
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        compiled = self.compiler.compile(parse_spec_string(text))
        wire = compiled.wire() if compiled is not None else None
        self._cache[key] = wire
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return wire


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
        cfg = SteeringConfig.from_dict(extra).for_batch(vcfg.scheduler_config.max_num_seqs)
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
        # Requests of stock vLLM's server carry their steering as a JSON string: compile those
        # here, with the configured packs (loaded before the model is traced: a bad pack stops
        # the start with its name and problem).
        model_dir = vcfg.model_config.model
        specs = SpecCompiler(build_compiler(
            cfg, int(hf.hidden_size), num_layers,
            model_dir if os.path.isdir(str(model_dir)) else None))
        set_runtime(rt)
        wrapped = install_on_model(model, cfg, num_layers, int(hf.hidden_size))
        _hook_runner(runner, rt, specs)
        logger.info(
            "steering: %d slots × %d features, a bank of %d rows per layer, on layers %s "
            "(host gating %s; packs %s)", cfg.max_slots, cfg.max_features, cfg.bank_features,
            wrapped, rt.host_gating, cfg.packs or "none",
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

    def steering_monitor_events(self, keys: list[str], final: bool = False):
        """Monitor results of ``keys`` (API request ids) known to this worker: {key: [per monitor
        {fired, first_token, peak}]}; ``final`` forgets them (the response is complete)."""
        rt = get_runtime()
        return {} if rt is None else rt.monitors.events(list(keys), bool(final))

    def steering_stats(self) -> dict[str, int]:
        rt = get_runtime()
        if rt is None:
            return {"busy_slots": 0, "requests": 0, "readouts": 0, "readout_bytes": 0,
                    "unseated_total": 0, "bank_rows_max": 0}
        return {"busy_slots": rt.allocator.busy, "requests": rt.allocator.active_requests,
                "readouts": len(rt.readouts), "readout_bytes": rt.readout_bytes,
                "unseated_total": rt.unseated_total,
                "bank_rows_max": max((b.used for b in rt.banks.values()), default=0)}


def _hook_runner(runner, rt: SteeringRuntime, specs: SpecCompiler | None = None) -> None:
    """Wrap this runner instance's execute_model and _prepare_inputs (instance attributes)."""
    orig_execute = runner.execute_model
    orig_prepare = runner._prepare_inputs
    orig_sample = runner._sample
    orig_bookkeeping = runner._bookkeeping_sync

    restored: dict[int, Any] = {}  # batch index → CPU generator _sample rewound this step

    def _sample(logits, *args, **kwargs):
        rt.monitor_step.force_stops(logits)  # a stop monitor fired: that request samples EOS
        saved = _discarded_cpu_generators(runner)
        out = orig_sample(logits, *args, **kwargs)
        restored.clear()
        for i, (gen, state) in saved.items():  # the discarded sample never happened (see below)
            gen.set_state(state)
            restored[i] = gen
        return out

    def _bookkeeping_sync(*args, **kwargs):
        # vLLM rewinds a discarded sample's seeded generator with ``set_offset(get_offset() - 4)``
        # (CUDA Philox offsets); a CPU generator has no offset and raises, which kills the engine
        # whenever a seeded request's prefill is split across steps (concurrent long prompts).
        # _sample restored those generators' states already: hide exactly them from that loop.
        if not restored:
            return orig_bookkeeping(*args, **kwargs)
        batch = runner.input_batch
        gens = batch.generators
        batch.generators = {i: g for i, g in gens.items() if i not in restored}
        try:
            return orig_bookkeeping(*args, **kwargs)
        finally:
            batch.generators = gens
            restored.clear()

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
        monitored: list[tuple[int, Any]] = []
        for i, rid in enumerate(batch.req_ids[:num_reqs]):
            rs = rt.requests.get(rid)
            state = runner.requests[rid]
            if rs is None:
                rs = _seat(rt, rid, state.sampling_params, specs)
                if rs is None:
                    continue
            req_slots[i] = rs.slot
            apply_to[i] = rs.apply_to
            num_prompt[i] = state.num_prompt_tokens
            if rs.readout_key is not None:
                readout.append((i, rs))
            if rs.monitor is not None:
                monitored.append((i, rs.monitor))
        rt.begin_step(
            req_slots,
            apply_to,
            np.asarray(num_scheduled_tokens[:num_reqs], dtype=np.int64),
            batch.num_computed_tokens_cpu[:num_reqs].astype(np.int64),
            num_prompt,
            readout,
            monitored,
        )
        return out

    runner.execute_model = execute_model
    runner._prepare_inputs = _prepare_inputs
    runner._sample = _sample
    runner._bookkeeping_sync = _bookkeeping_sync


def _discarded_cpu_generators(runner) -> dict[int, tuple[torch.Generator, torch.Tensor]]:
    """(generator, state) of the CPU-seeded requests whose sample this step is discarded (a
    prefill chunk that is not the last): restoring the state after sampling makes their next
    real sample draw what it would have drawn without the chunking, as vLLM's CUDA rewind does."""
    batch = runner.input_batch
    out = {}
    for i in np.nonzero(runner.discard_request_mask.np[:batch.num_reqs])[0]:
        gen = batch.generators.get(int(i))
        if gen is not None and gen.device.type == "cpu":
            out[int(i)] = (gen, gen.get_state())
    return out


def _seat(rt: SteeringRuntime, rid: str, sp, specs: SpecCompiler | None = None):
    """``rid``'s steering state on its first step, None when it is unsteered; whatever goes wrong
    fails this request (runs on slot 0, reported to the API server), never the step.

    ``extra_args["steering"]`` is a WireRecord (``steer serve``) or a JSON string (stock vLLM
    server: compiled here by ``specs``)."""
    try:
        extra = sp.extra_args if sp is not None else None
        raw = (extra or {}).get(EXTRA_ARGS_KEY) if isinstance(extra, dict) else None
        if isinstance(raw, str):
            if specs is None:
                return rt.refuse(rid, "a steering string reached a worker that cannot compile it")
            wire = specs.wire(raw)
        else:
            wire = WireRecord.from_extra_args(extra)
    except (WireError, SteeringError) as exc:
        return rt.refuse(rid, str(exc))
    except Exception as exc:  # noqa: BLE001  (one request's problem must not stop the engine)
        logger.exception("steering: compiling the steering of %s failed", rid)
        return rt.refuse(rid, f"{type(exc).__name__}: {exc}")
    if wire is None:
        return None
    try:
        rs = rt.admit(rid, wire)
        if rs.monitor is not None:
            rs.monitor.eos = getattr(sp, "eos_token_id", None)
        return rs
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
