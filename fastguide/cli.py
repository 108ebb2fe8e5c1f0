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
    "fastguide.commands.serve",
    "fastguide.commands.train",
    "fastguide.commands.build_table",
    "fastguide.commands.table_info",
    "fastguide.commands.toy",
    "fastguide.commands.export_onnx",
]


class UsageError(Exception):
    """A user error the CLI reports as one line and a non-zero exit."""


class OneLineErrorParser(argparse.ArgumentParser):
    """argparse with usage errors as one line (``fastguide sample: error: argument --steps: ...``) and exit 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrorParser(prog="fastguide", description="Fast, tested guided diffusion sampling.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).add_parser(sub)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, or a usage error already printed as one line
        return int(e.code or 0)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print(f"fastguide {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # stdout closed early (`fastguide table-info T | head -1`)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the exit-time flush cannot fail too
        print(f"fastguide {args.command}: error: output closed before the command finished", file=sys.stderr)
        return 1
    except (UsageError, ValueError, TypeError, OSError) as e:  # bad input, unreadable or unwritable files
        return _report(args.command, e, 2)
    except Exception as e:  # noqa: BLE001 - anything else still ends in one line (FASTGUIDE_DEBUG=1: traceback)
        return _report(args.command, e, 1, f"{type(e).__name__}: ")


def _report(command: str, error: Exception, code: int, prefix: str = "") -> int:
    if os.environ.get("FASTGUIDE_DEBUG"):
        raise error
    lines = str(error).strip().splitlines() or [type(error).__name__]
    more = " (FASTGUIDE_DEBUG=1 shows the traceback)" if code == 1 else ""
    print(f"fastguide {command}: error: {prefix}{lines[0]}{more}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
