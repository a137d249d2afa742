"""One server's state: its configuration and everything created when the engine starts."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from server.config import ServeConfig
from server.engine import build_engine_args, create_engine
from server.errors import EngineUnavailable
from server.metrics import Metrics
from server.special_tokens import SpecialTokenGuard
from server.steering_limits import SteeringLimits
from server.tools import ToolSetup
from steering.request import SteeringCompiler
from steering.worker.slots import SlotGate
from vllm.v1.engine.async_llm import AsyncLLM

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from steering.packs.registry import PackRegistry

logger = logging.getLogger(__name__)


@dataclass
class AppState:
    """Configuration plus everything created when the engine starts."""

    config: ServeConfig
    metrics: Metrics = field(default_factory=Metrics)
    engine: AsyncLLM | None = None
    tokenizer: PreTrainedTokenizerBase | None = None
    model_path: Path | None = None
    max_model_len: int | None = None
    compiler: SteeringCompiler | None = None
    packs: PackRegistry | None = None  # the loaded feature packs when steering is on
    # server.experiments.manager.ExperimentManager (presets, A/B tests), set by server/app.py;
    # typed loosely because the manager reads this state (a TYPE_CHECKING import would be a circle)
    experiments: Any = None
    gate: SlotGate | None = None
    limits: SteeringLimits | None = None  # slot leases, readout budget, unseated audit
    tools: ToolSetup | None = None  # chat templates and the tool parser (server/tools.py)
    special_tokens: SpecialTokenGuard | None = None  # client text stays text (server/special_tokens.py)
    startup_error: BaseException | None = None
    on_fatal: Callable[[BaseException], None] | None = None
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def served_names(self) -> list[str]:
        return self.config.served_names()

    @property
    def ready(self) -> bool:
        return self.engine is not None and not self.engine.errored

    def require_engine(self) -> AsyncLLM:
        if self.engine is None:
            raise EngineUnavailable("the engine is still starting; retry shortly")
        if self.engine.errored:
            raise EngineUnavailable("the engine has stopped; the server must be restarted")
        return self.engine

    def token_guard(self) -> SpecialTokenGuard:
        """The tokenizer's special tokens kept out of client text (built on first use, so
        engine-free tests that set ``tokenizer`` by hand get one too)."""
        if self.special_tokens is None or self.special_tokens.tokenizer is not self.tokenizer:
            self.special_tokens = SpecialTokenGuard(self.tokenizer,
                                                    self.config.allow_special_tokens_in_content,
                                                    self.config.plain_text_prompts)
        return self.special_tokens

    async def start(self) -> None:
        """Materialize the model, start the engine, then build tokenizer and steering tables."""
        from transformers import AutoTokenizer

        from steering.model_store import resolve_model

        cfg = self.config
        path = await asyncio.to_thread(resolve_model, cfg.model)
        setup = cfg.steering_setup()
        if setup is not None:  # before the engine: a bad pack fails in seconds
            self.packs = await asyncio.to_thread(setup.load_packs, path)
            logger.info("feature packs: %s", [p["name"] for p in self.packs.packs()])
        args = build_engine_args(cfg, path, self.served_names)
        engine = await asyncio.to_thread(create_engine, args)
        try:
            self.tokenizer = await asyncio.to_thread(AutoTokenizer.from_pretrained, str(path))
            self.tools = ToolSetup(self.tokenizer, cfg.chat_template, cfg.tool_call_parser)
            self.model_path = path
            self.max_model_len = engine.model_config.max_model_len
            if setup is not None:
                # the slots the workers allocated (None: as many as the engine batches)
                setup.config = setup.config.for_batch(engine.vllm_config.scheduler_config.max_num_seqs)
                hf = engine.model_config.hf_text_config
                self.compiler = setup.build_compiler(hf.hidden_size, hf.num_hidden_layers,
                                                     self.packs)
                self.gate = setup.slot_gate()
                self.limits = SteeringLimits(
                    self.gate, self.metrics, lambda: engine.collective_rpc,
                    max_readout_bytes=setup.max_readout_bytes,
                    max_readout_bytes_total=setup.max_readout_bytes_total)
                # the residual norms raw vectors are bounded by (steering/request.py); without
                # them only the float32 bounds apply, which is logged
                await setup.apply_layer_norms(self.compiler, engine, self.tokenizer)
            gate = self.gate
            self.metrics.bind(
                waiting=lambda: gate.waiting if gate is not None else 0,
                engine_unfinished=engine.get_num_unfinished_requests,
                slots_busy=lambda: gate.resident if gate is not None else 0,
                slots_total=lambda: gate.capacity if gate is not None else 0)
        except BaseException:
            engine.shutdown()
            raise
        self.engine = engine
        logger.info("engine ready: serving %s from %s (max_model_len=%d)",
                    self.served_names, path, self.max_model_len)

    def shutdown(self) -> None:
        if self.engine is not None:
            self.engine.shutdown()
            self.engine = None
