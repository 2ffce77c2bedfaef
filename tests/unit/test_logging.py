"""Unit tests for worker.observability.logging: JSON lines and secret redaction."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import select
from collections.abc import Iterator
from typing import Any

import pytest
import structlog

from worker.connections.amqp import amqp_parameter_list
from worker.errors import ConfigurationError
from worker.observability.logging import (
    REDACTED,
    DirectStream,
    bound_logger,
    configure_logging,
    forget_secrets,
    log_job_line,
    mask_url,
    register_secret,
    resolve_log_format,
    scrub_text,
)

SECRET = "tok-3f9a1c77-secret"
QUIET = ("pika", "httpx", "httpcore", "aiohttp.access")


@pytest.fixture(autouse=True)
def _reset_logging_state() -> Iterator[None]:
    """Forget registered secrets and structlog's configuration after each test."""
    yield
    forget_secrets()
    structlog.reset_defaults()


@contextlib.contextmanager
def json_logging(level: str = "INFO", stream: Any = None) -> Iterator[Any]:
    """configure_logging to ``stream`` (a new StringIO by default), then put the root logger
    back as it was."""
    root = logging.getLogger()
    handlers, root_level = root.handlers[:], root.level
    quiet_levels = {name: logging.getLogger(name).level for name in QUIET}
    stream = stream if stream is not None else io.StringIO()
    try:
        configure_logging(fmt="json", level=level, stream=stream)
        yield stream
    finally:
        root.handlers[:] = handlers
        root.setLevel(root_level)
        for name, value in quiet_levels.items():
            logging.getLogger(name).setLevel(value)


def lines(stream: io.StringIO) -> list[dict[str, Any]]:
    """Every line written so far, each parsed as JSON (fails if one is not JSON)."""
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_structlog_and_stdlib_lines_are_both_json() -> None:
    """Our structlog lines and dramatiq's stdlib lines both come out as JSON objects."""
    with json_logging() as stream:
        structlog.get_logger("verloop_worker.test").info("job", outcome="sent", attempt=1)
        logging.getLogger("dramatiq").warning("consumer %s restarted", "verloop.send")
    ours, theirs = lines(stream)
    assert ours["event"] == "job"
    assert ours["outcome"] == "sent"
    assert ours["attempt"] == 1
    assert ours["level"] == "info"
    assert "timestamp" in ours
    assert theirs["event"] == "consumer verloop.send restarted"
    assert theirs["logger"] == "dramatiq"
    assert theirs["level"] == "warning"


def test_lines_below_the_level_are_dropped() -> None:
    """configure_logging's level filters both kinds of lines."""
    with json_logging(level="WARNING") as stream:
        structlog.get_logger("t").info("quiet")
        logging.getLogger("dramatiq").info("quiet too")
        structlog.get_logger("t").error("loud")
    assert [line["event"] for line in lines(stream)] == ["loud"]


def test_noisy_libraries_are_quietened_to_warning() -> None:
    """httpx and pika info lines (one per request) are not logged."""
    with json_logging(level="DEBUG") as stream:
        logging.getLogger("httpx").info("HTTP Request: POST https://x")
        logging.getLogger("pika").warning("connection lost")
    assert [line["event"] for line in lines(stream)] == ["connection lost"]


def test_a_registered_secret_is_redacted_from_the_event_text() -> None:
    """A registered secret inside the message is replaced by [REDACTED]."""
    register_secret(SECRET)
    with json_logging() as stream:
        structlog.get_logger("t").info(f"fetched token {SECRET} for acme")
        logging.getLogger("dramatiq").info("header was %s", SECRET)
    out = stream.getvalue()
    assert SECRET not in out
    first, second = lines(stream)
    assert first["event"] == f"fetched token {REDACTED} for acme"
    assert second["event"] == f"header was {REDACTED}"


def test_a_registered_secret_is_redacted_in_nested_values() -> None:
    """Secrets inside dicts and lists of an event's values are redacted too."""
    register_secret(SECRET)
    with json_logging() as stream:
        structlog.get_logger("t").info(
            "call", request={"headers": [f"x {SECRET}"], "note": SECRET}, ids=("a", SECRET)
        )
    (line,) = lines(stream)
    assert SECRET not in stream.getvalue()
    assert line["request"] == {"headers": [f"x {REDACTED}"], "note": REDACTED}
    assert line["ids"] == ["a", REDACTED]


def test_a_registered_secret_is_redacted_from_structlog_tracebacks() -> None:
    """An exception logged with structlog's .exception() has the secret removed."""
    register_secret(SECRET)
    with json_logging() as stream:
        try:
            raise RuntimeError(f"Verloop said: bad token {SECRET}")
        except RuntimeError:
            structlog.get_logger("t").exception("send crashed")
    (line,) = lines(stream)
    assert SECRET not in stream.getvalue()
    assert "RuntimeError: Verloop said: bad token [REDACTED]" in line["exception"]


def test_a_registered_secret_is_redacted_from_stdlib_tracebacks() -> None:
    """An exception logged by a library through logging has the secret removed."""
    register_secret(SECRET)
    with json_logging() as stream:
        try:
            raise ValueError(f"oops {SECRET}")
        except ValueError:
            logging.getLogger("dramatiq.worker").exception("actor failed")
    (line,) = lines(stream)
    assert SECRET not in stream.getvalue()
    assert "ValueError: oops [REDACTED]" in line["exception"]


@pytest.mark.parametrize(
    "key",
    ["token", "phone_token", "password", "Authorization", "api_key", "client_secret", "passwd"],
)
def test_values_of_secret_named_keys_are_redacted(key: str) -> None:
    """A key naming a secret has its value replaced, whatever the value is."""
    with json_logging() as stream:
        structlog.get_logger("t").info("call", **{key: "plain-value-not-registered"})
    (line,) = lines(stream)
    assert line[key] == REDACTED
    assert "plain-value-not-registered" not in stream.getvalue()


def test_secret_named_keys_inside_nested_dicts_are_redacted() -> None:
    """A nested {"Authorization": ...} is redacted just like a top-level key."""
    with json_logging() as stream:
        structlog.get_logger("t").info("call", headers={"Authorization": "abc", "Accept": "json"})
    (line,) = lines(stream)
    assert line["headers"] == {"Authorization": REDACTED, "Accept": "json"}


@pytest.mark.parametrize("key", ["token_source", "tokens_fetched", "token_kind"])
def test_keys_that_describe_tokens_are_not_redacted(key: str) -> None:
    """token_source and friends describe a token without holding one, so they are kept."""
    with json_logging() as stream:
        structlog.get_logger("t").info("job", **{key: "redis"})
    (line,) = lines(stream)
    assert line[key] == "redis"


def test_url_passwords_are_masked_in_log_lines() -> None:
    """A password inside a URL is masked, the user and host are kept."""
    with json_logging() as stream:
        structlog.get_logger("t").info(
            "connecting to amqp://u:p@h/%2F", redis="redis://:pw@r:6379/0"
        )
    (line,) = lines(stream)
    assert line["event"] == "connecting to amqp://u:***@h/%2F"
    assert line["redis"] == "redis://:***@r:6379/0"


@pytest.mark.parametrize(
    ("url", "masked"),
    [
        ("amqp://u:p@h", "amqp://u:***@h"),
        ("amqps://guest:guest@rabbit:5671/%2F", "amqps://guest:***@rabbit:5671/%2F"),
        ("redis://:secret@cache:6379/0", "redis://:***@cache:6379/0"),
        ("https://partners.verloop.io/api", "https://partners.verloop.io/api"),
        ("amqp://guest@h/", "amqp://guest@h/"),
        # The last @ of the authority ends the userinfo, as urlsplit (pika, redis-py) reads it.
        ("amqp://u:p@ss@host/", "amqp://u:***@host/"),
        ("amqps://u:p@s:s@w@host:5671/v?heartbeat=5", "amqps://u:***@host:5671/v?heartbeat=5"),
        ("redis://me@corp:pw@cache/0", "redis://me@corp:***@cache/0"),
        ("rediss://:p%40ss%3Aw@cache:6380/0", "rediss://:***@cache:6380/0"),
        # An @ after the authority is not userinfo.
        ("amqp://guest@h/vhost@x", "amqp://guest@h/vhost@x"),
        # Secrets in the query, any case; other parameters kept.
        ("redis://cache/0?password=s3cret", "redis://cache/0?password=***"),
        (
            "rediss://cache:6380/0?ssl_ca_certs=/ca.pem&PassWord=s3&db=1",
            "rediss://cache:6380/0?ssl_ca_certs=/ca.pem&PassWord=***&db=1",
        ),
        (
            "redis://h/0?pass=a&passwd=b&token=c&secret=d",
            "redis://h/0?pass=***&passwd=***&token=***&secret=***",
        ),
        ("redis://u:pw@h/0?password=pw2#frag", "redis://u:***@h/0?password=***#frag"),
        # pika's ssl_options carries a key file's password inside its (URL-encoded) value.
        (
            "amqps://h/?ssl_options=%7B%27password%27%3A+%27kp%27%7D&heartbeat=5",
            "amqps://h/?ssl_options=***&heartbeat=5",
        ),
        # AMQP_URL naming several nodes: each URL is masked on its own.
        (
            "amqp://u:p1@n1:5672/%2F,amqp://u:p2@n2:5672/%2F,amqps://u:p3@n3:5671/%2F",
            "amqp://u:***@n1:5672/%2F,amqp://u:***@n2:5672/%2F,amqps://u:***@n3:5671/%2F",
        ),
        (
            "amqp://u:p,1@n1/v?password=q,amqp://u:p@2,@n2/v, amqp://u:p:3@n3/v",
            "amqp://u:***@n1/v?password=***,amqp://u:***@n2/v, amqp://u:***@n3/v",
        ),
    ],
)
def test_mask_url_hides_only_the_password(url: str, masked: str) -> None:
    """mask_url replaces the password part of a URL and leaves everything else alone."""
    assert mask_url(url) == masked


def test_url_secrets_inside_text_are_masked_whole() -> None:
    """URLs inside a longer text (an exception's message) lose their whole password, the query
    secret included, and the text around them stays."""
    text = "cannot connect to amqp://u:p@ss:w@rd@h:5672/%2F, then redis://h/0?password=x@y z"
    assert scrub_text(text) == (
        "cannot connect to amqp://u:***@h:5672/%2F, then redis://h/0?password=*** z"
    )


def test_every_node_s_password_is_masked_in_log_lines_and_errors() -> None:
    """A multi-node AMQP_URL in a log line, and in the error for a URL pika cannot read, shows
    no node's password."""
    urls = "amqp://u:pw-one@n1/%2F,amqp://u:pw-two@n2/%2F?ssl_options=broken"
    with json_logging() as stream:
        structlog.get_logger("t").info("connecting", amqp=urls)
    (line,) = lines(stream)
    assert "pw-one" not in json.dumps(line)
    assert "pw-two" not in json.dumps(line)
    with pytest.raises(ConfigurationError) as caught:
        amqp_parameter_list(urls)
    assert "pw-one" not in str(caught.value)
    assert "pw-two" not in str(caught.value)
    assert "AMQP_URL" in str(caught.value)


def test_forget_secrets_stops_redacting_them() -> None:
    """After forget_secrets, a formerly registered value is printed again."""
    register_secret(SECRET)
    assert scrub_text(SECRET) == REDACTED
    forget_secrets()
    assert scrub_text(SECRET) == SECRET


def test_a_longer_secret_containing_a_shorter_one_is_removed_whole() -> None:
    """Overlapping secrets are matched longest first, so no tail of the longer one is left."""
    register_secret("abcdef")
    register_secret("abcdef-123456")
    assert scrub_text("x abcdef-123456 y abcdef") == f"x {REDACTED} y {REDACTED}"


def test_very_short_values_are_not_registered_as_secrets() -> None:
    """Values under six characters are ignored, so ordinary words are not blanked out."""
    register_secret("abc")
    register_secret("")
    register_secret(None)
    assert scrub_text("abc and abcdef") == "abc and abcdef"


def test_auto_format_is_json_when_not_writing_to_a_terminal() -> None:
    """'auto' means JSON for a stream that is not a tty."""
    assert resolve_log_format("auto", io.StringIO()) == "json"


def test_auto_format_is_console_on_a_terminal() -> None:
    """'auto' means console for a stream that is a tty."""

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    assert resolve_log_format("auto", Terminal()) == "console"


@pytest.mark.parametrize("fmt", ["json", "console"])
def test_an_explicit_format_is_kept(fmt: Any) -> None:
    """An explicit json or console format is used whatever the stream is."""
    assert resolve_log_format(fmt, io.StringIO()) == fmt


def test_a_direct_stream_writes_short_lines_to_its_descriptor_and_long_ones_to_the_fallback() -> (
    None
):
    """Lines up to PIPE_BUF go to the file descriptor in one write each (atomic on a pipe);
    a longer one, which a pipe might interleave with another process's, takes the fallback."""
    read_end, write_end = os.pipe()
    fallback = io.StringIO()
    try:
        stream = DirectStream(fallback, fd=write_end)
        short = json.dumps({"event": "job", "outcome": "sent"}) + "\n"
        long = json.dumps({"event": "failed", "traceback": "x" * (select.PIPE_BUF + 1)}) + "\n"
        assert stream.write(short) == len(short)
        stream.write(long)
        assert os.read(read_end, select.PIPE_BUF).decode() == short
        assert fallback.getvalue() == long
        assert stream.fileno() == write_end
        assert not stream.isatty()
    finally:
        os.close(read_end)
        os.close(write_end)


def test_a_direct_stream_falls_back_when_its_descriptor_refuses_the_write() -> None:
    """A closed descriptor loses no line: it goes through the fallback instead."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    os.close(write_end)
    fallback = io.StringIO()
    DirectStream(fallback, fd=write_end).write("line\n")
    assert fallback.getvalue() == "line\n"


def test_json_lines_reach_a_direct_stream_whole() -> None:
    """configure_logging on a DirectStream: each structlog line arrives as one JSON line."""
    read_end, write_end = os.pipe()
    try:
        with json_logging(stream=DirectStream(io.StringIO(), fd=write_end)):
            structlog.get_logger("t").info("job", outcome="sent", to="+919876543210")
        line = os.read(read_end, select.PIPE_BUF).decode()
        assert line.endswith("\n")
        assert json.loads(line)["to"] == "+91******3210"
    finally:
        os.close(read_end)
        os.close(write_end)


def test_the_bound_logger_follows_every_new_configuration() -> None:
    """Bound once per configuration (not per line), it still writes where the latest
    configuration says, redacting as it says."""
    first, second = io.StringIO(), io.StringIO()
    configure_logging("json", "INFO", stream=first)
    bound_logger().info("job", n=1)
    assert bound_logger() is bound_logger()
    configure_logging("json", "WARNING", stream=second)
    register_secret(SECRET)
    bound_logger().info("job", n=2)  # below the new level: not written
    bound_logger().warning("job", n=3, detail=f"token {SECRET}")
    assert [json.loads(line)["n"] for line in first.getvalue().splitlines()] == [1]
    [line] = [json.loads(line) for line in second.getvalue().splitlines()]
    assert (line["n"], line["detail"]) == (3, f"token {REDACTED}")


@pytest.mark.parametrize("level", ["info", "warning", "error"])
def test_the_job_line_is_the_line_structlog_writes_redacted_the_same_way(level: str) -> None:
    """log_job_line's own JSON path writes, key for key and in the same order, what the bound
    logger writes: level, redaction of secrets, URL passwords and phone numbers, nested values,
    and a value orjson cannot encode (repr'd)."""
    register_secret(SECRET)
    fields: dict[str, Any] = {
        "message_id": "m-1",
        "to": "+91******3210",
        "reason": f"Verloop said 401 for token {SECRET} at https://u:pw@verloop.example/x",
        "detail": "sent to +919876543210",
        "phone_token": "abc",
        "metadata": {"order": 7, "api_key": "k", "nested": [f"{SECRET}", "+14155550100"]},
        "attempt": 2,
        "duration_ms": 3.5,
        "odd": object(),
        "logger": "verloop_worker.job",
    }
    lines = []
    for write in (
        lambda: getattr(bound_logger(), level)("job", **dict(fields)),
        lambda: log_job_line(level, dict(fields)),
    ):
        with json_logging() as stream:
            write()
        lines.append(json.loads(stream.getvalue()))
    structlog_line, own_line = lines
    assert own_line.pop("timestamp").endswith("Z")
    structlog_line.pop("timestamp")
    assert list(own_line.items()) == list(structlog_line.items())
    assert own_line["level"] == level
    assert SECRET not in json.dumps(own_line)
    assert "pw@" not in own_line["reason"]
    assert own_line["phone_token"] == REDACTED
    assert own_line["detail"] == "sent to +91******3210"
    assert own_line["odd"].startswith("<object object")


def test_the_job_line_keeps_the_level_and_the_traceback_path() -> None:
    """Below the configured level nothing is written; with a traceback the line goes through
    structlog (format_exc_info), still redacted."""
    register_secret(SECRET)
    with json_logging(level="WARNING") as stream:
        log_job_line("info", {"message_id": "m-1"})
    assert stream.getvalue() == ""
    with json_logging() as stream:
        try:
            raise RuntimeError(f"boom with {SECRET}")
        except RuntimeError as exc:
            log_job_line("error", {"message_id": "m-2"}, exc)
    line = json.loads(stream.getvalue())
    assert line["message_id"] == "m-2"
    assert "RuntimeError" in line["exception"]
    assert SECRET not in stream.getvalue()


def test_the_job_line_follows_structlog_once_it_is_configured_by_someone_else() -> None:
    """After configure_logging, structlog reset (or configured elsewhere): the job line goes
    where structlog now says, not to the stream of the earlier configuration."""
    with json_logging() as first:
        log_job_line("info", {"message_id": "m-1"})
    structlog.reset_defaults()
    second = io.StringIO()
    structlog.configure(logger_factory=structlog.WriteLoggerFactory(file=second))
    try:
        log_job_line("info", {"message_id": "m-2"})
    finally:
        structlog.reset_defaults()
    assert "m-1" in first.getvalue()
    assert "m-2" not in first.getvalue()
    assert "m-2" in second.getvalue()
