"""What ``steer serve`` was asked for: one dataclass, the single home of every serve default.

The command line (:mod:`server.cli`) takes its defaults from here, and the steering defaults come
from :class:`steering.config.SteeringConfig`. Importing this module does not import vLLM.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from steering.config import SteeringConfig


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
    max_steering_slots: int = SteeringConfig.max_slots
    max_steered_features: int = SteeringConfig.max_features
    steer_layers: list[int] | None = SteeringConfig.layers
    max_steering_strength: float = SteeringConfig.max_strength
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


DEFAULTS = ServeConfig()
"""The defaults, for help texts and flags."""
