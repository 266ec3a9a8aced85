from __future__ import annotations

import pytest
from click.testing import CliRunner

from phonon_cli.cli import main


def test_every_command_has_help() -> None:
    for name, command in main.commands.items():
        assert command.help, name
        result = CliRunner().invoke(main, [name, "-h"])
        assert result.exit_code == 0, result.output
        assert f"Usage: main {name}" in result.output or "Usage:" in result.output


@pytest.mark.parametrize("value", ["15x", "-3", ""])
def test_bad_duration_is_a_usage_error(value, tmp_path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text('[[routes]]\nupdate = "phonon_cli.sinks.jsonl:Lines"\nid = "{a}"\n')
    result = CliRunner().invoke(main, ["run", "-c", str(cfg), "--soft-session", value])
    assert result.exit_code == 2
    assert "--soft-session" in result.output


def test_help_summaries_are_whole_and_env_vars_shown() -> None:
    result = CliRunner().invoke(main, ["--help"])
    commands = result.output.split("Commands:")[1].strip().splitlines()
    assert len(commands) == len(main.commands)
    for line in commands:
        assert line.rstrip().endswith("."), line  # a whole sentence, not cut at "..."
        assert not line.rstrip().endswith("..."), line
    for option in ("--redis-url", "--namespace", "--heartbeat-interval"):
        assert "PHONON_" in result.output.split(option)[1].split("\n  -")[0], option
