"""`ekg models`: the architectures and pretrained checkpoints."""

from __future__ import annotations

import argparse
from typing import Any


def add_parser(sub: Any) -> None:
    p = sub.add_parser("models", help="list architectures and pretrained checkpoints")
    p.set_defaults(func=cmd_models)


def cmd_models(args: argparse.Namespace) -> int:
    from ..models import model_names
    from ..pretrained import PRETRAINED

    print("architectures (ekg train --arch):")
    print("  " + ", ".join(model_names()))
    print("pretrained (--model NAME):")
    for p in PRETRAINED.values():
        print(f"  {p.name:24s} {p.description}; {p.expected_top1}% on the exact CIFAR-10 test subset")
    return 0
