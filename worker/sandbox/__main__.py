"""``python -m worker.sandbox``: run the sandbox as a standalone process.

Prints exactly one line, ``sandbox listening on http://HOST:PORT``, once the
port is bound, so a parent process (benchmarks, demos) can wait for it.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from worker.runtime.lifeline import follow_parent_from_environment
from worker.sandbox.config import DEFAULT_CLIENTS, SandboxConfig
from worker.sandbox.faults import Faults
from worker.sandbox.server import serve
from worker.sandbox.validation import FaultConfigError


def _key_value(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key or not value:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, value


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
