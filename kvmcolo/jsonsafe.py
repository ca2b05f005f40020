"""JSON from outside — a peer before or after authentication, a control
client, a snapshot file — parsed so that nothing it contains can raise
anything but a refusal.

json.loads recurses once per nesting level and raises RecursionError (not
ValueError) on a line of 1,000 '[': a stranger's 4 KiB could kill the
thread that parses it.  loads() turns every failure into JSONRefused (a
ValueError, which every caller already treats as "malformed"), and also
refuses results nested deeper than any kvmcolo message is.
"""

from __future__ import annotations

import json

MAX_DEPTH = 32  # kvmcolo's own messages nest at most 5 deep


class JSONRefused(ValueError):
    pass


def loads(data, max_depth: int = MAX_DEPTH):
    try:
        obj = json.loads(data)
    except RecursionError:
        raise JSONRefused("JSON nested too deeply") from None
    except (ValueError, TypeError) as e:  # JSONDecodeError, UnicodeDecodeError
        raise JSONRefused(f"not JSON: {e}") from None
    if _depth_exceeds(obj, max_depth):
        raise JSONRefused(f"JSON nested deeper than {max_depth} levels")
    return obj


def _depth_exceeds(obj, limit: int) -> bool:
    """Iterative (a recursive walk is what must not happen here)."""
    stack = [(obj, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, dict):
            children = value.values()
        elif isinstance(value, list):
            children = value
        else:
            continue
        if depth > limit:
            return True
        stack.extend((child, depth + 1) for child in children)
    return False
