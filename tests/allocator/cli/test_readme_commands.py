"""Every `allocator ...` command line in the README parses: its command exists, each option is
one the command takes, and each value has the option's type (nothing is run)."""

import re
import shlex
from pathlib import Path

import pytest
import typer

from allocator.cli import apply, convert, evaluate, frontier, generate, profile, serve, solve  # noqa: F401
from allocator.cli.app import app

README = Path(__file__).parents[3] / "README.md"


def readme_commands() -> list[str]:
    """The `allocator` lines of the README's shell blocks, comments dropped."""
    lines, shell = [], False
    for line in README.read_text().splitlines():
        if line.startswith("```"):
            shell = line.strip() in ("```bash", "```sh", "```console")
            continue
        if shell and line.lstrip().startswith("allocator "):
            lines.append(re.sub(r"\s+#.*$", "", line.strip()))
    return lines


def test_the_readme_shows_the_main_commands():
    commands = {shlex.split(c)[1] for c in readme_commands()}
    assert {"profile", "solve", "apply", "evaluate", "frontier", "generate", "convert", "serve"} <= commands


@pytest.mark.parametrize("line", readme_commands())
def test_each_readme_command_line_parses(line):
    group = typer.main.get_command(app)
    args = shlex.split(line)[1:]
    command = group.commands.get(args[0])  # type: ignore[attr-defined]
    assert command is not None, f"no command {args[0]!r}"
    if "--help" in args:
        with pytest.raises(typer.Exit):
            command.make_context(args[0], args[1:])
        return
    command.make_context(args[0], args[1:])  # raises on an unknown option or a value of the wrong type
