"""What every value of a job must be, wherever it nests: something the log line's and the
event's encoder (orjson) can write, and Verloop can read as JSON.

Bodies from RabbitMQ are JSON already (:mod:`worker.jobs.wire` refuses NaN, 1e400 and lone
surrogates), but kwargs also come from the Python producer API and campaign files, and any
JSON can nest too deeply or hold an integer beyond 64 bits: :func:`check_json_limits` runs
before a job's model (:func:`worker.jobs.registry.parse_job`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

__all__ = ["MAX_JSON_DEPTH", "check_json_limits"]

#: How deeply a job's kwargs may nest (objects and arrays). A Cloud API message needs a few
#: levels; the log line's and the event's encoder stops at 254.
MAX_JSON_DEPTH = 32
#: The integers the log line's and the event's encoder (orjson) can write.
_INT_RANGE = (-(2**63), 2**64 - 1)


def check_json_limits(value: Any, where: str = "") -> None:
    """Make sure ``value`` can go everywhere a job's values go (the log line and the event are
    written by orjson; Verloop gets JSON).

    Raises:
        ValueError: naming the first place that nests more than :data:`MAX_JSON_DEPTH` levels,
            holds an integer outside 64 bits, a number that is not finite, a string that is not
            text (a lone surrogate) or a value that is not JSON. Values are not echoed.
    """
    if type(value) is dict and _plainly_within_limits(value, 0):
        return
    _walk_json_limits(value, where)


def _walk_json_limits(value: Any, where: str) -> None:
    """:func:`check_json_limits` by a walk that names the place of the first value it refuses."""
    stack: list[tuple[Any, str, int]] = [(value, where, 0)]
    while stack:
        node, path, depth = stack.pop()
        if isinstance(node, str):
            _check_text(node, path)
        elif isinstance(node, dict | list | tuple):
            if depth >= MAX_JSON_DEPTH:
                raise ValueError(f"{_short(path)}: nested more than {MAX_JSON_DEPTH} levels deep")
            if isinstance(node, dict):
                for key, item in node.items():
                    if not isinstance(key, str):
                        raise ValueError(f"{_short(path)}: object keys must be strings")
                    _check_text(key, path)
                    stack.append((item, f"{path}.{key}" if path else key, depth + 1))
            else:
                stack.extend((item, f"{path}.{i}", depth + 1) for i, item in enumerate(node))
        elif node is None or isinstance(node, bool):
            continue
        elif isinstance(node, int):
            if not _INT_RANGE[0] <= node <= _INT_RANGE[1]:
                raise ValueError(
                    f"{path}: an integer of {len(str(abs(node)))} digits does not fit in 64 bits; "
                    "send it as a string"
                )
        elif isinstance(node, float):
            if not math.isfinite(node):
                raise ValueError(f"{path}: {node} is not a JSON number")
        else:
            raise ValueError(f"{path}: a {type(node).__name__} is not a JSON value")


def _plainly_within_limits(node: dict[Any, Any] | list[Any], depth: int) -> bool:
    """True if ``node`` is certainly within :func:`check_json_limits`' limits: the common case,
    told without building a path for every value. False when unsure (a subclass, a tuple...):
    the full walk then decides, and names the place."""
    if depth >= MAX_JSON_DEPTH:
        return False
    if type(node) is dict:
        for key in node:
            if type(key) is not str or not (key.isascii() or _is_text(key)):
                return False
        values: Iterable[Any] = node.values()
    else:
        values = node
    for item in values:
        kind = type(item)
        if kind is str:
            if not (item.isascii() or _is_text(item)):
                return False
        elif kind is dict or kind is list:
            if not _plainly_within_limits(item, depth + 1):
                return False
        elif item is None or kind is bool:
            continue
        elif kind is int:
            if not _INT_RANGE[0] <= item <= _INT_RANGE[1]:
                return False
        elif kind is not float or not math.isfinite(item):
            return False
    return True


def _is_text(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _short(path: str) -> str:
    return path[:60] + "..." if len(path) > 63 else path or "job"


def _check_text(text: str, path: str) -> None:
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError(
                f"{_short(path)}: has a lone UTF-16 surrogate, which is not text"
            ) from None
