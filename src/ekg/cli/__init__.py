"""The ``ekg`` command line: a thin layer over the Python API.

Every user error is one line on stderr (``ekg: error: ...``) and a non-zero exit; nothing is left
half-written. ``EKG_DEBUG=1`` shows tracebacks of unexpected errors. Library messages name their
arguments in backticks; :mod:`ekg.cli.errors` prints each as its flag.

One module per command (``add_parser(sub)`` registers its flags and handler); the argument
groups several commands share are in :mod:`ekg.cli.common`.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from typing import NoReturn, Sequence

from ..errors import EkgError
from . import convert, export, finetune, info, landscape, models, prune, run, study, test, train
from .errors import flag_text

EXIT_ERROR = 1
EXIT_USAGE = 2  # argparse's status for a command line it cannot parse
EXIT_INTERRUPTED = 130

# in the order `ekg --help` lists them
COMMANDS = (test, info, convert, train, finetune, prune, run, export, landscape, study, models)

# commands that split their work over the processes of a torchrun launch
DISTRIBUTED = ("train", "finetune", "prune", "run")


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors (an invalid choice, a bad number, a missing flag) are one line,
    like every other ekg error, with the command's --help named instead of its usage printed.
    Its subparsers are Parsers too (argparse makes them of the parent's class)."""

    def error(self, message: str) -> NoReturn:  # type: ignore[override]
        message = " ".join(message.split())
        m = re.fullmatch(r"argument (--[\w-]+)(?:/[-\w]+)*: expected (?:one|\d+) arguments?", message)
        if m:  # e.g. --wd -1e-4: argparse takes a value that starts with '-' for a flag
            message += f"; write a value that starts with '-' as {m.group(1)}=VALUE"
        self.exit(EXIT_USAGE, f"ekg: error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__

    parser = Parser(prog="ekg", description="Filter pruning of pretrained CNNs with EKG.")
    parser.add_argument("--version", action="version", version=f"ekg {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        command.add_parser(sub)
    return parser


def _subparser(parser: argparse.ArgumentParser, command: str) -> argparse.ArgumentParser:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action.choices[command]
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from ..distributed import Dist, init_distributed, shutdown

    parser = build_parser()
    try:
        args, extra = parser.parse_known_args(argv)
        if extra:  # named with the command they were given to, not the top-level parser
            _subparser(parser, args.command).error(f"unrecognized arguments: {' '.join(extra)}")
    except SystemExit as e:  # --help, --version (0) or a command line argparse refused (one line printed)
        return e.code if isinstance(e.code, int) else EXIT_USAGE
    args.dist = Dist()
    try:
        if args.command in DISTRIBUTED:
            args.dist = init_distributed(args.device)
        return args.func(args)
    except EkgError as e:
        print(f"ekg: error: {flag_text(str(e), parser, args.command)}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("ekg: interrupted; finished work is saved (re-run with --resume where the command has it)",
              file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as e:  # an ekg bug or an environment problem: still one line, unless debugging
        if os.environ.get("EKG_DEBUG"):
            raise
        print(f"ekg: internal error: {type(e).__name__}: {e} (set EKG_DEBUG=1 for the traceback)", file=sys.stderr)
        return EXIT_ERROR
    finally:
        shutdown(args.dist)

