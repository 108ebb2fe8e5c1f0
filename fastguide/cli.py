"""The one `fastguide` command line. Each subcommand lives in its own module, which provides
``add_parser(subparsers)`` registering a parser whose ``func(args) -> int`` runs it."""
from __future__ import annotations

import argparse
import importlib
import os
import sys

# Subcommand modules, in --help order. Each defines add_parser(subparsers).
COMMAND_MODULES = [
    "fastguide.commands.demo",
    "fastguide.commands.bench",
    "fastguide.commands.sample",
    "fastguide.commands.train",
    "fastguide.commands.build_table",
    "fastguide.commands.table_info",
    "fastguide.commands.toy",
    "fastguide.commands.export_onnx",
]


class UsageError(Exception):
    """A user error the CLI reports as one line and a non-zero exit."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastguide", description="Fast, tested guided diffusion sampling.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).add_parser(sub)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except (UsageError, ValueError, TypeError, FileNotFoundError, PermissionError, IsADirectoryError) as e:
        if os.environ.get("FASTGUIDE_DEBUG"):
            raise
        print(f"fastguide {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"fastguide {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
