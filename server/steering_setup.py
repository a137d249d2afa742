"""The steering of one API server, whichever front door it has: ``steer serve``
(:class:`server.state.AppState`) or stock vLLM's server with the plugin
(:mod:`server.vllm_plugin`). One dataclass, :class:`SteeringSetup`, holds the engine-wide tables
(:class:`steering.config.SteeringConfig`), the API server's packs and every limit on steered
requests, each default defined here once (``ServeConfig``, the ``steer serve`` flags and the
plugin's ``PluginOptions`` take theirs from it); its methods are what both front doors do with
it: load the packs, build the compiler, build the slot gate, and measure the layers' residual
norms that bound raw vectors (:func:`measure_layer_norms`, once at start).

Importing this module does not import vLLM (:mod:`server.config` imports it).
"""

from __future__ import annotations

import asyncio
import logging
import os
from dataclasses import dataclass, field
from typing import Any

from steering.config import SteeringConfig
from steering.request import DEFAULT_MAX_VECTOR_NORM, CompiledSteering, SteeringCompiler, build_compiler
from steering.worker.slots import SlotGate

logger = logging.getLogger(__name__)

MiB = 2**20


@dataclass
class SteeringSetup:
    """What both front doors build their steering from: tables, packs and limits."""

    config: SteeringConfig = field(default_factory=SteeringConfig)
    """The engine-wide tables and bounds, as the workers get them. Its ``packs`` are the packs the
    *workers* load (stock vLLM: the plugin loads the very same ones to validate); ``steer serve``
    leaves them empty and loads its packs in the API server (:attr:`bundled_packs`,
    :attr:`feature_packs`)."""

    bundled_packs: bool = False
    """``steer serve``: the API server loads the bundled packs that fit the model (its flag
    ``--no-bundled-packs`` turns them off)."""

    feature_packs: list[str] = field(default_factory=list)
    """``steer serve``: pack folders (or folders of packs) the API server loads; each must fit."""

    max_vector_norm: float = DEFAULT_MAX_VECTOR_NORM
    """F: the largest ‖scale·v‖ (and |clamp target|) of a raw vector, in units of its layer's
    median residual norm (``steering/request.py``: ``DEFAULT_MAX_VECTOR_NORM`` explains the value)."""

    queue_timeout: float | None = 30.0
    """Seconds a steered request waits for a slot when ``max_slots`` distinct configurations are
    in flight (None: forever; 0: never waits); then 429 with ``Retry-After``."""

    max_waiters: int | None = None
    """Steered requests that may wait for a slot at once (None: 4 × ``max_slots``); one more is a
    429 with ``Retry-After``."""

    max_readout_bytes: int = 64 * MiB
    """Largest activation readout (``return_activations``, inspect) one request may ask for, in
    worker bytes; beyond it, 400. 64 MiB is ~28k positions of one captured 576-wide layer, or ~4k
    of a 4096-wide one."""

    max_readout_bytes_total: int = SteeringConfig.max_readout_bytes
    """Activation readouts in flight in all, in worker bytes; beyond it, 429. Also the workers'
    hard cap (``SteeringConfig.max_readout_bytes``, whose default this is)."""

    max_request_bytes: int = 8 * MiB
    """Largest request body; beyond it, 413 (the plugin reads every POST body to look for
    steering)."""

    measure_norms: bool = True
    """Measure each steerable layer's median residual norm (one prefill) and bound raw vectors by
    it; off: raw vectors are bounded by ``max_strength`` and the float32 limits only."""

    norm_timeout_s: float = 300.0
    """Seconds the residual-norm measurement may take; beyond it, serve without the norm bound."""

    # -- what both front doors do with it ---------------------------------------------------
    def load_packs(self, model_dir: str | os.PathLike[str] | None):
        """The API server's own packs (``steer serve``): a PackRegistry, empty when none are
        configured (:func:`steering.packs.registry.load_packs`; PackError names a bad pack)."""
        from steering.packs.registry import load_packs

        return load_packs(self.feature_packs, model_dir, bundled=self.bundled_packs)

    def build_compiler(self, hidden_size: int, num_layers: int, packs: Any = None,
                       model_dir: str | None = None) -> SteeringCompiler:
        """The compiler over ``packs`` (already loaded), or else over ``config.packs`` loaded for
        the model in ``model_dir`` exactly as the workers load them
        (:func:`steering.request.build_compiler`), with this setup's F."""
        return build_compiler(self.config, int(hidden_size), int(num_layers), model_dir,
                              packs=packs, max_vector_norm=self.max_vector_norm)

    def slot_gate(self) -> SlotGate:
        """The gate that keeps at most ``config.max_slots`` distinct configurations in flight."""
        return SlotGate(self.config.max_slots, queue_timeout=self.queue_timeout,
                        max_waiters=self.max_waiters)

    async def apply_layer_norms(self, compiler: SteeringCompiler, engine: Any,
                                tokenizer: Any) -> bool:
        """Measure the layers' median residual norms through ``engine`` (``generate`` and
        ``collective_rpc``: vLLM's AsyncLLM or the API server's engine client) into
        ``compiler.layer_norms``, the bound of raw vectors. ``tokenizer``: a tokenizer, or a
        name or folder loaded here. Whether norms were set: when measuring is off, impossible (no
        engine) or fails (logged), the server serves anyway with the float32 bounds only."""
        if not self.measure_norms:
            return False
        if engine is None or tokenizer is None:
            logger.warning("steering: no engine to measure residual norms with; raw vectors are "
                           "bounded by the float32 limits only")
            return False
        try:
            if isinstance(tokenizer, (str, os.PathLike)):
                from transformers import AutoTokenizer

                tokenizer = await asyncio.to_thread(AutoTokenizer.from_pretrained, str(tokenizer))
            norms = await asyncio.wait_for(measure_layer_norms(
                engine, tokenizer, compiler.layers_list, compiler.hidden_size), self.norm_timeout_s)
        except Exception:  # noqa: BLE001  (serve anyway; raw vectors keep the float32 bounds)
            logger.exception("steering: measuring the layers' residual norms failed; raw vectors "
                             "are bounded by the float32 limits only, not relative to the stream")
            return False
        compiler.layer_norms = norms
        logger.info("steering: median residual norm per layer %s",
                    {k: round(v, 1) for k, v in norms.items()})
        return True


# -- the norms raw vectors are bounded by -----------------------------------------------------
CALIBRATION_TEXT = (
    "The library opens at nine in the morning. Visitors borrow books, read the newspapers and use "
    "the computers; children come after school to do their homework, and on Saturdays there is a "
    "story hour for the youngest readers, followed by a small market in the square outside.")
"""A plain, neutral text whose residual norms stand for "a typical stream" (position 0, the
attention sink, is excluded, as in the packs' calibration)."""


async def measure_layer_norms(engine: Any, tokenizer: Any, layers: list[int],
                              hidden_size: int) -> dict[int, float]:
    """Median residual-stream norm at each of ``layers``: one prefill of
    :data:`CALIBRATION_TEXT` through the real engine with a capture readout (as inspect does)."""
    import uuid

    import numpy as np

    from steering.program import SteeringProgram
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    rid = f"steer-calibration-{uuid.uuid4().hex}"
    compiled = CompiledSteering(program=SteeringProgram(hidden_size=hidden_size), apply_to="all",
                                return_activations=True, capture=tuple(layers), salt=rid)
    params = SamplingParams(max_tokens=1, temperature=0.0,
                            extra_args=compiled.extra_args(readout_key=rid))
    prompt = TokensPrompt(prompt_token_ids=list(tokenizer.encode(CALIBRATION_TEXT)))
    prompt["cache_salt"] = compiled.cache_salt
    async for _ in engine.generate(prompt, params, rid):
        pass
    per_rank = await engine.collective_rpc("steering_readout", args=(rid,))
    norms: dict[int, list[float]] = {}
    for kind, layer, pos, values in per_rank[0] or []:
        if kind == "resid" and pos > 0:
            norms.setdefault(layer, []).append(float(np.linalg.norm(np.asarray(values, np.float64))))
    return {layer: float(np.median(v)) for layer, v in sorted(norms.items()) if v}
