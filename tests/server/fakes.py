"""Engine-free stand-ins for HTTP tests: the real app, tokenizer and steering compiler (bundled
packs) over a fake engine. Import as ``from fakes import ...`` from tests under tests/server.

    parts = load_parts()                          # once per module: tokenizer, packs, compiler
    state = make_state(parts, tmp_path)           # ServeConfig(api_key=KEY) unless given one
    client = TestClient(create_app(state))        # no lifespan: the fake engine stands in
    for client, state in serve(parts, tmp_path, max_request_bytes=4096): ...   # the same, closed after
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

from server.app import AppState
from server.config import ServeConfig

MODEL = "SmolLM2-135M-Instruct"
KEY = "sk-test"
AUTH = {"authorization": f"Bearer {KEY}"}


class FakeEngine:
    """Answers every request with four tokens (a pirate line when steered); records the
    SamplingParams (``params``) and prompt token ids (``prompts``) it was given. ``fail`` (an exception) is raised from ``generate`` instead."""

    errored = False

    def __init__(self, fail: BaseException | None = None) -> None:
        self.params: list[Any] = []
        self.prompts: list[list[int]] = []
        self.fail = fail

    async def generate(self, prompt, params, request_id):
        self.params.append(params)
        self.prompts.append(list(prompt["prompt_token_ids"]))
        if self.fail is not None:
            raise self.fail
        text = "Arr matey, ahoy!" if params.extra_args else "Hello there, friend."
        out = SimpleNamespace(index=0, text=text, token_ids=[1, 2, 3, 4], finish_reason="length",
                              logprobs=None)
        yield SimpleNamespace(outputs=[out], finished=True, prompt_logprobs=None)

    @property
    def seen(self) -> list[Any]:
        """The steering record (``extra_args``) of each request, in order."""
        return [p.extra_args for p in self.params]

    @property
    def seeds(self) -> list[int | None]:
        return [p.seed for p in self.params]

    async def abort(self, request_id):
        pass

    def get_num_unfinished_requests(self) -> int:
        return 0

    def shutdown(self) -> None:
        pass


def chat(client: Any, headers: dict[str, str], **extra: Any) -> Any:
    """POST a small greedy chat completion (``extra`` adds or overrides body fields)."""
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4,
            "temperature": 0, **extra}
    return client.post("/v1/chat/completions", json=body, headers=headers)


def load_parts() -> dict[str, Any]:
    """The bundled model's tokenizer, its bundled packs and a steering compiler over them."""
    from transformers import AutoTokenizer

    from steering.config import SteeringConfig
    from steering.model_store import resolve_model
    from steering.packs.registry import PackRegistry
    from steering.request import SteeringCompiler

    path = resolve_model(None)
    packs = PackRegistry.bundled(path)
    return {"tokenizer": AutoTokenizer.from_pretrained(str(path)), "packs": packs,
            "compiler": SteeringCompiler(SteeringConfig(), hidden_size=576, num_layers=30,
                                         feature_source=packs)}


def make_state(parts: dict[str, Any], data_dir: Path, config: ServeConfig | None = None,
               engine: Any = None, max_model_len: int = 2048) -> AppState:
    """An AppState as if the engine had started: ``engine`` (a FakeEngine by default)."""
    config = config or ServeConfig(api_key=KEY)
    config.data_dir = str(data_dir)
    state = AppState(config=config)
    state.engine = engine or FakeEngine()
    state.tokenizer = parts["tokenizer"]
    state.max_model_len = max_model_len
    state.compiler = parts["compiler"]
    state.packs = parts["packs"]
    return state


def serve(parts: dict[str, Any], data_dir: Path, engine: Any = None, **config: Any):
    """Yield (TestClient, state): the real app over ``engine`` (a FakeEngine by default) with
    ``ServeConfig(api_key=KEY, **config)``, experiments ready; closed afterwards. Use as a
    generator fixture body (``yield from serve(...)``) or in a ``for`` loop."""
    from fastapi.testclient import TestClient

    from server.app import create_app

    state = make_state(parts, data_dir, ServeConfig(api_key=KEY, **config), engine=engine)
    app = create_app(state)  # no lifespan: the fake engine stands in
    state.experiments.ready()
    yield TestClient(app, raise_server_exceptions=False), state
    state.experiments.close()
