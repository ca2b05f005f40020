"""Argument types for the command lines (cli, demo): values that validate
are values that work."""

from __future__ import annotations

import argparse
import math


def number(kind, low: float, high: float, unit: str = ""):
    """An argparse type: a finite `kind` (int or float) in [low, high];
    anything else (nan, inf, 1e13, words) is a usage error, never a value
    that breaks later."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a{'n integer' if kind is int else ' number'}")
        if not math.isfinite(value) or not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{text} is outside {_show(low)}..{_show(high)}{unit}")
        return value

    parse.__name__ = kind.__name__
    return parse


def _show(x: float) -> str:
    return f"{int(x):,}" if float(x).is_integer() else f"{x:g}"
