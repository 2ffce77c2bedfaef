"""list_clients answers in the shapes we accept (the real one is not public)."""

from __future__ import annotations

from typing import Any

import pytest

from worker.verloop.client_list import client_phones

ACME = [{"client_id": "acme", "phone_ids": ["p1", "p2"]}]


@pytest.mark.parametrize(
    "body",
    [
        {"clients": [{"client_id": "acme", "phone_ids": ["p1", "p2"]}]},
        [{"id": "acme", "phones": [{"phone_id": "p1"}, {"id": "p2"}]}],
        {"data": [{"clientId": "acme", "numbers": ["p1", "p2"]}]},
        {"whatever": [{"client_id": "acme", "phone_numbers": ["p1", {"phoneId": "p2"}]}]},
    ],
)
def test_accepted_shapes(body: Any) -> None:
    assert client_phones(body) == ACME


@pytest.mark.parametrize(
    "body", [None, "text", 42, {"clients": "no"}, [1, "x", None], [{"name": "no id"}]]
)
def test_anything_else_yields_no_clients_rather_than_guesses(body: Any) -> None:
    assert client_phones(body) == []


def test_a_client_without_numbers_is_listed_with_none() -> None:
    assert client_phones([{"client_id": "solo", "phones": [True, None]}]) == [
        {"client_id": "solo", "phone_ids": []}
    ]
