"""``icmf serve``: run the Ray Serve application from a config file (being built, issue 5)."""

from __future__ import annotations

import argparse


def register(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("serve", help="serve the base model with LoRA adapters (Ray Serve)")
    parser.add_argument("config", help="serve config YAML")
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    raise NotImplementedError("icmf serve is not implemented yet")
