"""Argument types for the command lines (cli, demo): values that validate
are values that work."""

from __future__ import annotations

import argparse
import math
import socket

from kvmcolo.errors import UserError


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


def address(text: str, option: str) -> tuple[str, int]:
    """HOST:PORT, the host resolved once now: a name that does not resolve
    is a mistake to report at once, not a peer to wait 60 s for.  UserError
    names `option` (the command line's, or a control command's)."""
    host, sep, port = (text if isinstance(text, str) else "").rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise UserError(f"{option} needs HOST:PORT, got {text!r}")
    host = host.strip("[]") or "0.0.0.0"
    try:
        socket.getaddrinfo(host, int(port), type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise UserError(f"{option}: cannot resolve {host!r}: {e.strerror}")
    return host, int(port)


def _show(x: float) -> str:
    return f"{int(x):,}" if float(x).is_integer() else f"{x:g}"
