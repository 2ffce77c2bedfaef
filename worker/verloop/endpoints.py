"""The one table of Verloop endpoints the worker calls.

Each entry says whether Verloop documents it or we model it (see ``docs/verloop-api.md``), and
every path, method and response key can be corrected from settings (``VERLOOP_ENDPOINTS``)
without a code change, e.g. ``{"send": {"path": "/messages/send"}}``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any, Literal

from worker.errors import ConfigurationError
from worker.settings import EndpointOverride

__all__ = ["DEFAULT_ENDPOINTS", "Endpoint", "pick", "resolve_endpoints"]


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One Verloop call.

    Attributes:
        name: key in the table and in overrides.
        method: HTTP method.
        path: appended to the API base (``{VERLOOP_BASE_URL}{VERLOOP_API_PREFIX}``), or to the
            bare host when ``from_root`` is true (the auth call lives outside the API prefix).
        token: which token goes in ``Authorization``.
        provenance: ``documented`` by Verloop, or ``modeled`` by us.
        response_keys: dotted paths tried in order to find the useful value in the response
            (``messages.0.id``); empty when the whole body is the value.
    """

    name: str
    method: Literal["GET", "POST", "PUT"]
    path: str
    token: Literal["none", "system", "phone"]
    provenance: Literal["documented", "modeled"]
    response_keys: tuple[str, ...] = ()
    from_root: bool = False


DEFAULT_ENDPOINTS: Mapping[str, Endpoint] = {
    e.name: e
    for e in (
        # Documented: POST https://partners.verloop.io/api/v2/auth -> {"system_user_token"}.
        # The older prose says /auth; override the path if a deployment needs it.
        Endpoint(
            "auth", "POST", "/api/v2/auth", "none", "documented", ("system_user_token",), True
        ),
        # Documented (current): GET ?client_id=&phone_id= -> {"token"}.
        Endpoint(
            "get_phone_token",
            "GET",
            "/get_phone_token",
            "system",
            "documented",
            ("token", "phone_number_token"),
        ),
        # Documented (older): POST {"client_id","phone_id"} -> {"phone_number_token"}.
        Endpoint(
            "get_phone_token_legacy",
            "POST",
            "/get_phone_token",
            "system",
            "documented",
            ("phone_number_token", "token"),
        ),
        # Documented to exist; parameters, paging and response fields are not public.
        Endpoint("list_clients", "GET", "/list_clients", "system", "documented"),
        # Modeled: Verloop's messaging API paths and bodies are not public. We assume a
        # Cloud-API-shaped body and accept the usual shapes of a message id in the answer.
        Endpoint(
            "send",
            "POST",
            "/send_message",
            "phone",
            "modeled",
            ("messages.0.id", "message_id", "messageId", "id", "data.message_id", "wamid"),
        ),
    )
}


def resolve_endpoints(overrides: Mapping[str, EndpointOverride]) -> dict[str, Endpoint]:
    """The default table with a deployment's corrections applied.

    Raises:
        ConfigurationError: an override names an endpoint that does not exist.
    """
    table = dict(DEFAULT_ENDPOINTS)
    for name, override in overrides.items():
        if name not in table:
            raise ConfigurationError(
                f"VERLOOP_ENDPOINTS names unknown endpoint {name!r}; known: {', '.join(table)}"
            )
        changes = override.model_dump(exclude_none=True)
        table[name] = replace(table[name], **changes)
    return table


def pick(body: Any, paths: tuple[str, ...]) -> Any:
    """The value at the first dotted path that exists in ``body`` (list indexes allowed)."""
    for path in paths:
        node = body
        for part in path.split("."):
            if isinstance(node, dict) and part in node:
                node = node[part]
            elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
                node = node[int(part)]
            else:
                break
        else:
            if node is not None:
                return node
    return None
