"""The `sr-jax` command line. Each feature module registers its own subcommands.

A module listed in `_COMMAND_MODULES` exposes `register(subparsers)`, which adds its parsers
and sets `func` on them; `func(args)` returns the exit code.
"""

from __future__ import annotations

import argparse
import importlib
import sys

_COMMAND_MODULES = [
    "sr_jax.demo",
    "sr_jax.convert.cli",
    "sr_jax.data.cli",
    "sr_jax.serve.server",
    "sr_jax.reward.scorer",
    "sr_jax.train.sft",
    "sr_jax.rl.trainer",
    "sr_jax.eval.cli",
    "sr_jax.plan",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sr-jax", description="SpatialReward in JAX")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in _COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
