"""``python -m worker.sandbox``: run the sandbox as a standalone process.

Prints exactly one line, ``sandbox listening on http://HOST:PORT``, once the
port is bound, so a parent process (benchmarks, demos) can wait for it.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from typing import Any, Final

from worker.runtime.lifeline import follow_parent_from_environment
from worker.sandbox.config import DEFAULT_CLIENTS, SandboxConfig
from worker.sandbox.faults import Faults
from worker.sandbox.server import serve
from worker.sandbox.statuses import PhoneNumber, StatusCallbacks
from worker.sandbox.validation import FaultConfigError


def _key_value(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key or not value:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, value


#: Where the app secret that signs status webhooks is read from (not argv: ps shows argv).
SECRET_ENV: Final = "SANDBOX_WEBHOOK_SECRET"  # noqa: S105  # a variable's name, not a secret


def _delays(text: str) -> tuple[float, float]:
    low, _, high = text.partition(",")
    try:
        return float(low), float(high or low)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected MIN[,MAX] seconds, got {text!r}") from None


def _add_status_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "status webhooks",
        "After each accepted send, POST WhatsApp statuses (sent, then delivered/read or failed) "
        "in Meta's Cloud API webhook shape, signed with X-Hub-Signature-256 (HMAC-SHA256 of the "
        f"body with the app secret, read from ${SECRET_ENV} or the variable named by "
        "--status-secret-env, never from the command line). Off without --status-url; shares "
        "are probabilities; GET/PUT/PATCH /admin/statuses change them at runtime, POST "
        "/admin/reset restores these; --seed also seeds them.",
    )
    group.add_argument("--status-url", metavar="URL", help="the webhook receiver's URL")
    group.add_argument(
        "--status-secret-env",
        metavar="NAME",
        default=SECRET_ENV,
        help=f"environment variable holding the app secret (default {SECRET_ENV})",
    )
    default = StatusCallbacks()
    group.add_argument(
        "--status-delay-s",
        type=_delays,
        metavar="MIN[,MAX]",
        help="delay before each status, after the send or the previous status "
        f"(default {default.delay_min_s:g},{default.delay_max_s:g})",
    )
    for name, text in (
        ("failed", "share of sends failed"),
        ("delivered", "share of the sends not failed that are delivered"),
        ("read", "share of delivered messages read"),
        ("multi_device", "share of failed messages delivered afterwards"),
        ("duplicate", "share of statuses posted twice"),
        ("reorder", "share of messages whose statuses come out of order"),
    ):
        option = "--status-" + name.replace("_", "-")
        text += f" (default {getattr(default, name):g})"
        group.add_argument(option, type=float, metavar="P", help=text)
    group.add_argument(
        "--status-failure-code",
        action="append",
        type=_key_value,
        metavar="CODE=WEIGHT",
        help="error code of failures and its weight (repeatable; default "
        + ", ".join(f"{code}={weight:g}" for code, weight in default.failure_codes.items())
        + ")",
    )
    group.add_argument(
        "--status-waba-id", metavar="ID", help=f"entry[].id (default {default.waba_id})"
    )
    group.add_argument(
        "--status-number",
        action="append",
        type=_key_value,
        metavar="PHONE_ID=PHONE_NUMBER_ID,DISPLAY_NUMBER",
        help="metadata for a Verloop phone_id (repeatable; default: the phone_id itself)",
    )
    for option, kind, metavar, text, value in (
        (
            "template-category",
            str,
            "CATEGORY",
            "pricing category of templates",
            "template_category",
        ),
        ("batch", int, "N", "most statuses per POST", "batch"),
        ("attempts", int, "N", "POSTs per status before dropping it", "max_attempts"),
        ("backoff-s", float, "S", "wait before a retry, doubled each time", "retry_backoff_s"),
        ("timeout-s", float, "S", "per POST", "timeout_s"),
        ("queue-limit", int, "N", "most statuses waiting", "queue_limit"),
        ("concurrency", int, "N", "POSTs in flight", "concurrency"),
    ):
        group.add_argument(
            f"--status-{option}",
            type=kind,
            metavar=metavar,
            help=f"{text} (default {getattr(default, value)})",
        )


def _status_config(args: argparse.Namespace) -> StatusCallbacks:
    given: dict[str, Any] = {
        key: getattr(args, f"status_{option}")
        for key, option in (
            ("delivered", "delivered"),
            ("read", "read"),
            ("failed", "failed"),
            ("multi_device", "multi_device"),
            ("duplicate", "duplicate"),
            ("reorder", "reorder"),
            ("waba_id", "waba_id"),
            ("template_category", "template_category"),
            ("batch", "batch"),
            ("max_attempts", "attempts"),
            ("retry_backoff_s", "backoff_s"),
            ("timeout_s", "timeout_s"),
            ("queue_limit", "queue_limit"),
            ("concurrency", "concurrency"),
        )
        if getattr(args, f"status_{option}") is not None
    }
    secret = os.environ.get(args.status_secret_env, "")
    if args.status_url and not secret:
        raise FaultConfigError(
            f"--status-url needs the app secret in the environment variable "
            f"{args.status_secret_env}"
        )
    if args.status_delay_s is not None:
        given["delay_min_s"], given["delay_max_s"] = args.status_delay_s
    try:
        if args.status_failure_code:
            given["failure_codes"] = {
                int(code): float(weight) for code, weight in args.status_failure_code
            }
    except ValueError as exc:
        raise FaultConfigError(f"--status-failure-code: {exc}") from exc
    numbers = {}
    for phone_id, value in args.status_number or ():
        number_id, _, display = value.partition(",")
        numbers[phone_id] = PhoneNumber(number_id, display or number_id)
    try:
        return StatusCallbacks(
            url=args.status_url, app_secret=secret, seed=args.seed, numbers=numbers, **given
        )
    except FaultConfigError as exc:
        raise FaultConfigError(f"status webhooks: {exc}") from exc


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m worker.sandbox", description="Run the Verloop WhatsApp API simulator."
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8765, help="0 = pick a free port")
    parser.add_argument("--username", default="sandbox")
    parser.add_argument("--password", default="sandbox-password")
    parser.add_argument("--system-user-token", help="default: a random uuid4")
    parser.add_argument(
        "--client",
        action="append",
        type=_key_value,
        metavar="CLIENT=PHONE[,PHONE...]",
        help=f"known client and phones (repeatable); default {dict(DEFAULT_CLIENTS)}",
    )
    parser.add_argument(
        "--strict-phones", action="store_true", help="404 for phones not given with --client"
    )
    parser.add_argument("--message-log-limit", type=int, help="keep only the newest N sends")
    faults = parser.add_argument_group("faults")
    faults.add_argument("--latency-ms", type=float, default=0.0)
    faults.add_argument("--jitter-ms", type=float, default=0.0)
    faults.add_argument(
        "--error-rate",
        action="append",
        type=_key_value,
        metavar="STATUS=P",
        help="probability of answering STATUS to a send (repeatable)",
    )
    faults.add_argument("--timeout-rate", type=float, default=0.0)
    faults.add_argument("--timeout-s", type=float, default=30.0)
    faults.add_argument("--per-number-rate", type=float, help="sends/s per phone")
    faults.add_argument("--per-pair-rate", type=int, help="sends per window per recipient")
    faults.add_argument("--per-pair-window-s", type=float, default=6.0)
    faults.add_argument("--seed", type=int)
    faults.add_argument(
        "--no-enforce-limits",
        action="store_true",
        help="accept over-limit sends, only count them as violations",
    )
    _add_status_options(parser)
    return parser


def _config(args: argparse.Namespace) -> SandboxConfig:
    try:
        error_rates = {int(status): float(rate) for status, rate in args.error_rate or ()}
    except ValueError as exc:
        raise FaultConfigError(f"--error-rate: {exc}") from exc
    faults = Faults(
        latency_ms=args.latency_ms,
        latency_jitter_ms=args.jitter_ms,
        error_rates=error_rates,
        timeout_rate=args.timeout_rate,
        timeout_s=args.timeout_s,
        per_number_rate=args.per_number_rate,
        per_pair_rate=args.per_pair_rate,
        per_pair_window_s=args.per_pair_window_s,
        seed=args.seed,
        enforce_limits=not args.no_enforce_limits,
    )
    clients = (
        {client: tuple(p for p in phones.split(",") if p) for client, phones in args.client}
        if args.client
        else dict(DEFAULT_CLIENTS)
    )
    return SandboxConfig(
        username=args.username,
        password=args.password,
        system_user_token=args.system_user_token,
        clients=clients,
        accept_unknown_phones=not args.strict_phones,
        faults=faults,
        message_log_limit=args.message_log_limit,
        statuses=_status_config(args),
    )


def _announce(url: str) -> None:
    print(f"sandbox listening on {url}", flush=True)


def main(argv: Sequence[str] | None = None) -> None:
    """Parse arguments and serve until SIGINT/SIGTERM."""
    follow_parent_from_environment()  # started by `run --sandbox`: stop when it dies
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        config = _config(args)
    except FaultConfigError as exc:
        parser.error(str(exc))
    serve(args.host, args.port, config, on_started=_announce)


if __name__ == "__main__":
    main()
