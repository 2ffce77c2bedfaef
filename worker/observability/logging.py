"""structlog, configured once per process: JSON by default, console on a terminal.

Every line, dramatiq's, pika's and httpx's included, goes through :func:`redact_secrets`:
secret-named keys, secrets registered with :func:`register_secret`, URL passwords and
secret-named query parameters are removed, and E.164 numbers are masked (``+91******3210``).
"""

from __future__ import annotations

import functools
import logging
import os
import re
import select
import sys
import threading
from collections.abc import Iterable
from typing import Any, Literal
from urllib.parse import unquote_plus

import orjson
import structlog
from structlog.typing import EventDict, Processor, WrappedLogger

from worker.jobs.phones import mask_phone

__all__ = [
    "REDACTED",
    "DirectStream",
    "bound_logger",
    "configure_logging",
    "forget_secrets",
    "log_job_line",
    "mask_url",
    "redact_secrets",
    "register_secret",
    "resolve_log_format",
    "scrub_text",
    "unreadable_url",
]

REDACTED = "[REDACTED]"

# Keys that hold a secret end with one of these words (``phone_token``, ``Authorization``);
# ``token_source`` or ``token_refreshed`` describe a token without holding one.
_SECRET_KEY = re.compile(
    r"(?:^|[_-])(?:token|password|passwd|secret|authorization|api[_-]?key)$", re.I
)
#: A URL: its scheme, then everything up to the next whitespace (parsed by :func:`_mask_match`).
#: A URL ends at whitespace, or where a comma starts the next URL (``AMQP_URL`` may list
#: several nodes, ``amqp://a,amqp://b``: each is masked on its own).
_URL = re.compile(r"[a-z][a-z0-9+.-]*://[^\s,]*(?:,(?!\s*[a-z][a-z0-9+.-]*://)[^\s,]*)*", re.I)
#: Query parameters whose value is a secret (``?password=``, ``ssl_password``, ``token``...).
_SECRET_PARAMETER = re.compile(r"pass|pwd|secret|token|auth|credential|api[_-]?key", re.I)
#: A parameter whose value embeds a secret-named key (pika's ``ssl_options={'password': ...}``).
_SECRET_INSIDE_VALUE = re.compile(r"(?:pass|pwd|secret|token)\w*['\"]?\s*[:=]", re.I)
_MASK = "***"
_E164 = re.compile(r"\+[1-9][0-9]{7,14}\b")
#: Shorter strings are not registered: they would blank out ordinary words.
_MIN_SECRET_LENGTH = 6

_secrets: set[str] = set()
_secrets_lock = threading.Lock()
_secret_pattern: re.Pattern[str] | None = None


def register_secret(value: str | None) -> None:
    """Make ``value`` unprintable: it is replaced by ``[REDACTED]`` in every later log line."""
    global _secret_pattern
    if not value or len(value) < _MIN_SECRET_LENGTH or value in _secrets:
        return
    with _secrets_lock:
        _secrets.add(value)
        # Longest first, so a secret that contains another is removed whole.
        ordered = sorted(_secrets, key=len, reverse=True)
        _secret_pattern = re.compile("|".join(re.escape(s) for s in ordered))


def forget_secrets() -> None:
    """Forget every registered secret (tests use this to start clean)."""
    global _secret_pattern
    with _secrets_lock:
        _secrets.clear()
        _secret_pattern = None


def mask_url(url: str) -> str:
    """``amqp://guest:guest@host/?password=x`` → ``amqp://guest:***@host/?password=***``.

    Also finds URLs inside longer text. A URL's userinfo is parsed as the AMQP and Redis
    clients parse it (Python's ``urlsplit``): the authority ends at the first ``/``, ``?`` or
    ``#``, and the *last* ``@`` in it ends the userinfo, so a password holding ``@`` or ``:``
    is masked whole (a ``/``, ``?`` or ``#`` in a password must be percent-encoded for the
    clients to read it as part of the password at all). Query parameters named like a secret
    (``password``, ``pass``, ``passwd``, ``token``, ``secret``, ... in any case) are masked too.
    """
    if "://" not in url:
        return url
    return _URL.sub(_mask_match, url)


def _mask_match(match: re.Match[str]) -> str:
    url = match.group(0)
    scheme_end = url.index("://") + 3
    authority_end = len(url)
    for delimiter in "/?#":
        found = url.find(delimiter, scheme_end)
        if found != -1:
            authority_end = min(authority_end, found)
    authority, rest = url[scheme_end:authority_end], url[authority_end:]
    userinfo, at, host = authority.rpartition("@")
    if at and ":" in userinfo:
        user = userinfo.partition(":")[0]
        authority = f"{user}:{_MASK}@{host}"
    if "?" in rest:
        path, _, query = rest.partition("?")
        query, hash_mark, fragment = query.partition("#")
        rest = f"{path}?{_mask_query(query)}{hash_mark}{fragment}"
    return url[:scheme_end] + authority + rest


def _mask_query(query: str) -> str:
    masked = []
    for parameter in query.split("&"):
        name, equals, value = parameter.partition("=")
        if equals and (
            _SECRET_PARAMETER.search(unquote_plus(name))
            or _SECRET_INSIDE_VALUE.search(unquote_plus(value))
        ):
            parameter = f"{name}={_MASK}"
        masked.append(parameter)
    return "&".join(masked)


def unreadable_url(setting: str, url: str, exc: Exception) -> str:
    """Why a client library refused to read ``url``: the parameter it names, never its message.

    Those messages can quote a value (pika evaluates ``ssl_options``, which may hold a key
    file's password), so only a parameter name found in one is shown, with the masked URL.
    """
    named = re.search(r"(?:parameter|argument)\W+'(\w+)'", str(exc))
    which = f": it does not take the parameter {named.group(1)!r}" if named else ""
    return (
        f"{setting} {mask_url(url)} is not a URL the client accepts "
        f"({type(exc).__name__}{which}); see config/example.env"
    )


def scrub_text(text: str) -> str:
    """``text`` with registered secrets and URL passwords removed (for dead letters, CLI output)."""
    return str(_scrub(text))


def _scrub_str(value: str) -> str:
    pattern = _secret_pattern
    if pattern is not None:
        value = pattern.sub(REDACTED, value)
    if "://" in value:
        value = mask_url(value)
    if "+" in value:
        # Recipients printed by libraries (dramatiq's debug lines show job arguments).
        value = _E164.sub(lambda m: mask_phone(m.group(0)), value)
    return value


def _scrub(value: Any) -> Any:
    if isinstance(value, str):
        return _scrub_str(value)
    if isinstance(value, dict):
        return {
            k: REDACTED if isinstance(k, str) and _is_secret_key(k) else _scrub(v)
            for k, v in value.items()
        }
    if isinstance(value, list | tuple):
        return [_scrub(v) for v in value]
    return value


@functools.lru_cache(maxsize=4096)
def _is_secret_key(key: str) -> bool:
    return bool(_SECRET_KEY.search(key))


def redact_secrets(_: WrappedLogger, __: str, event_dict: EventDict) -> EventDict:
    """structlog processor: remove secrets from every key and value of the event."""
    # Runs for every log line. Its strings are looked at together first: a line with no
    # registered secret, no URL and no phone number in any of them (most lines) is left as it
    # is, one search instead of three per string.
    texts: list[str] = []
    for key, value in event_dict.items():
        if _is_secret_key(key):
            event_dict[key] = REDACTED
        elif isinstance(value, str):
            texts.append(value)
        elif isinstance(value, dict | list | tuple):
            event_dict[key] = _scrub(value)
    if texts and _may_need_scrubbing("\x00".join(texts)):
        for key, value in event_dict.items():
            if isinstance(value, str) and value != REDACTED:
                event_dict[key] = _scrub_str(value)
    return event_dict


def _may_need_scrubbing(text: str) -> bool:
    """Whether :func:`_scrub_str` could change any part of ``text`` (never False when it could:
    a match across two joined strings only sends them the long way)."""
    pattern = _secret_pattern
    return (
        (pattern is not None and pattern.search(text) is not None)
        or "://" in text
        or ("+" in text and _E164.search(text) is not None)
    )


class _DropDramatiqJobFailures(logging.Filter):
    """Drop dramatiq's own "Failed to process message ..." lines.

    They print the job's arguments (recipient, message text) in full, and every failure is
    already logged once, redacted and masked, by the job outcome middleware.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Failed to process message")


def _orjson_text(value: Any, **_: Any) -> str:
    return orjson.dumps(value, default=repr).decode()


class DirectStream:
    """A log stream that writes each line straight to a file descriptor (the worker process's
    inherited stderr), with one ``write`` call.

    dramatiq's process manager otherwise relays a worker's ``sys.stderr`` through a pipe to
    the main process, waking a second process per line. A write of at most ``PIPE_BUF`` bytes
    is atomic, so lines from several processes cannot mangle one another; a longer line, or a
    write the descriptor refuses, goes through ``fallback`` (dramatiq's pipe).
    """

    def __init__(self, fallback: Any, fd: int = 2) -> None:
        self.fallback = fallback
        self.fd = fd

    def write(self, text: str) -> int:
        data = text.encode("utf-8", errors="replace")
        if len(data) <= select.PIPE_BUF:
            try:
                written = os.write(self.fd, data)
                while written < len(data):  # a regular file may take it in parts
                    written += os.write(self.fd, data[written:])
                return len(text)
            except OSError:
                pass
        return int(self.fallback.write(text) or len(text))

    def flush(self) -> None:
        """Every write is already a system call: nothing is buffered here."""

    def isatty(self) -> bool:
        try:
            return os.isatty(self.fd)
        except OSError:
            return False

    def fileno(self) -> int:
        return self.fd


def resolve_log_format(
    fmt: Literal["auto", "json", "console"], stream: Any = None
) -> Literal["json", "console"]:
    """``auto`` means console when writing to a terminal, JSON otherwise."""
    if fmt != "auto":
        return fmt
    stream = stream or sys.stderr
    return "console" if hasattr(stream, "isatty") and stream.isatty() else "json"


_generation = 0
_bound: tuple[int, Any] = (-1, None)
#: The job line's own way to a JSON log (set by configure_logging; None for the console).
_job_lines: _JobLines | None = None


def bound_logger() -> Any:
    """A logger bound to the current configuration, made once per :func:`configure_logging`.

    ``structlog.get_logger()`` returns a proxy that builds a new logger at every call (a third
    of a job line's cost); a line per job can use this one instead.
    """
    global _bound
    generation, logger = _bound
    if generation != _generation:
        logger = structlog.get_logger().bind()
        _bound = (_generation, logger)
    return logger


def log_job_line(level: str, fields: dict[str, Any], exc_info: BaseException | None = None) -> None:
    """Log ``fields`` as the ``job`` line at ``level`` (``info``, ``warning`` or ``error``).

    The same line ``bound_logger().<level>("job", **fields)`` writes. In JSON without a
    traceback it takes a path of its own: the same processors' work (level, timestamp,
    redaction, orjson) without structlog's chain, a third of the line's CPU.
    """
    lines = _job_lines
    if (
        lines is None
        or exc_info is not None
        # structlog configured since by someone else (or reset): its configuration decides
        or structlog.get_config()["logger_factory"] is not lines.factory
    ):
        getattr(bound_logger(), level)("job", exc_info=exc_info, **fields)
    elif _LEVEL_NUMBERS[level] >= lines.min_level:
        lines.write(level, fields)


_LEVEL_NUMBERS = logging.getLevelNamesMapping() | {
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}


class _JobLines:
    def __init__(self, stream: Any, min_level: int, stamper: Processor, factory: Any) -> None:
        self.factory = factory
        self.stream = stream
        self.min_level = min_level
        self.stamper = stamper
        self.lock = threading.Lock()  # as structlog's WriteLogger

    def write(self, level: str, fields: dict[str, Any]) -> None:
        line_fields = {**fields, "event": "job", "level": level}
        self.stamper(None, level, line_fields)
        redact_secrets(None, level, line_fields)
        line = _orjson_text(line_fields) + "\n"
        with self.lock:
            self.stream.write(line)
            self.stream.flush()


def configure_logging(
    fmt: Literal["auto", "json", "console"] = "auto",
    level: str = "INFO",
    *,
    stream: Any = None,
    quiet_loggers: Iterable[str] = ("pika", "httpx", "httpcore", "redis", "aiohttp.access"),
) -> None:
    """Set up structlog and the standard library's root logger for this process."""
    global _generation, _job_lines
    stream = stream or sys.stderr
    renderer: Processor
    json_lines = resolve_log_format(fmt, stream) == "json"
    if json_lines:
        # orjson renders a job's line in a fraction of json.dumps' time (a line per job adds up).
        renderer = structlog.processors.JSONRenderer(serializer=_orjson_text)
    else:
        renderer = structlog.dev.ConsoleRenderer(colors=stream.isatty())

    # (No structlog.contextvars.merge_contextvars: nothing binds context variables, and it copied
    # the whole context of every line to find none.)
    stamper = structlog.processors.TimeStamper(fmt="iso", utc=True)
    factory = structlog.WriteLoggerFactory(file=stream)
    min_level = logging.getLevelNamesMapping()[level]
    shared: list[Processor] = [
        structlog.processors.add_log_level,
        stamper,
        # Exceptions become text before redaction, so a secret inside one is caught too.
        structlog.processors.format_exc_info,
        redact_secrets,
    ]
    # Our own lines skip the standard library (a third of the cost of a line); library lines
    # come in through the root handler below and get the same processors.
    structlog.configure(
        processors=[*shared, renderer],
        logger_factory=factory,
        wrapper_class=structlog.make_filtering_bound_logger(min_level),
        cache_logger_on_first_use=False,  # configure_logging may be called again (tests)
    )
    _generation += 1  # bound_logger() binds again
    _job_lines = _JobLines(stream, min_level, stamper, factory) if json_lines else None
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[structlog.stdlib.add_logger_name, *shared],
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
    )
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for name in quiet_loggers:
        logging.getLogger(name).setLevel(logging.WARNING)
    worker_thread_log = logging.getLogger("dramatiq.worker.WorkerThread")
    if not any(isinstance(f, _DropDramatiqJobFailures) for f in worker_thread_log.filters):
        worker_thread_log.addFilter(_DropDramatiqJobFailures())
