"""JSON request/response helpers shared by the sandbox's route modules."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, Final

from aiohttp import web

__all__ = [
    "INVALID_JSON",
    "bearer_token",
    "graph_error",
    "json_response",
    "read_json",
    "twirp_error",
]

INVALID_JSON: Final = object()
"""Returned by :func:`read_json` when the body is not valid JSON."""


def json_response(
    status: int, payload: Any, headers: Mapping[str, str] | None = None
) -> web.Response:
    """Build a JSON response (compact separators: this is on the hot path)."""
    return web.Response(
        body=json.dumps(payload, separators=(",", ":")).encode(),
        status=status,
        content_type="application/json",
        headers=headers,
    )


async def read_json(request: web.Request) -> Any:
    """Return the parsed JSON body, or :data:`INVALID_JSON` if it does not parse."""
    raw = await request.read()
    try:
        return json.loads(raw)
    except ValueError:  # includes UnicodeDecodeError and empty bodies
        return INVALID_JSON


def bearer_token(request: web.Request) -> str:
    """Return the token from ``Authorization``: raw, or with a ``Bearer`` prefix."""
    value = request.headers.get("Authorization", "").strip()
    if value[:7].lower() == "bearer ":
        return value[7:].strip()
    return value


def twirp_error(code: str, msg: str) -> dict[str, str]:
    """Return a Twirp-style error body (used by Verloop's auth and token endpoints)."""
    return {"code": code, "msg": msg}


def graph_error(message: str, code: int, *, typed: bool = True) -> dict[str, Any]:
    """Return a Graph-API-style error body (used by the send endpoint)."""
    error: dict[str, Any] = {"message": message, "code": code}
    if typed:
        error["type"] = "OAuthException"
    return {"error": error}
