"""``dlq replay --set PATH=VALUE``: edits made to a dead letter's job before it is replayed."""

from __future__ import annotations

import copy
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["Edit", "apply_edits", "parse_edit"]


@dataclass(frozen=True, slots=True)
class Edit:
    """``--set message.template.name=order_v2``: a dotted path into the job's kwargs."""

    path: tuple[str, ...]
    value: Any

    @property
    def dotted(self) -> str:
        return ".".join(self.path)


def parse_edit(text: str) -> Edit:
    """``PATH=VALUE``; VALUE is JSON if it parses as JSON, else the plain string.

    Raises:
        ValueError: no ``=`` or an empty path segment.
    """
    path, sep, raw = text.partition("=")
    if not sep or not path.strip():
        raise ValueError(f"{text!r} is not PATH=VALUE (e.g. message.template.name=order_v2)")
    parts = tuple(p.strip() for p in path.split("."))
    if any(not p for p in parts):
        raise ValueError(f"{path!r} has an empty segment")
    try:
        value: Any = json.loads(raw)
    except ValueError:
        value = raw
    return Edit(parts, value)


def apply_edits(kwargs: dict[str, Any], edits: Sequence[Edit]) -> dict[str, Any]:
    """A deep copy of ``kwargs`` with each edit applied (lists take integer indexes).

    A missing last key is added; a missing intermediate one is an error (a typo should not
    silently build a new branch).

    Raises:
        ValueError: naming the path that does not fit the job.
    """
    result = copy.deepcopy(kwargs)
    for edit in edits:
        node: Any = result
        for depth, key in enumerate(edit.path):
            last = depth == len(edit.path) - 1
            where = ".".join(edit.path[: depth + 1])
            if isinstance(node, dict):
                if last:
                    node[key] = edit.value
                elif key not in node:
                    raise ValueError(f"{where}: no such field in the job")
                else:
                    node = node[key]
            elif isinstance(node, list):
                if not key.isdigit() or int(key) >= len(node):
                    raise ValueError(f"{where}: not an index of a list of {len(node)}")
                if last:
                    node[int(key)] = edit.value
                else:
                    node = node[int(key)]
            else:
                raise ValueError(f"{where}: {'.'.join(edit.path[:depth])} is not an object")
    return result
