"""JSON from outside, parsed with limits on size and nesting: never a RecursionError, never NaN.

Python's ``json`` recurses once per nesting level, so a REGISTER whose profile nests a
few thousand brackets deep raised RecursionError out of the server's handler. We parse
with pydantic-core's JSON parser (already a dependency through pydantic: Rust, linear
time, its own recursion guard at about 200 levels, ``allow_inf_nan=False``), then check
the depth we allow, iteratively. Every failure is a :class:`JsonLimitError` with one line.
"""

from __future__ import annotations

from typing import Any

import pydantic_core

DEFAULT_MAX_DEPTH = 32


class JsonLimitError(ValueError):
    """JSON that is malformed, too large or too deeply nested; the message is one line."""


def load_bounded_json(
    data: bytes | str, *, max_bytes: int, max_depth: int = DEFAULT_MAX_DEPTH, what: str = "JSON"
) -> Any:
    size = len(data)
    if size > max_bytes:
        raise JsonLimitError(f"{what} of {size} bytes exceeds the limit of {max_bytes}")
    try:
        value = pydantic_core.from_json(data, allow_inf_nan=False)
    except ValueError as exc:
        raise JsonLimitError(f"{what} is not valid JSON: {str(exc).splitlines()[0][:200]}") from None
    depth = json_depth(value)
    if depth > max_depth:
        raise JsonLimitError(f"{what} nests {depth} levels deep; at most {max_depth} are allowed")
    return value


def json_depth(value: Any) -> int:
    """Nesting depth of parsed JSON (a scalar is 0, ``[]`` is 1), without recursion."""
    deepest = 0
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            depth += 1
            stack.extend((child, depth) for child in item.values())
        elif isinstance(item, list):
            depth += 1
            stack.extend((child, depth) for child in item)
        deepest = max(deepest, depth)
    return deepest
