"""What ``steer serve`` was asked for: one dataclass, the single home of every serve default.

The command line (:mod:`server.cli`) takes its defaults from here, and the steering defaults come
from :class:`steering.config.SteeringConfig` (the tables) and :class:`server.steering_setup.SteeringSetup`
(the limits on steered requests, shared with the stock-vLLM plugin). Importing this module does
not import vLLM.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from server.connections import ConnectionLimits
from server.steering_setup import SteeringSetup
from steering.config import SteeringConfig


@dataclass
class ServeConfig:
    """Everything ``steer serve`` was asked for."""

    model: str | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    served_model_name: list[str] | None = None
    api_key: str | None = None
    auth: str | None = None  # --auth YAML: keys (sha256), roles, policies (server/auth.py)
    max_model_len: int | None = None
    dtype: str = "auto"
    enforce_eager: bool = False
    max_num_seqs: int | None = None
    tensor_parallel_size: int = 1
    seed: int = 0
    enable_prefix_caching: bool = True
    steering: bool = True
    max_steering_slots: int | None = SteeringConfig.max_slots  # None: the engine's max_num_seqs
    max_steered_features: int = SteeringConfig.max_features
    steering_bank_features: int = SteeringConfig.bank_features
    steer_layers: list[int] | None = SteeringConfig.layers
    max_steering_strength: float = SteeringConfig.max_strength
    # The limits on steered requests: documented (and their defaults defined) in SteeringSetup.
    max_steering_vector_norm: float = SteeringSetup.max_vector_norm
    steering_queue_timeout: float = SteeringSetup.queue_timeout
    max_steering_waiters: int | None = SteeringSetup.max_waiters
    max_readout_bytes: int = SteeringSetup.max_readout_bytes
    max_readout_bytes_total: int = SteeringSetup.max_readout_bytes_total
    feature_packs: list[str] = field(default_factory=list)
    bundled_packs: bool = True
    presets: str | None = None  # presets YAML (default: feature_packs/presets.yaml with the bundled packs)
    data_dir: str | None = None  # experiment store (default: $STEER_DATA_DIR or ~/.cache/steer/data)
    experiments_db: str | None = None  # postgresql://… or sqlite:///… (default: SQLite in data_dir)
    store_refresh_s: float = 2.0
    """Every this many seconds, ask the experiment store whether presets or experiments changed
    (one tiny query) and re-read them if so: servers sharing one database serve each other's
    admin changes within about this long. 0: never (only what was stored at start and this
    server's own changes)."""
    max_workshop_jobs: int = 1
    """Feature-workshop jobs (POST /v1/features) queued or running at once; beyond: 429 with
    ``Retry-After``. 0: the workshop is off (404)."""
    workshop_threads: int = 1
    """Torch threads of a workshop job's process (it runs beside the engine: keep this below the
    cores the engine does not use)."""
    workshop_duty: float = 0.2
    """While the engine has requests, a workshop job's process runs this share of each second and
    is stopped (SIGSTOP) the rest: a freely running job cost this 2-core VM two thirds of its
    throughput (docs/workshop.md). 1: never paused; 0: only while the engine is idle."""
    workshop_time_budget_s: float = 600.0
    """A trained feature's training stops after this many seconds (the job says so)."""
    max_request_bytes: int = SteeringSetup.max_request_bytes  # larger request bodies: 413
    # Largest n × max_tokens × (1 + top_logprobs) (+ prompt tokens × (1 + prompt_logprobs)) one
    # request may ask for, in response entries (a token or one logprob alternative, ~100-200 bytes
    # each in the API server): 2**20 bounds one response near 100-200 MB, and still admits n = 8
    # full-length outputs of a 128k-token context without logprobs. Beyond it: 400.
    max_response_budget: int = 2**20
    chat_template: str | None = None
    """A Jinja2 chat template file (vLLM's ``--chat-template``) used instead of the model's own.
    None: the model's template; a conversation with tools is rendered with a tool-aware template
    (the model's own when it renders tools, else the bundled ChatML tool template for ChatML
    models; see :mod:`server.tools`)."""
    tool_call_parser: str | None = None
    """The vLLM tool parser (``hermes``, ``llama3_json``, …; vLLM's ``--tool-call-parser``) that
    finds tool calls in free text for ``tool_choice: "auto"``. None: ``hermes`` when the bundled
    ChatML tool template renders the tools (its format), else ``auto`` is refused with a 400."""
    connections: ConnectionLimits = field(default_factory=ConnectionLimits)
    """Header and body timeouts, the open-connection cap and keep-alive (server/connections.py)."""
    allow_special_tokens_in_content: bool = False
    """Let the text of user, assistant and tool messages become special tokens (as vLLM does).
    False: such text stays plain text, so no user can forge a turn (server/special_tokens.py)."""
    plain_text_prompts: bool = False
    """Tokenize /v1/completions text prompts with special tokens' text kept as plain text. False:
    a text prompt may hold special tokens, as in vLLM and OpenAI's legacy completions."""
    shutdown_timeout_s: float = 30.0
    """On SIGTERM, streams still running get this long to finish before they are cut (uvicorn's
    graceful shutdown); new connections are refused at once. Keep it under the orchestrator's
    grace period (Kubernetes: terminationGracePeriodSeconds)."""
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
            bank_features=self.steering_bank_features,
            layers=self.steer_layers,
            max_strength=self.max_steering_strength,
            max_readout_bytes=self.max_readout_bytes_total,
        )

    def steering_setup(self) -> SteeringSetup | None:
        """The steering of this server (tables, packs, limits), None with ``--no-steering``."""
        steering_cfg = self.steering_config()
        if steering_cfg is None:
            return None
        return SteeringSetup(
            config=steering_cfg, bundled_packs=self.bundled_packs,
            feature_packs=list(self.feature_packs),
            max_vector_norm=self.max_steering_vector_norm,
            queue_timeout=self.steering_queue_timeout, max_waiters=self.max_steering_waiters,
            max_readout_bytes=self.max_readout_bytes,
            max_readout_bytes_total=self.max_readout_bytes_total,
            max_request_bytes=self.max_request_bytes)

    def served_names(self) -> list[str]:
        """Names clients may put in ``model``: the flag, else a catalog model's name (and the alias
        that chose it), else the --model value."""
        from steering.model_store import find_model

        if self.served_model_name:
            return list(self.served_model_name)
        spec = find_model(self.model)
        if spec is None:
            return [self.model]
        return [spec.name] + ([self.model] if self.model and self.model != spec.name else [])


DEFAULTS = ServeConfig()
"""The defaults, for help texts and flags."""
