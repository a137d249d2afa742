"""``steer serve``: flags shaped like ``vllm serve``, the server process and its start-up watchdog."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import sys
import time
from collections.abc import Sequence

import psutil

from server.config import DEFAULTS, ServeConfig
from server.connections import ConnectionLimits, uvicorn_options


def _layers(value: str) -> list[int] | None:
    """``all`` or a comma list of layer indices (ranges like ``4-8`` allowed)."""
    if value.strip().lower() == "all":
        return None
    layers: list[int] = []
    try:
        for part in value.split(","):
            part = part.strip()
            if "-" in part:
                lo, hi = part.split("-", 1)
                layers.extend(range(int(lo), int(hi) + 1))
            elif part:
                layers.append(int(part))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 'all' or a comma list of layers, got {value!r}") from None
    if not layers:
        raise argparse.ArgumentTypeError("no layers given")
    return layers


def _store_url(value: str) -> str:
    """An ``--experiments-db`` URL this server can open."""
    from server.experiments.backend import check_url

    try:
        return check_url(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _seconds(value: str) -> float:
    """A finite number of seconds, 0 or more."""
    try:
        seconds = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {value!r}") from None
    if not 0 <= seconds < float("inf"):
        raise argparse.ArgumentTypeError(f"expected 0 or more seconds, got {value!r}")
    return seconds


def add_serve_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("serve", help="run the OpenAI-compatible server")
    p.add_argument("--model", default=None,
                   help="local Hugging Face model folder (default: the bundled SmolLM2-135M-Instruct)")
    p.add_argument("--host", default=DEFAULTS.host, help="listen address (default: %(default)s)")
    p.add_argument("--port", type=int, default=DEFAULTS.port, help="listen port (default: %(default)s)")
    p.add_argument("--served-model-name", nargs="+", default=None,
                   help="model name(s) clients send in 'model' (default: the model's name)")
    p.add_argument("--api-key", default=os.environ.get("STEER_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1/*: one admin key named "
                        "'api-key' (env STEER_API_KEY)")
    p.add_argument("--auth", default=os.environ.get("STEER_AUTH_FILE", DEFAULTS.auth), metavar="YAML",
                   help="API keys (sha256), their roles (admin, user) and policies; 'steer keys "
                        "new' makes a key (env STEER_AUTH_FILE; see README 'Keys, roles and "
                        "policies')")
    p.add_argument("--max-model-len", type=int, default=None, help="context length (default: the model's)")
    p.add_argument("--dtype", default=DEFAULTS.dtype, choices=["auto", "float32", "float16", "bfloat16", "half", "float"],
                   help="weights and activations dtype (default: auto, the model's)")
    p.add_argument("--enforce-eager", action="store_true", help="no torch.compile / graphs: faster start")
    p.add_argument("--max-num-seqs", type=int, default=None, help="most sequences per engine step")
    p.add_argument("--seed", type=int, default=DEFAULTS.seed, help="engine seed (default: %(default)s)")
    p.add_argument("--tensor-parallel-size", "-tp", type=int, default=DEFAULTS.tensor_parallel_size,
                   help="tensor-parallel ranks (default: %(default)s); each rank steers its replicated stream")
    p.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction,
                   default=DEFAULTS.enable_prefix_caching,
                   help="reuse KV blocks across requests (default: on)")
    p.add_argument("--chat-template", default=DEFAULTS.chat_template, metavar="FILE",
                   help="Jinja2 chat template instead of the model's own (as vLLM's flag)")
    p.add_argument("--tool-call-parser", default=DEFAULTS.tool_call_parser, metavar="NAME",
                   help="vLLM tool parser for tool_choice 'auto' (hermes, llama3_json, ...; "
                        "default: hermes with the bundled ChatML tool template)")
    limits = ConnectionLimits()
    p.add_argument("--header-timeout", type=float, default=limits.header_timeout_s, metavar="SECONDS",
                   help="a request's line and headers must arrive within this (408 after; "
                        "default: %(default)s)")
    p.add_argument("--body-timeout", type=float, default=limits.body_timeout_s, metavar="SECONDS",
                   help="a request's body must arrive within this of its headers (default: %(default)s)")
    p.add_argument("--max-connections", type=int, default=limits.max_connections, metavar="N",
                   help="open connections at most; past it 503 and closed (default: %(default)s)")
    p.add_argument("--keep-alive-timeout", type=float, default=limits.keep_alive_s, metavar="SECONDS",
                   help="close an idle kept-alive connection after this (default: %(default)s)")
    p.add_argument("--allow-special-tokens-in-content", action="store_true",
                   default=DEFAULTS.allow_special_tokens_in_content,
                   help="let user/assistant/tool message text become special tokens, as vLLM does "
                        "(default: kept as plain text, so no user can forge a system turn)")
    p.add_argument("--plain-text-prompts", action="store_true", default=DEFAULTS.plain_text_prompts,
                   help="/v1/completions text prompts never become special tokens either")
    p.add_argument("--shutdown-timeout", type=float, default=DEFAULTS.shutdown_timeout_s,
                   metavar="SECONDS", dest="shutdown_timeout_s",
                   help="on SIGTERM, let running streams finish this long (default: %(default)s)")
    p.add_argument("--log-level", default=DEFAULTS.log_level, choices=["debug", "info", "warning", "error"])
    p.add_argument("--access-log", action=argparse.BooleanOptionalAction, default=DEFAULTS.access_log,
                   help="log a line per HTTP request (default: on); under heavy load the line costs "
                        "the one event loop that also parses and compiles requests")
    p.add_argument("--startup-timeout", type=float, default=900.0, metavar="SECONDS",
                   help="exit 1 (stopping the engine's processes) if the engine is neither up nor "
                        "failed after this long; a vLLM engine core can hang after a failed start "
                        "(0: wait forever; default: 900)")
    p.add_argument("--max-request-bytes", type=int, default=DEFAULTS.max_request_bytes, metavar="BYTES",
                   help="refuse larger request bodies with 413 (default: %(default)s, 8 MiB)")
    p.add_argument("--max-response-budget", type=int, default=DEFAULTS.max_response_budget,
                   metavar="ENTRIES",
                   help="largest n x max_tokens x (1 + top_logprobs) one request may ask for, plus "
                        "prompt tokens x (1 + prompt_logprobs); 400 beyond it (default: %(default)s)")
    s = p.add_argument_group("steering")
    s.add_argument("--no-steering", dest="steering", action="store_false",
                   help="run without the steering plugin (the benchmarks' baseline)")
    s.add_argument("--max-steering-slots", type=int, default=DEFAULTS.max_steering_slots,
                   help="distinct steering configurations in flight at once (default: as many "
                        "as the engine batches, its --max-num-seqs)")
    s.add_argument("--max-steered-features", type=int, default=DEFAULTS.max_steered_features,
                   help="features one configuration may steer at one layer (default: %(default)s)")
    s.add_argument("--steering-bank-features", type=int, default=DEFAULTS.steering_bank_features,
                   metavar="ROWS",
                   help="distinct feature rows the workers' feature bank holds per layer, shared "
                        "by every configuration that uses them (default: %(default)s)")
    s.add_argument("--steer-layers", type=_layers, default=DEFAULTS.steer_layers,
                   help="steerable decoder layers: 'all' or a comma list such as '8,12,16-20' (default: all)")
    s.add_argument("--max-steering-strength", type=float, default=DEFAULTS.max_steering_strength,
                   help="largest accepted |strength| or |scale| (default: %(default)s)")
    s.add_argument("--max-steering-vector-norm", type=float, default=DEFAULTS.max_steering_vector_norm,
                   metavar="FACTOR",
                   help="largest ||scale*v|| of a raw vector (and |clamp target|), in units of its "
                        "layer's median residual norm measured at start (default: %(default)s)")
    s.add_argument("--steering-queue-timeout", type=float, default=DEFAULTS.steering_queue_timeout,
                   metavar="SECONDS",
                   help="how long a request waits for a steering slot before a 429 "
                        "(default: %(default)s)")
    s.add_argument("--max-steering-waiters", type=int, default=DEFAULTS.max_steering_waiters,
                   metavar="N",
                   help="requests that may wait for a steering slot at once; one more is a 429 "
                        "(default: 4 x --max-steering-slots)")
    s.add_argument("--max-readout-bytes", type=int, default=DEFAULTS.max_readout_bytes,
                   metavar="BYTES",
                   help="largest activation readout (return_activations, inspect) one request may "
                        "ask for; 400 beyond it (default: %(default)s = 64 MiB)")
    s.add_argument("--max-readout-bytes-total", type=int, default=DEFAULTS.max_readout_bytes_total,
                   metavar="BYTES",
                   help="activation readouts in flight in all; 429 beyond it (default: %(default)s "
                        "= 512 MiB)")
    s.add_argument("--feature-pack", action="append", default=[], metavar="PATH",
                   help="load a feature pack folder (or a folder of packs); repeatable")
    s.add_argument("--no-bundled-packs", dest="bundled_packs", action="store_false",
                   help="do not load the packs in feature_packs/ that fit the model")
    s.add_argument("--presets", default=None, metavar="YAML",
                   help="named steering presets, served as '<model>:<preset>' "
                        "(default: feature_packs/presets.yaml with the bundled packs)")
    p.add_argument("--data-dir", default=None,
                   help="where presets, experiments and their results are stored (SQLite; "
                        "default: $STEER_DATA_DIR or ~/.cache/steer/data)")
    p.add_argument("--experiments-db", type=_store_url, default=os.environ.get("STEER_EXPERIMENTS_DB"),
                   metavar="URL",
                   help="experiment store: postgresql://USER:PW@HOST[:PORT]/DB or sqlite:///PATH "
                        "(env STEER_EXPERIMENTS_DB; default: steer.db in --data-dir)")
    p.add_argument("--store-refresh-s", type=_seconds, default=DEFAULTS.store_refresh_s,
                   metavar="SECONDS",
                   help="check the experiment store this often for presets and experiments that "
                        "other servers sharing it created, changed or deleted (0: never; "
                        "default: %(default)s)")
    p.add_argument("--max-workshop-jobs", type=int, default=DEFAULTS.max_workshop_jobs, metavar="N",
                   help="feature-workshop jobs (POST /v1/features) queued or running at once; "
                        "beyond: 429 (0: no workshop; default: %(default)s)")
    p.add_argument("--workshop-threads", type=int, default=DEFAULTS.workshop_threads, metavar="N",
                   help="torch threads of a workshop job's process (default: %(default)s)")
    p.add_argument("--workshop-duty", type=float, default=DEFAULTS.workshop_duty, metavar="SHARE",
                   help="while requests are being served, a workshop job runs this share of each "
                        "second and is paused the rest (1: never paused; default: %(default)s)")
    p.add_argument("--workshop-time-budget-s", type=_seconds, default=DEFAULTS.workshop_time_budget_s,
                   metavar="SECONDS", help="training time of one workshop feature at most "
                                           "(default: %(default)s)")
    p.set_defaults(func=serve)


def config_from_args(args: argparse.Namespace) -> ServeConfig:
    """The ServeConfig that ``steer serve`` flags ask for."""
    return ServeConfig(
        model=args.model, host=args.host, port=args.port,
        served_model_name=args.served_model_name, api_key=args.api_key or None,
        auth=args.auth or None,
        max_model_len=args.max_model_len, dtype=args.dtype, enforce_eager=args.enforce_eager,
        max_num_seqs=args.max_num_seqs, seed=args.seed,
        tensor_parallel_size=args.tensor_parallel_size,
        enable_prefix_caching=args.enable_prefix_caching, steering=args.steering,
        max_steering_slots=args.max_steering_slots, max_steered_features=args.max_steered_features,
        steering_bank_features=args.steering_bank_features,
        steer_layers=args.steer_layers, max_steering_strength=args.max_steering_strength,
        max_steering_vector_norm=args.max_steering_vector_norm,
        steering_queue_timeout=args.steering_queue_timeout,
        max_steering_waiters=args.max_steering_waiters, max_readout_bytes=args.max_readout_bytes,
        max_readout_bytes_total=args.max_readout_bytes_total,
        feature_packs=list(args.feature_pack), bundled_packs=args.bundled_packs,
        presets=args.presets, data_dir=args.data_dir, experiments_db=args.experiments_db,
        store_refresh_s=args.store_refresh_s, max_workshop_jobs=args.max_workshop_jobs,
        workshop_threads=args.workshop_threads, workshop_time_budget_s=args.workshop_time_budget_s,
        workshop_duty=args.workshop_duty,
        max_request_bytes=args.max_request_bytes, max_response_budget=args.max_response_budget,
        chat_template=args.chat_template, tool_call_parser=args.tool_call_parser,
        connections=ConnectionLimits(header_timeout_s=args.header_timeout, body_timeout_s=args.body_timeout,
                                     max_connections=args.max_connections,
                                     keep_alive_s=args.keep_alive_timeout),
        allow_special_tokens_in_content=args.allow_special_tokens_in_content,
        plain_text_prompts=args.plain_text_prompts, shutdown_timeout_s=args.shutdown_timeout_s,
        log_level=args.log_level, access_log=args.access_log,
    )


def startup_watchdog(state, timeout_s: float, on_timeout):
    """After ``timeout_s``, call ``on_timeout(message)`` if the engine is neither up nor failed.

    Returns the started daemon timer (cancel it to disarm), or None when ``timeout_s`` <= 0."""
    import threading

    if timeout_s <= 0:
        return None

    def check() -> None:
        if state.engine is None and state.startup_error is None:
            on_timeout(f"the engine did not start within {timeout_s:g} s (--startup-timeout)")

    timer = threading.Timer(timeout_s, check)
    timer.daemon = True
    timer.start()
    return timer


def _abort_startup(message: str) -> None:
    """Stop every process this server started (engine core, workers) and exit 1 at once: the
    thread waiting for a hung engine core would otherwise keep the interpreter from exiting.

    Runs on the watchdog's thread while the main thread may be anywhere (importing vLLM, writing
    to stderr, spawning the engine core): it imports nothing and writes its message with a raw
    ``os.write``, so it takes neither an import lock nor the ``sys.stderr`` buffer's lock."""
    os.write(2, f"steer serve: error: {message}\n".encode())
    stop_descendants()
    os._exit(1)


def stop_descendants() -> None:
    """Kill every process below this one, including those spawned while it looks.

    A process spawned while it looks shows up in a later look: it stops (a stopped process cannot
    fork) and kills descendants until none has appeared for ``_QUIET_S``. Orphans count as
    descendants once :func:`adopt_orphans` has run."""
    me = psutil.Process()
    quiet_since = start = time.monotonic()
    while time.monotonic() - quiet_since < _QUIET_S and time.monotonic() - start < _MAX_S:
        stopped: dict[int, psutil.Process] = {}
        while new := [p for p in me.children(recursive=True) if p.pid not in stopped]:
            for child in new:  # stop first, so that no child forks (or is orphaned) meanwhile
                with contextlib.suppress(psutil.Error):
                    child.send_signal(signal.SIGSTOP)
                stopped[child.pid] = child
        for child in stopped.values():
            with contextlib.suppress(psutil.Error):
                child.kill()
        if stopped:
            psutil.wait_procs(list(stopped.values()), timeout=10)
            quiet_since = time.monotonic()
        time.sleep(0.05)


_QUIET_S = 0.5
"""How long ``stop_descendants`` must find no descendant before it returns..."""
_MAX_S = 30.0
"""...or how long it sweeps at most (a thread that keeps spawning must not keep it alive)."""


def adopt_orphans() -> bool:
    """Make this process the child subreaper of everything it starts (Linux ``prctl``).

    When vLLM's engine core dies during start its workers are orphaned; without this they are
    re-parented to init, out of :func:`stop_descendants`' reach, and keep running (a SmolLM2
    worker kept 1.3 GB after its engine core was killed). False where the call is unavailable."""
    import ctypes
    import ctypes.util

    if not sys.platform.startswith("linux"):
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    return libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0


_PR_SET_CHILD_SUBREAPER = 36
"""``prctl`` option from ``<linux/prctl.h>``."""


def serve(args: argparse.Namespace) -> int:
    """Run the server until interrupted; exit 1 if the engine failed to start."""
    import uvicorn

    from server.app import AppState, create_app
    from steering.model_store import find_model, resolve_model

    if find_model(args.model) is None:
        try:
            resolve_model(args.model)  # a local folder: cheap to check before anything starts
        except ValueError as exc:
            print(f"steer serve: error: {exc}", file=sys.stderr)
            return 2

    config = config_from_args(args)
    if config.auth:
        from server.auth import load_auth

        try:
            load_auth(config.auth)  # a bad key file stops the server before anything starts
        except ValueError as exc:
            print(f"steer serve: error: {exc}", file=sys.stderr)
            return 2
    state = AppState(config=config)
    server = uvicorn.Server(uvicorn.Config(
        create_app(state), host=config.host, port=config.port, log_level=config.log_level,
        access_log=config.access_log, timeout_graceful_shutdown=config.shutdown_timeout_s,
        **uvicorn_options(config.connections, state.metrics.connections_closed_by)))

    def fatal(_: BaseException) -> None:
        server.should_exit = True

    state.on_fatal = fatal
    adopt_orphans()
    startup_watchdog(state, args.startup_timeout, _abort_startup)
    server.run()
    if state.startup_error is None:
        return 0
    stop_descendants()  # what vLLM's own clean-up of a failed start left running
    exc = state.startup_error
    print(f"steer serve: error: the engine failed to start: {type(exc).__name__}: {exc}", file=sys.stderr)
    return 1


def build_parser() -> argparse.ArgumentParser:
    """``steer serve`` alone (``python -m server.cli serve``); the whole ``steer`` command with
    its client tools is :func:`clients.cli.build_parser`."""
    parser = argparse.ArgumentParser(prog="steer", description="Steering-enabled inference server.")
    add_serve_parser(parser.add_subparsers(dest="command", required=True, metavar="COMMAND"))
    return parser


def run(parser: argparse.ArgumentParser, argv: Sequence[str] | None = None) -> int:
    """Parse ``argv``, set up logging at the command's ``--log-level`` and run the command."""
    args = parser.parse_args(argv)
    level = getattr(args, "log_level", "info").upper()
    logging.basicConfig(level=getattr(logging, level, logging.INFO),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return int(args.func(args) or 0)


def main(argv: Sequence[str] | None = None) -> int:
    return run(build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
