"""``verloop-worker sandbox``, and the simulator ``run --sandbox`` starts and points at.

The one module outside :mod:`worker.sandbox` that may import it: the worker itself never
reaches the simulator's code (``run --sandbox`` starts it as a separate process), which
tests/unit/test_layout_imports.py checks.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import click

from worker.sandbox.__main__ import SECRET_ENV as STATUS_SECRET_ENV
from worker.settings import Settings

__all__ = ["banner", "refuse_real_verloop_settings", "sandbox", "simulator", "status_receiver"]

_SANDBOX_USERNAME = "sandbox"
_SANDBOX_PASSWORD = "sandbox-password"  # noqa: S105 - the simulator's well-known fake login


@click.command(
    context_settings={"ignore_unknown_options": True, "allow_extra_args": True},
    add_help_option=False,
    short_help="Run the Verloop simulator.",
)
@click.argument("simulator_args", nargs=-1, type=click.UNPROCESSED)
def sandbox(simulator_args: tuple[str, ...]) -> None:
    """Run the Verloop simulator (all options are the simulator's: see `sandbox --help`)."""
    from worker.sandbox.__main__ import main as sandbox_main

    sandbox_main(["--help"] if "-h" in simulator_args else list(simulator_args))


#: Settings that aim a run at the real Verloop: --sandbox refuses to start when the user gave
#: any of them, since only the URL and the login are replaced by the simulator's (the system
#: token is dropped with --sandbox-url, letting a settings file's one through, and the phone
#: tokens file is read as it is) and the rest would reach the simulator.
_REAL_VERLOOP_SETTINGS = (
    "verloop_system_token",
    "verloop_username",
    "verloop_password",
    "verloop_phone_tokens_file",
)


def refuse_real_verloop_settings(
    settings: Settings, sandbox_url: str | None, env_file: Path | None
) -> None:
    """Stop ``run --sandbox`` (exit 2) when the user's own settings carry Verloop credentials
    or another Verloop URL; called before :func:`simulator` sets the simulator's."""
    given = settings.model_fields_set
    names = [name for name in _REAL_VERLOOP_SETTINGS if name in given]
    if "verloop_base_url" in given and (
        sandbox_url is None or settings.verloop_base_url != sandbox_url.rstrip("/")
    ):
        names.append("verloop_base_url")
    if not names:
        return
    file = env_file or os.environ.get("VERLOOP_WORKER_ENV_FILE") or "the settings file"
    in_environment = {key.upper() for key, value in os.environ.items() if value}
    where = [
        f"{name.upper()} (from {'the environment' if name.upper() in in_environment else file})"
        for name in names
    ]
    raise click.UsageError(
        "--sandbox will not run with real Verloop settings, which would be sent to the "
        f"simulator: {', '.join(where)}. The simulator brings its own URL and login: unset "
        "these, or use a settings file without them (VERLOOP_BASE_URL may name the simulator "
        "given with --sandbox-url)."
    )


@contextmanager
def simulator(
    enabled: bool,
    url: str | None,
    *,
    env: Mapping[str, str],
    statuses_to: tuple[str, str] | None = None,
) -> Iterator[str | None]:
    """Start the simulator (unless given its URL) and point this process's settings at it.

    ``env`` is the simulator process's environment (one that ties its life to ours);
    ``statuses_to`` (a webhook URL and its app secret) makes it post the statuses of each
    accepted send there.
    """
    if not enabled:
        yield None
        return
    system_token = str(uuid.uuid4())
    proc: subprocess.Popen[str] | None = None
    if url is None:
        command = [
            sys.executable,
            "-m",
            "worker.sandbox",
            "--port",
            "0",
            "--username",
            _SANDBOX_USERNAME,
            "--password",
            _SANDBOX_PASSWORD,
            "--system-user-token",
            system_token,
        ]
        child_env = dict(env)
        if statuses_to is not None:
            command += ["--status-url", statuses_to[0]]
            child_env[STATUS_SECRET_ENV] = statuses_to[1]  # not in argv: `ps` shows argv
        proc = subprocess.Popen(  # noqa: S603 - our own module, fixed arguments
            command,
            stdout=subprocess.PIPE,
            text=True,
            env=child_env,
        )
        assert proc.stdout is not None
        line = proc.stdout.readline().strip()
        if not line.startswith("sandbox listening on "):
            proc.kill()
            raise click.ClickException("the Verloop simulator did not start")
        url = line.removeprefix("sandbox listening on ")
    os.environ.update(
        VERLOOP_BASE_URL=url,
        VERLOOP_USERNAME=_SANDBOX_USERNAME,
        VERLOOP_PASSWORD=_SANDBOX_PASSWORD,
        VERLOOP_SYSTEM_TOKEN=system_token if proc is not None else "",
    )
    if proc is None:
        del os.environ["VERLOOP_SYSTEM_TOKEN"]
    try:
        yield url
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=10)


@contextmanager
def status_receiver(enabled: bool, *, env: Mapping[str, str]) -> Iterator[tuple[str, str] | None]:
    """Start ``verloop-worker webhooks`` on a free port with a fresh app secret, for the
    simulator to post statuses to; yields (its webhook URL, the secret)."""
    if not enabled:
        yield None
        return
    secret = secrets.token_hex(16)
    port = _free_port()
    child_env = {
        **env,
        "WEBHOOK_APP_SECRET": secret,
        "WEBHOOK_BIND": "127.0.0.1",
        "WEBHOOK_PORT": str(port),
        "WEBHOOK_METRICS_PORT": "0",
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "worker.commands.main", "webhooks"], env=child_env
    )
    settings = Settings.load(webhook_port=port)
    url = f"http://127.0.0.1:{port}{settings.webhook_path}"
    try:
        _wait_for_port(proc, port)
        click.secho(f"status webhooks: the simulator posts to {url}", fg="green", err=True)
        yield url, secret
    finally:
        proc.terminate()
        proc.wait(timeout=15)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def _wait_for_port(proc: subprocess.Popen[bytes], port: int, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise click.ClickException("the status webhook receiver did not start (see above)")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.1)
    proc.kill()
    raise click.ClickException("the status webhook receiver did not start listening")


def banner(url: str) -> None:
    """Say loudly, on standard error, that sends go to the simulator."""
    bar = "!" * 78
    for line in (
        bar,
        "  SANDBOX MODE: sending to the Verloop simulator at " + url,
        "  Nothing reaches Verloop or WhatsApp. Recorded sends: " + url + "/admin/messages",
        bar,
    ):
        click.secho(line, fg="yellow", bold=True, err=True)
