"""Every command loads settings the same way: bad ones are a usage error naming the setting."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from worker.commands.main import cli


@pytest.mark.parametrize(
    "command",
    [
        ["campaign", "list"],
        ["campaign", "status", "any"],
        ["clients", "--timeout", "0.1"],
        ["tokens", "list"],
        ["dlq", "list"],
    ],
)
def test_bad_settings_stop_every_command_with_exit_2_and_the_setting_s_name(
    command: list[str],
) -> None:
    result = CliRunner().invoke(cli, command, env={"RATE_LIMIT_PER_NUMBER": "-5"})
    assert result.exit_code == 2, result.output
    assert "rate_limit_per_number" in result.output.lower()
    assert "Traceback" not in result.output


def test_the_group_s_env_file_reaches_a_sub_command(tmp_path: Path) -> None:
    env_file = tmp_path / "bad.env"
    env_file.write_text("RATE_LIMIT_PER_NUMBER=-5\n")
    result = CliRunner().invoke(cli, ["--env-file", str(env_file), "campaign", "list"], env={})
    assert result.exit_code == 2, result.output
    assert "rate_limit_per_number" in result.output.lower()
