"""How every ``verloop-worker`` command gets its settings: one place, one behaviour.

``verloop-worker --env-file F`` and a sub-command's own ``--env-file`` both name a dotenv file;
the nearest one given wins, environment variables win over the file, and settings that do not
validate are a usage error (exit code 2) saying which one is wrong.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from worker.errors import ConfigurationError
from worker.settings import Settings

__all__ = ["SettingsContext", "current_env_file", "current_settings"]


class SettingsContext:
    """The ``ctx.obj`` of a command group that takes ``--env-file``."""

    def __init__(self, env_file: Path | None) -> None:
        self.env_file = env_file

    def settings(self, **overrides: Any) -> Settings:
        try:
            return Settings.load(self.env_file, **overrides)
        except ConfigurationError as exc:
            raise click.UsageError(str(exc)) from None


def current_env_file(env_file: Path | None = None) -> Path | None:
    """``env_file`` if given, else the nearest enclosing group's ``--env-file`` (or None)."""
    if env_file is not None:
        return env_file
    outer = click.get_current_context().find_object(SettingsContext)
    return outer.env_file if outer is not None else None


def current_settings(env_file: Path | None = None) -> Settings:
    """Settings for the running command: ``env_file`` if given, else the nearest enclosing
    group's ``--env-file``, else the environment alone."""
    return SettingsContext(current_env_file(env_file)).settings()
