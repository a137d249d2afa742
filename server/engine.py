"""The vLLM engine built from a serve configuration (:class:`server.config.ServeConfig`)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from server import vllm_env  # noqa: F401  (sets CPU defaults before vllm is imported)
from server.config import ServeConfig
from vllm.engine.arg_utils import AsyncEngineArgs
from vllm.v1.engine.async_llm import AsyncLLM

logger = logging.getLogger(__name__)


def load_packs(cfg: ServeConfig, model_path: Path):
    """The feature packs to serve: those of feature_packs/ that fit the model (unless
    --no-bundled-packs) plus every --feature-pack, which must fit (the one loader,
    :func:`steering.packs.registry.load_packs`, as :meth:`SteeringSetup.load_packs
    <server.steering_setup.SteeringSetup.load_packs>` calls it). Raises PackError naming the pack
    and the problem (sha mismatch, another model, NaN tensors, missing tensors)."""
    from steering.packs.registry import load_packs as load

    return load(cfg.feature_packs, model_path, bundled=cfg.bundled_packs)


def build_engine_args(cfg: ServeConfig, model_path: Path, served: list[str]) -> AsyncEngineArgs:
    """AsyncEngineArgs for ``cfg``, with the steering plugin's fields merged in when enabled."""
    kwargs: dict[str, Any] = {
        "model": str(model_path),
        "tokenizer": str(model_path),
        "served_model_name": served,
        "dtype": cfg.dtype,
        "seed": cfg.seed,
        "enforce_eager": cfg.enforce_eager,
        "enable_prefix_caching": cfg.enable_prefix_caching,
        # Sampling defaults come from the request (OpenAI semantics), not generation_config.json.
        "generation_config": "vllm",
    }
    if cfg.max_model_len is not None:
        kwargs["max_model_len"] = cfg.max_model_len
    if cfg.max_num_seqs is not None:
        kwargs["max_num_seqs"] = cfg.max_num_seqs
    if cfg.tensor_parallel_size > 1:
        # Every rank applies the same steering op to the same (all-reduced, replicated) stream.
        vllm_env.bind_tensor_parallel(cfg.tensor_parallel_size)
        kwargs["tensor_parallel_size"] = cfg.tensor_parallel_size
    steering_cfg = cfg.steering_config()
    if steering_cfg is not None:
        from steering.worker.vllm_shim import engine_kwargs

        for key, value in engine_kwargs(steering_cfg).items():
            if isinstance(value, dict) and isinstance(kwargs.get(key), dict):
                kwargs[key] = {**kwargs[key], **value}
            else:
                kwargs[key] = value
    kwargs.update(cfg.engine_overrides)
    return AsyncEngineArgs(**kwargs)


def create_engine(engine_args: AsyncEngineArgs) -> AsyncLLM:
    """Start the engine (blocking: spawns the engine-core process and loads the model)."""
    logger.info("starting vLLM engine for %s", engine_args.model)
    return AsyncLLM.from_engine_args(engine_args)
