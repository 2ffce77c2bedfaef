"""``verloop-worker``: the click command group, assembled from one module per command.

Exit codes: 0 success, 1 a service or job failed, 2 bad usage or settings; the conventions every
command follows are in :mod:`worker.commands`.
"""

from __future__ import annotations

from pathlib import Path

import click

from worker.commands.campaign import campaign
from worker.commands.check import check
from worker.commands.clients import clients
from worker.commands.context import SettingsContext
from worker.commands.dlq import dlq
from worker.commands.run import run
from worker.commands.sandbox import sandbox
from worker.commands.schema import schema
from worker.commands.send import send
from worker.commands.tokens import tokens
from worker.commands.webhooks import webhooks

__all__ = ["cli", "main"]


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option(
    "--env-file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    envvar="VERLOOP_WORKER_ENV_FILE",
    help="Settings file (dotenv format, see config/example.env). Environment variables win.",
)
@click.version_option(package_name="verloop-worker")
@click.pass_context
def cli(ctx: click.Context, env_file: Path | None) -> None:
    """Send WhatsApp messages through Verloop from jobs on RabbitMQ.

    \b
    Start here:
      verloop-worker check                 are RabbitMQ, Redis and Verloop reachable?
      verloop-worker run --sandbox         run against the built-in Verloop simulator
      verloop-worker send --to +91... --text hi --client-id C --phone-id P
    """
    ctx.obj = SettingsContext(env_file)


# One module per command (group); see worker/commands/__init__.py.
for command in (run, send, sandbox, check, schema, campaign, clients, tokens, dlq, webhooks):
    cli.add_command(command)


def main() -> None:
    """Console-script entry point."""
    cli(prog_name="verloop-worker")


if __name__ == "__main__":  # `python -m worker.commands.main`: how `run --sandbox` starts commands
    main()
