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


def check_shape(value, shape, where: str = "") -> None:
    """Refuse (JSONRefused) a parsed value that does not have `shape`, so
    code reading it never meets a KeyError, TypeError or AttributeError:

        a type (or tuple of types)   the value is an instance (bool is not an int)
        {"key": shape, ...}          an object with at least these keys
        {str: shape}                 an object whose every value has shape
        [shape]                      a list whose every item has shape

    Keys not named are allowed (newer writers may add them)."""
    if isinstance(shape, (type, tuple)):
        types = shape if isinstance(shape, tuple) else (shape,)
        if not isinstance(value, types) or (isinstance(value, bool) and int in types and bool not in types):
            names = " or ".join("null" if t is type(None) else t.__name__ for t in types)
            raise JSONRefused(f"{where or 'value'} must be {names}, not {type(value).__name__}")
    elif isinstance(shape, list):
        if not isinstance(value, list):
            raise JSONRefused(f"{where or 'value'} must be a list")
        for i, item in enumerate(value):
            check_shape(item, shape[0], f"{where}[{i}]")
    elif str in shape:
        if not isinstance(value, dict):
            raise JSONRefused(f"{where or 'value'} must be an object")
        for key, item in value.items():
            check_shape(item, shape[str], f"{where}.{key}")
    else:
        if not isinstance(value, dict):
            raise JSONRefused(f"{where or 'value'} must be an object")
        for key, sub in shape.items():
            if key not in value:
                raise JSONRefused(f"{where + '.' if where else ''}{key} is missing")
            check_shape(value[key], sub, f"{where + '.' if where else ''}{key}")
