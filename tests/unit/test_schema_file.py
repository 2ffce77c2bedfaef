"""The checked-in JSON Schema of jobs matches the models it is generated from."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from worker.jobs.registry import jobs_json_schema

SCHEMA_FILE = Path(__file__).resolve().parents[2] / "config" / "jobs.schema.json"


@pytest.fixture(scope="module")
def schema() -> dict[str, Any]:
    """The schema as checked in."""
    loaded: dict[str, Any] = json.loads(SCHEMA_FILE.read_text(encoding="utf-8"))
    return loaded


def test_the_schema_file_is_exactly_what_the_schema_command_writes() -> None:
    """config/jobs.schema.json is up to date: regenerate it with `verloop-worker schema`."""
    expected = json.dumps(jobs_json_schema(), indent=2) + "\n"
    assert SCHEMA_FILE.read_text(encoding="utf-8") == expected


@pytest.mark.parametrize(
    ("actor", "queue"),
    [
        ("send_message", "verloop.send"),
        ("list_clients", "verloop.manage"),
        ("refresh_phone_token", "verloop.manage"),
        ("refresh_client_tokens", "verloop.manage"),
    ],
)
def test_the_schema_lists_each_actor_with_its_queue(
    schema: dict[str, Any], actor: str, queue: str
) -> None:
    """Every actor the worker runs is in the schema with the queue to publish it to."""
    assert schema["actors"][actor]["queue"] == queue
    assert schema["actors"][actor]["kwargs"]["type"] == "object"


def test_the_schema_lists_no_other_actors(schema: dict[str, Any]) -> None:
    """The schema describes exactly the five public actors."""
    assert set(schema["actors"]) == {
        "send_message",
        "list_clients",
        "refresh_phone_token",
        "refresh_client_tokens",
        "record_statuses",
    }


def test_send_message_kwargs_forbid_unknown_fields(schema: dict[str, Any]) -> None:
    """SendMessageJob has additionalProperties false, so producers catch misspelt fields."""
    kwargs = schema["actors"]["send_message"]["kwargs"]
    assert kwargs["title"] == "SendMessageJob"
    assert kwargs["additionalProperties"] is False
    assert set(kwargs["required"]) == {"client_id", "phone_id", "to", "message"}


def test_the_schema_declares_draft_2020_12(schema: dict[str, Any]) -> None:
    """The schema names the JSON Schema dialect it is written in."""
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
