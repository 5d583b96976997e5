"""Strict number parsing for flags.

Python's ``float()`` accepts ``nan``, ``inf`` and digit-group underscores (``1_0`` is 10), and
``int()`` the underscores too: none of them is a value any flag here means. ``harden_numbers``
swaps the ``int`` / ``float`` types of a parser's flags (sub-commands included) for the strict
ones below, so a bad value is refused while the arguments are parsed, before a model loads.
"""

import argparse
import math
import re

_INT = re.compile(r"[+-]?\d+")
_FLOAT = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")


def parse_int(text: str) -> int:
    if not _INT.fullmatch(str(text).strip()):
        raise ValueError(f"{text!r} is not an integer (digits only, no underscores)")
    return int(text)


def parse_float(text: str) -> float:
    """A finite decimal number; ``nan``, ``inf``, ``1_0`` and hex are refused."""
    if not _FLOAT.fullmatch(str(text).strip()):
        raise ValueError(f"{text!r} is not a finite number (digits, optional . and exponent; no nan, inf or _)")
    value = float(text)
    if not math.isfinite(value):  # 1e999
        raise ValueError(f"{text!r} is not a finite number")
    return value


def _argparse_type(parse):
    def convert(text):
        try:
            return parse(text)
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from None

    convert.__name__ = parse.__name__
    return convert


STRICT_INT = _argparse_type(parse_int)
STRICT_FLOAT = _argparse_type(parse_float)


def harden_numbers(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Give every ``type=int`` / ``type=float`` flag of ``parser`` the strict parser; returns it."""
    for action in parser._actions:
        if action.type is int:
            action.type = STRICT_INT
        elif action.type is float:
            action.type = STRICT_FLOAT
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                harden_numbers(sub)
    return parser
