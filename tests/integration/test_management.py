"""Management jobs from the shell: `clients` and `tokens` run by a worker, results as events."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from click.testing import CliRunner

from tests.integration.conftest import AMQP_URL, REDIS_URL, Simulator, redis_client
from worker.commands.main import cli
from worker.runtime.app import WorkerApp

ENV = {"AMQP_URL": AMQP_URL, "REDIS_URL": REDIS_URL}


def run(*args: str) -> Any:
    return CliRunner().invoke(cli, list(args), env=ENV)


def test_clients_lists_the_partner_s_clients_and_numbers(
    simulator: Simulator, start_worker: Callable[..., WorkerApp]
) -> None:
    simulator.phone_token("acme", "phone-1")
    simulator.phone_token("acme", "phone-2")
    start_worker()
    result = run("clients")
    assert result.exit_code == 0, result.output
    assert "acme: " in result.output
    assert "phone-1" in result.output
    assert "phone-2" in result.output


def test_tokens_refresh_for_a_client_refreshes_every_number_and_prints_no_token(
    simulator: Simulator, start_worker: Callable[..., WorkerApp]
) -> None:
    old = [simulator.phone_token("acme", p) for p in ("phone-1", "phone-2")]
    start_worker()
    result = run("tokens", "refresh", "--client-id", "acme")
    assert result.exit_code == 0, result.output
    assert "acme/phone-1: refreshed" in result.output
    assert "acme/phone-2: refreshed" in result.output
    cache = redis_client(REDIS_URL, decode_responses=True)
    keys = sorted(cache.scan_iter("verloop:token:phone:4:acme:*"))
    assert keys == ["verloop:token:phone:4:acme:7:phone-1", "verloop:token:phone:4:acme:7:phone-2"]
    listed = run("tokens", "list", "--client-id", "acme")
    assert "acme/phone-1: cached, expires in" in listed.output
    for token in [*old, *(simulator.phone_token("acme", p) for p in ("phone-1", "phone-2"))]:
        assert token not in result.output
        assert token not in listed.output


def test_refreshing_an_unknown_client_says_why(
    simulator: Simulator, start_worker: Callable[..., WorkerApp]
) -> None:
    start_worker()
    result = run("tokens", "refresh", "--client-id", "nobody", "--timeout", "20")
    assert result.exit_code == 1
    assert "no client 'nobody'" in result.output


def test_without_a_running_worker_the_command_says_so_instead_of_hanging(
    simulator: Simulator,
) -> None:
    result = run("clients", "--timeout", "0.5")
    assert result.exit_code == 1
    assert "no worker answered within 0.5s" in result.output
    assert "verloop.manage" in result.output


def test_a_timeout_says_the_job_was_published_and_where_to_look_not_that_it_stays_queued(
    simulator: Simulator,
) -> None:
    """Without an outcome all that is known is that the job went out: a worker may yet run it,
    or have run it with its event arriving late."""
    result = run("tokens", "refresh", "--client-id", "acme", "--timeout", "0.5")
    assert result.exit_code == 1
    assert "stays queued" not in result.output
    text = " ".join(result.output.split())
    assert "refresh_client_tokens job" in text
    assert "published to verloop.manage" in text
    assert "may still run, or may have run" in text
    assert "outcome event" in text
    assert "worker's log" in text
    message_id = text.split("refresh_client_tokens job ", 1)[1].split()[0]
    assert len(message_id) == 36  # the job's message id, to find its event or log line
