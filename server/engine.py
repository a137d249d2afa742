"""Serve configuration and the vLLM engine built from it."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from server import vllm_env  # noqa: F401  (sets CPU defaults before vllm is imported)
from steering.config import SteeringConfig
from vllm.engine.arg_utils import AsyncEngineArgs
from vllm.v1.engine.async_llm import AsyncLLM

logger = logging.getLogger(__name__)


@dataclass
class ServeConfig:
    """Everything ``steer serve`` was asked for."""

    model: str | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    served_model_name: list[str] | None = None
    api_key: str | None = None
    max_model_len: int | None = None
    dtype: str = "auto"
    enforce_eager: bool = False
    max_num_seqs: int | None = None
    tensor_parallel_size: int = 1
    seed: int = 0
    enable_prefix_caching: bool = True
    steering: bool = True
    max_steering_slots: int = 16
    max_steered_features: int = 32
    steer_layers: list[int] | None = None
    max_steering_strength: float = 32.0
    feature_packs: list[str] = field(default_factory=list)
    bundled_packs: bool = True
    presets: str | None = None  # presets YAML (default: feature_packs/presets.yaml with the bundled packs)
    data_dir: str | None = None  # experiment store (default: $STEER_DATA_DIR or ~/.cache/steer/data)
    experiments_db: str | None = None  # postgresql://… or sqlite:///… (default: SQLite in data_dir)
    log_level: str = "info"
    access_log: bool = True  # one log line per HTTP request (uvicorn's access log)
    engine_overrides: dict[str, Any] = field(default_factory=dict)

    def steering_config(self) -> SteeringConfig | None:
        """The engine-wide steering config, None with ``--no-steering``."""
        if not self.steering:
            return None
        return SteeringConfig(
            max_slots=self.max_steering_slots,
            max_features=self.max_steered_features,
            layers=self.steer_layers,
            max_strength=self.max_steering_strength,
        )

    def served_names(self) -> list[str]:
        """Names clients may put in ``model``: the flag, else the default name or the --model value."""
        from steering.model_store import DEFAULT_MODEL_ALIASES, DEFAULT_MODEL_NAME

        if self.served_model_name:
            return list(self.served_model_name)
        if not self.model or self.model in DEFAULT_MODEL_ALIASES:
            return [DEFAULT_MODEL_NAME]
        return [self.model]


def load_packs(cfg: ServeConfig, model_path: Path):
    """The feature packs to serve: those of feature_packs/ that fit the model (unless
    --no-bundled-packs) plus every --feature-pack, which must fit. Raises PackError naming the
    pack and the problem (sha mismatch, another model, NaN tensors, missing tensors)."""
    from steering.packs.registry import PackRegistry

    if cfg.bundled_packs:
        return PackRegistry.bundled(model_path, extra_paths=cfg.feature_packs)
    return PackRegistry.from_paths(cfg.feature_packs, model_path)


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
        from steering.vllm_shim import engine_kwargs

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
