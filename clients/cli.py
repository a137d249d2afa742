"""The ``steer`` command: ``serve`` (the server) and the tools that drive it or an engine."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from server.cli import add_serve_parser, run


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="steer", description="Steering-enabled inference server.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_serve_parser(sub)
    from server.auth import add_keys_parser

    add_keys_parser(sub)
    from steering.model_store import add_models_parser

    add_models_parser(sub)
    from steering.builders.cli import add_pack_parser

    from clients.eval.calibrate_cli import add_calibrate_parser

    pack_sub = add_pack_parser(sub)
    add_calibrate_parser(pack_sub)
    from server.workshop.export import add_export_parser

    add_export_parser(pack_sub)
    from clients.ab.cli import add_ab_parser

    add_ab_parser(sub)
    from clients.eval.cli import add_eval_parser

    add_eval_parser(sub)
    from clients.eval.demo_cli import add_demo_parser

    add_demo_parser(sub)
    from clients.bench.run import add_parser as add_bench_parser

    add_bench_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    return run(build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
