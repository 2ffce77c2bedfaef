"""``verloop-worker schema``: the JSON Schema of every job's kwargs."""

from __future__ import annotations

import json
from pathlib import Path

import click

from worker.jobs.registry import jobs_json_schema

__all__ = ["schema"]


@click.command(short_help="Print the JSON Schema of jobs.")
@click.option(
    "--output",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Write to this file instead of standard output.",
)
def schema(output: Path | None) -> None:
    """Print the JSON Schema of every job's kwargs (config/jobs.schema.json)."""
    text = json.dumps(jobs_json_schema(), indent=2, sort_keys=False) + "\n"
    if output is None:
        click.echo(text, nl=False)
    else:
        output.write_text(text, encoding="utf-8")
