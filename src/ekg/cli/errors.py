"""Library error messages in the words of the command line.

The library names an argument in backticks: ```epochs``` for a value, ```resume=True``` for a
boolean switch. :func:`flag_text` rewrites each to the flag that sets it:

* ```name``` → the first long option of the parser action whose ``dest`` is ``name``;
* ```name=True``` → the ``store_true`` flag with that dest (or a ``--x/--no-x`` pair's ``--x``);
* ```name=False``` → the ``store_false`` flag with that dest, a ``--x/--no-x`` pair's ``--no-x``,
  or the ``store_true`` flag with dest ``no_name`` (``adapt=False`` → ``--no-adapt``).

The actions of the current command's subparser are searched first, then every other command's.
:data:`ALIASES` names the library arguments whose dest differs (``weight_decay`` → ``wd``). A name
with no flag is printed bare, without its backticks.
"""

from __future__ import annotations

import argparse
import re

# library argument (SearchConfig / TrainConfig field, function parameter) → the dest of its flag
ALIASES = {
    "weight_decay": "wd",                   # TrainConfig
    "warmup_epochs": "warmup",
    "flip=False": "no_flip=True",           # AugmentConfig
    "seed": "search_seed",                  # SearchConfig (where the command has no --seed of its own)
    "cache_gb": "search_cache_gb",
    "fast=False": "straightforward=True",
    "adapt=False": "no_adapt=True",
    "bn_mode": "bn",                        # ekg.evaluate.evaluate
    "topk": "bank_topk",                    # ekg.bank
    "fmt": "format",                        # ekg.export
    "mode": "data_mode",                    # ekg.data.load_data
}

_NAME = re.compile(r"`([A-Za-z_][A-Za-z0-9_]*)(?:=(True|False))?`")


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _long(action: argparse.Action, negative: bool | None = None) -> str:
    opts = [o for o in action.option_strings if o.startswith("--")] or list(action.option_strings)
    if negative is not None:
        opts = [o for o in opts if o.startswith("--no-") == negative] or opts
    return opts[0]


def _flag(parser: argparse.ArgumentParser, name: str, value: str | None) -> str | None:
    """The flag of ``parser`` that sets ``name`` (to ``value``: "True", "False" or None for a value)."""
    for action in parser._actions:
        if not action.option_strings:
            continue
        boolean_pair = isinstance(action, argparse.BooleanOptionalAction)
        if action.dest == name:
            if value is None:
                return _long(action)
            if boolean_pair:
                return _long(action, negative=value == "False")
            if value == "True" and isinstance(action, argparse._StoreTrueAction):
                return _long(action)
            if value == "False" and isinstance(action, argparse._StoreFalseAction):
                return _long(action)
        elif value == "False" and action.dest == f"no_{name}" and isinstance(action, argparse._StoreTrueAction):
            return _long(action)
    return None


def flag_for(parser: argparse.ArgumentParser, token: str, command: str | None = None) -> str | None:
    """The flag for the library argument ``token`` (``epochs``, ``resume=True``), or None."""
    subs = _subparsers(parser)
    order = ([subs[command]] if command in subs else []) + [p for c, p in subs.items() if c != command] + [parser]
    candidates = [token] + ([ALIASES[token]] if token in ALIASES else [])
    for p in order:
        for cand in candidates:
            name, _, value = cand.partition("=")
            flag = _flag(p, name, value or None)
            if flag is not None:
                return flag
    return None


def flag_text(message: str, parser: argparse.ArgumentParser, command: str | None = None) -> str:
    """``message`` with each backticked library argument replaced by its flag (or its bare name)."""
    def replace(m: re.Match[str]) -> str:
        token = m.group(0)[1:-1]
        return flag_for(parser, token, command) or token

    return _NAME.sub(replace, message)
