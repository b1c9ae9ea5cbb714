"""The `guardian` command. Each feature registers its own subcommands with one line below.

A feature module exposes ``register(subparsers)``, which adds its subparsers and sets
``func=<callable(args) -> int>`` on each; ``main`` dispatches to it.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import List, Optional

# one line per feature: the module whose register(subparsers) adds its subcommands
FEATURES = [
    "guardian_plugin.handlers.cli",  # protect (TorchServe archives)
    "guardian_plugin.ledger.cli",  # clients list|show|reset|reset-quota|block|unblock
    "guardian_plugin.keys_cli",  # keys issue|list|revoke (issued API keys)
    "guardian_plugin.training.cli",  # train-detector
    "guardian_plugin.replay",  # replay (recorded traffic through a protected archive's guard, observe mode)
    "guardian_plugin.recalibrate",  # calibrate (thresholds re-set on a deployment's preprocess)
    "guardian_plugin.evaluation.cli",  # evaluate (attack suite, paper tables)
]


def command_group(subparsers, name: str, help: str, description: str):
    """``guardian NAME ACTION ...``: a command with required sub-actions; returns their subparsers."""
    p = subparsers.add_parser(name, help=help, description=description,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="action", metavar="ACTION")
    sub.required = True
    return sub


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="guardian", description="Model-Guardian for served image classifiers")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in FEATURES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    from guardian_plugin.errors import GuardianError

    try:
        return int(args.func(args) or 0)
    except GuardianError as e:
        print(f"guardian {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
