"""Reading ``list_clients`` answers, whose shape Verloop does not publish (docs/verloop-api.md).

Accepted: a list of client objects, or an object holding one (under ``clients``, ``data``,
``results`` or its first list). A client's id is ``client_id``, ``id`` or ``clientId``; its
numbers are ``phone_ids``, ``phones``, ``phone_numbers`` or ``numbers``: strings, or objects
with ``phone_id`` / ``id``. Anything else is skipped, never guessed at.
"""

from __future__ import annotations

from typing import Any, TypedDict

__all__ = ["ClientPhones", "client_phones"]

_LIST_KEYS = ("clients", "data", "results")
_ID_KEYS = ("client_id", "id", "clientId")
_PHONE_LIST_KEYS = ("phone_ids", "phones", "phone_numbers", "numbers")
_PHONE_ID_KEYS = ("phone_id", "id", "phoneId")


class ClientPhones(TypedDict):
    client_id: str
    phone_ids: list[str]


def _first(obj: dict[str, Any], keys: tuple[str, ...]) -> Any:
    for key in keys:
        if key in obj:
            return obj[key]
    return None


def _client_list(body: Any) -> list[Any]:
    if isinstance(body, list):
        return body
    if isinstance(body, dict):
        found = _first(body, _LIST_KEYS)
        if isinstance(found, list):
            return found
        for value in body.values():
            if isinstance(value, list):
                return value
    return []


def _phone_id(item: Any) -> str | None:
    if isinstance(item, str | int) and not isinstance(item, bool):
        return str(item)
    if isinstance(item, dict):
        value = _first(item, _PHONE_ID_KEYS)
        if isinstance(value, str | int) and not isinstance(value, bool):
            return str(value)
    return None


def client_phones(body: Any) -> list[ClientPhones]:
    """Every client in a ``list_clients`` answer with the ids of its numbers."""
    clients: list[ClientPhones] = []
    for entry in _client_list(body):
        if not isinstance(entry, dict):
            continue
        client_id = _first(entry, _ID_KEYS)
        if not isinstance(client_id, str | int) or isinstance(client_id, bool):
            continue
        phones = _first(entry, _PHONE_LIST_KEYS)
        ids = [p for p in map(_phone_id, phones if isinstance(phones, list) else []) if p]
        clients.append({"client_id": str(client_id), "phone_ids": ids})
    return clients
