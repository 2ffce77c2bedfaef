"""``verloop-worker dlq``: real dead letters made by a running worker, read, replayed, purged
and exported through the real command (click's CliRunner runs it in-process)."""

from __future__ import annotations

import base64
import json
import os
import stat
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pika
import pytest
from click.testing import CliRunner, Result

from tests.integration.conftest import (
    AMQP_URL,
    REDIS_URL,
    Simulator,
    queue_depth,
    redis_client,
    wait_until,
)
from worker.commands.dlq import dlq
from worker.connections.redis_keys import join_parts
from worker.jobs.producer import Producer, encode_job
from worker.runtime.app import WorkerApp, create_app
from worker.send.ledger import Ledger, LedgerKey
from worker.settings import Settings

TO_A = "+919876543210"
TO_B = "+919876543211"
UNDECODABLE = b"\xff\xfe not a job \x00"
BAD_TEMPLATE = {
    "type": "template",
    "template": {"name": "Order-V2", "language": {"code": "en_US"}, "components": []},
}


def run(*args: str, input: str | None = None) -> Result:
    """The real ``dlq`` command, aimed at the test vhost and Redis db."""
    env = {"AMQP_URL": AMQP_URL, "REDIS_URL": REDIS_URL, "VERLOOP_WORKER_ENV_FILE": ""}
    return CliRunner().invoke(dlq, list(args), env=env, input=input, catch_exceptions=False)


def listed(*args: str) -> list[dict[str, Any]]:
    result = run("list", "--json", *args)
    assert result.exit_code == 0, result.output
    # The in-process worker logs to the same stdout CliRunner captures: keep the JSON lines.
    return [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]


def publish_raw(queue: str, body: bytes) -> None:
    connection = pika.BlockingConnection(pika.URLParameters(AMQP_URL))
    channel = connection.channel()
    channel.confirm_delivery()
    channel.basic_publish(
        exchange="",
        routing_key=queue,
        body=body,
        properties=pika.BasicProperties(delivery_mode=2, content_type="application/json"),
        mandatory=True,
    )
    connection.close()


def xq_depth() -> int:
    return queue_depth("verloop.send.XQ")


@pytest.fixture
def letters(
    simulator: Simulator, producer: Producer, start_worker: Callable[..., WorkerApp]
) -> dict[str, str]:
    """Three real dead letters in verloop.send.XQ, made by a running worker (left running):
    ``failed`` (a permanent 400 from Verloop), ``invalid`` (a bad template name) and
    ``undecodable`` (bytes that are not a job). Returns their ids."""
    simulator.script(
        {
            "status": 400,
            "body": {"error": {"code": 131026, "message": "Message undeliverable"}},
            "count": 1,
        }
    )
    start_worker()
    failed = producer.send_message(
        client_id="acme",
        phone_id="phone-1",
        to=TO_A,
        message={"type": "text", "text": {"body": "Your code is 4711"}},
        idempotency_key="otp-4711",
    )
    wait_until(lambda: xq_depth() == 1)
    invalid = str(uuid.uuid4())
    kwargs = {"client_id": "acme", "phone_id": "phone-2", "to": TO_B, "message": BAD_TEMPLATE}
    publish_raw(
        "verloop.send",
        encode_job("send_message", kwargs, queue="verloop.send", message_id=invalid),
    )
    publish_raw("verloop.send", UNDECODABLE)
    wait_until(lambda: xq_depth() == 3)
    [undecodable] = [e["id"] for e in listed() if e["actor"] == "verloop.undecodable"]
    return {"failed": failed, "invalid": invalid, "undecodable": undecodable}


def by_id(entries: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {e["id"]: e for e in entries}


# --- list -----------------------------------------------------------------------------------------
def test_list_shows_each_dead_letter_with_its_reason_and_masked_recipient_and_keeps_them(
    letters: dict[str, str],
) -> None:
    first = listed()
    entries = by_id(first)
    assert set(entries) == set(letters.values())
    failed = entries[letters["failed"]]
    assert failed["outcome"] == "failed"
    assert "Message undeliverable" in failed["reason"]
    assert (failed["http_status"], failed["code"], failed["attempts"]) == (400, "131026", 1)
    assert (failed["client_id"], failed["phone_id"]) == ("acme", "phone-1")
    assert failed["to"] == "+91******3210"
    assert failed["age_s"] is not None
    assert 0 <= failed["age_s"] < 60
    invalid = entries[letters["invalid"]]
    assert invalid["outcome"] == "invalid"
    assert "message.template.name" in invalid["reason"]
    undecodable = entries[letters["undecodable"]]
    assert undecodable["undecodable"] is True
    assert "not UTF-8" in undecodable["reason"]
    assert undecodable["size"] == len(UNDECODABLE)

    table = run("list")
    assert table.exit_code == 0
    assert "+91******3210" in table.stdout
    assert "+91******3211" in table.stdout
    assert TO_A not in table.stdout
    assert TO_B not in table.stdout
    assert "3 of 3 dead letters match" in table.stdout
    # Listing took nothing away and kept the order.
    assert xq_depth() == 3
    assert [e["id"] for e in listed()] == [e["id"] for e in first]


def test_list_filters_by_reason_outcome_client_number_age_and_id(
    letters: dict[str, str],
) -> None:
    def ids(*args: str) -> set[str]:
        return {e["id"] for e in listed(*args)}

    assert ids("--reason", "UNDELIVERABLE") == {letters["failed"]}
    assert ids("--outcome", "invalid") == {letters["invalid"], letters["undecodable"]}
    assert ids("--phone-id", "phone-2") == {letters["invalid"]}
    assert ids("--client-id", "acme") == {letters["failed"], letters["invalid"]}
    assert ids("--client-id", "someone-else") == set()
    assert ids("--to", TO_A) == {letters["failed"]}
    assert ids("--newer-than", "1h") == set(letters.values())
    assert ids("--older-than", "1h") == set()
    assert ids("--id", letters["invalid"], "--id", letters["failed"]) == {
        letters["invalid"],
        letters["failed"],
    }
    assert ids("--queue", "manage") == set()
    assert xq_depth() == 3


def test_a_dead_letter_rabbitmq_made_itself_is_listed_with_no_reason_recorded(
    make_settings: Callable[..., Settings],
) -> None:
    """A job rejected without our header (e.g. nacked by dramatiq) is listed all the same."""
    job_id = rejected_by_rabbitmq(make_settings)

    [entry] = listed("--reason", "no reason")
    assert entry["id"] == job_id
    assert entry["reason"] == "no reason recorded"
    assert entry["outcome"] == "unknown"
    assert entry["to"] == "+91******3210"
    assert entry["age_s"] is not None  # from RabbitMQ's x-death
    assert xq_depth() == 1


# --- show -----------------------------------------------------------------------------------------
def test_show_prints_the_header_and_the_job_with_the_recipient_masked(
    letters: dict[str, str],
) -> None:
    result = run("show", letters["failed"])
    assert result.exit_code == 0, result.output
    shown = json.loads(result.stdout)
    assert shown["header"]["outcome"] == "failed"
    assert shown["header"]["code"] == "131026"
    assert shown["body"]["kwargs"]["to"] == "+91******3210"
    assert shown["body"]["kwargs"]["idempotency_key"] == "otp-4711"
    assert TO_A not in result.stdout

    undecodable = run("show", letters["undecodable"][:8])
    assert undecodable.exit_code == 0
    assert "base64" in json.loads(undecodable.stdout)["body"]

    missing = run("show", "no-such-dead-letter")
    assert missing.exit_code == 1
    assert "no dead letter" in missing.output
    assert xq_depth() == 3


# --- replay ---------------------------------------------------------------------------------------
def test_replay_of_one_sends_it_once_and_removes_only_it(
    simulator: Simulator, letters: dict[str, str]
) -> None:
    dry = run("replay", "--id", letters["failed"], "--dry-run")
    assert dry.exit_code == 0, dry.output
    assert "would_replay" in dry.stdout
    assert xq_depth() == 3

    result = run("replay", "--id", letters["failed"])
    assert result.exit_code == 0, result.output
    assert f"replayed     {letters['failed']} (to +91******3210)" in result.stdout
    [record] = wait_until(simulator.messages)
    assert record["to"] == TO_A
    assert record["idempotency_key"] == "otp-4711"
    assert xq_depth() == 2
    assert letters["failed"] not in by_id(listed())
    assert simulator.send_requests() == 2  # the refused attempt, then the replay


def test_replay_with_set_fixes_a_bad_template_name(
    simulator: Simulator, letters: dict[str, str]
) -> None:
    unchanged = run("replay", "--id", letters["invalid"])
    assert unchanged.exit_code == 1
    assert "invalid, not replayed" in unchanged.stdout
    assert xq_depth() == 3

    fixed = run("replay", "--id", letters["invalid"], "--set", "message.template.name=order_v2")
    assert fixed.exit_code == 0, fixed.output
    assert "with message.template.name set" in fixed.stdout
    [record] = wait_until(simulator.messages)
    assert record["to"] == TO_B
    assert record["body"]["template"]["name"] == "order_v2"
    assert xq_depth() == 2


def test_replay_never_resends_what_the_ledger_says_was_sent(
    simulator: Simulator, letters: dict[str, str]
) -> None:
    ledger = Ledger(redis_client(REDIS_URL, decode_responses=True), ttl_s=3600, lease_s=60)
    # Recorded under the key form of earlier versions: still honoured.
    ledger.mark_sent(LedgerKey("key:acme:otp-4711"), "wamid.sent-before")

    kept = run("replay", "--id", letters["failed"])
    assert kept.exit_code == 1
    assert "already sent (Verloop id wamid.sent-before), not replayed" in kept.stdout
    assert xq_depth() == 3

    dropped = run("replay", "--id", letters["failed"], "--drop-sent")
    assert dropped.exit_code == 0, dropped.output
    assert "dropped" in dropped.stdout
    assert xq_depth() == 2
    assert simulator.send_requests() == 1  # only the original, refused attempt
    assert simulator.messages() == []


def test_an_outcome_unknown_send_is_replayed_only_when_asked(
    simulator: Simulator, letters: dict[str, str]
) -> None:
    ledger = Ledger(redis_client(REDIS_URL, decode_responses=True), ttl_s=3600, lease_s=0.001)
    key = LedgerKey("key:" + join_parts("acme", "otp-4711"))
    assert ledger.claim(key, "a-worker-that-died", take_over_uncertain=False).state == "claimed"
    assert ledger.lookup(key).state == "pending"

    skipped = run("replay", "--id", letters["failed"])
    assert skipped.exit_code == 1
    assert "outcome unknown" in skipped.stdout
    assert xq_depth() == 3

    resent = run("replay", "--id", letters["failed"], "--resend-uncertain")
    assert resent.exit_code == 0, resent.output
    [record] = wait_until(simulator.messages)
    assert record["to"] == TO_A
    # The record follows the send by up to LEDGER_RECORD_CARRY_MS (worker.send.carried).
    wait_until(lambda: ledger.lookup(key).state == "sent")
    assert xq_depth() == 2


def test_undecodable_bodies_are_not_replayed_and_replay_needs_a_selection(
    letters: dict[str, str],
) -> None:
    result = run("replay", "--id", letters["undecodable"])
    assert result.exit_code == 1
    assert "undecodable body: cannot be replayed" in result.stdout
    nothing = run("replay")
    assert nothing.exit_code == 2
    assert "--all" in nothing.output
    assert xq_depth() == 3


# --- purge ----------------------------------------------------------------------------------------
def test_purge_asks_first_and_removes_only_what_matches(letters: dict[str, str]) -> None:
    declined = run("purge", "--outcome", "invalid", input="n\n")
    assert declined.exit_code == 1
    assert "Purge 2 dead letters (2 from verloop.send.XQ)? [y/N]" in declined.output
    assert "nothing purged" in declined.output
    assert xq_depth() == 3

    assert run("purge").exit_code == 2  # neither filters nor --all

    done = run("purge", "--outcome", "invalid", "--yes")
    assert done.exit_code == 0, done.output
    assert "purged 2 dead letters" in done.stdout
    assert [e["id"] for e in listed()] == [letters["failed"]]


# --- export ---------------------------------------------------------------------------------------
def test_export_writes_json_lines_including_undecodable_bodies_and_keeps_the_queue(
    letters: dict[str, str], tmp_path: Path
) -> None:
    output = tmp_path / "dead.jsonl"
    result = run("export", "--output", str(output))
    assert result.exit_code == 0, result.output
    assert "exported 3 dead letters" in result.output
    records = by_id([json.loads(line) for line in output.read_text().splitlines()])
    assert set(records) == set(letters.values())
    raw = records[letters["undecodable"]]
    assert raw["body_encoding"] == "base64"
    assert base64.b64decode(raw["body"]) == UNDECODABLE
    failed = records[letters["failed"]]
    assert failed["body_encoding"] == "text"
    assert json.loads(failed["body"])["kwargs"]["to"] == TO_A  # the export is not masked
    assert failed["header"]["http_status"] == 400
    assert xq_depth() == 3

    removed = tmp_path / "invalid.jsonl"
    moved = run("export", "--outcome", "invalid", "--output", str(removed), "--remove")
    assert moved.exit_code == 0, moved.output
    assert len(removed.read_text().splitlines()) == 2
    assert [e["id"] for e in listed()] == [letters["failed"]]


def rejected_by_rabbitmq(make_settings: Callable[..., Settings]) -> str:
    """One dead letter in verloop.send.XQ (a job rejected without our header); its id."""
    app = create_app(make_settings())
    app.broker.declare_queues_now()
    app.broker.close()
    kwargs = {"client_id": "acme", "phone_id": "phone-1", "to": TO_A, "message": BAD_TEMPLATE}
    job_id = str(uuid.uuid4())
    publish_raw(
        "verloop.send", encode_job("send_message", kwargs, queue="verloop.send", message_id=job_id)
    )
    connection = pika.BlockingConnection(pika.URLParameters(AMQP_URL))
    channel = connection.channel()
    method, _, _ = channel.basic_get("verloop.send")
    channel.basic_reject(method.delivery_tag, requeue=False)
    connection.close()
    wait_until(lambda: xq_depth() == 1)
    return job_id


@pytest.fixture
def umask_022() -> Iterator[None]:
    """The usual umask, under which a plainly created file is readable by everyone."""
    previous = os.umask(0o022)
    yield
    os.umask(previous)


@pytest.mark.usefixtures("umask_022")
def test_the_export_file_is_readable_by_its_owner_only_also_when_it_existed(
    make_settings: Callable[..., Settings], tmp_path: Path
) -> None:
    """The export holds unmasked recipients: mode 0600 for a new file, and a file that existed
    with a looser mode is replaced by a 0600 one (no reader keeps access to the new data)."""
    job_id = rejected_by_rabbitmq(make_settings)
    fresh = tmp_path / "fresh.jsonl"
    result = run("export", "--output", str(fresh))
    assert result.exit_code == 0, result.output
    assert stat.S_IMODE(fresh.stat().st_mode) == 0o600
    assert json.loads(fresh.read_text())["id"] == job_id

    existing = tmp_path / "existing.jsonl"
    existing.write_text("old contents\n")
    existing.chmod(0o644)
    with existing.open() as earlier_reader:
        result = run("export", "--output", str(existing))
        assert result.exit_code == 0, result.output
        assert earlier_reader.read() == "old contents\n"  # it sees the old file, not the export
    assert stat.S_IMODE(existing.stat().st_mode) == 0o600
    assert json.loads(existing.read_text())["body_encoding"] == "text"
    assert TO_A in existing.read_text()  # unmasked, as documented
    assert sorted(p.name for p in tmp_path.iterdir()) == ["existing.jsonl", "fresh.jsonl"]
    assert xq_depth() == 1


@pytest.mark.usefixtures("umask_022")
def test_a_symlink_planted_at_the_export_path_is_replaced_not_followed(
    make_settings: Callable[..., Settings], tmp_path: Path
) -> None:
    """Someone who can write the export's folder plants a link to a file they can read: the
    export does not go into that file; the link is replaced by the export itself."""
    rejected_by_rabbitmq(make_settings)
    target = tmp_path / "attackers-file.txt"
    target.write_text("")
    target.chmod(0o666)
    planted = tmp_path / "dead.jsonl"
    planted.symlink_to(target)
    result = run("export", "--output", str(planted))
    assert result.exit_code == 0, result.output
    assert target.read_text() == ""
    assert not planted.is_symlink()
    assert stat.S_IMODE(planted.stat().st_mode) == 0o600
    assert TO_A in planted.read_text()


def test_an_export_to_a_folder_that_does_not_exist_fails_clearly_and_removes_nothing(
    make_settings: Callable[..., Settings], tmp_path: Path
) -> None:
    """Exit 1 with the path and the reason, no traceback; the dead letter stays queued."""
    rejected_by_rabbitmq(make_settings)
    output = tmp_path / "missing" / "dead.jsonl"
    result = run("export", "--remove", "--all", "--output", str(output))
    assert result.exit_code == 1
    assert f"cannot write {output}: No such file or directory" in result.output
    assert "Traceback" not in result.output
    assert xq_depth() == 1


def test_a_replayed_job_keeps_its_id_and_queue_and_starts_its_retries_afresh(
    simulator: Simulator, producer: Producer, start_worker: Callable[..., WorkerApp]
) -> None:
    """A campaign send that gave up goes back to verloop.campaign with the same message id
    and a full set of retries: failing again costs two more calls, not one."""
    simulator.script({"status": 500, "count": 4})
    start_worker(retry_max_retries=1)
    job_id = producer.send_message(
        client_id="acme",
        phone_id="phone-1",
        to=TO_A,
        message={"type": "text", "text": {"body": "Sale!"}},
        queue="verloop.campaign",
    )
    wait_until(lambda: queue_depth("verloop.campaign.XQ") == 1)
    [entry] = listed("--queue", "campaign")
    assert (entry["id"], entry["outcome"], entry["attempts"]) == (job_id, "gave_up", 2)

    assert run("replay", "--queue", "campaign", "--all").exit_code == 0
    wait_until(lambda: simulator.send_requests() == 4)
    wait_until(lambda: queue_depth("verloop.campaign.XQ") == 1)
    [again] = listed("--queue", "campaign")
    assert (again["id"], again["outcome"], again["attempts"]) == (job_id, "gave_up", 2)

    assert run("replay", "--id", job_id[:8]).exit_code == 0
    [record] = wait_until(simulator.messages)
    assert record["to"] == TO_A
    assert queue_depth("verloop.campaign.XQ") == 0
    assert queue_depth("verloop.send") == 0
    assert simulator.send_requests() == 5
