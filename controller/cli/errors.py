"""The CLI's exceptions, shown to the operator as `error: ...` lines on stderr.

CliError            (click.ClickException; never a traceback)
├── BadInputError   exit 2: the operator's input is wrong, nothing was sent
└── ControllerError exit 1: the controller refused or could not be reached
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import IO, Any

import click

from controller.cli.terminal import printable

EXIT_CONTROLLER = 1
EXIT_BAD_INPUT = 2


class CliError(click.ClickException):
    """An error reported as one `error: ` line per message line."""

    exit_code = EXIT_CONTROLLER

    def __init__(self, lines: str | Sequence[str]) -> None:
        self.lines = [lines] if isinstance(lines, str) else list(lines)
        super().__init__("\n".join(self.lines))

    def show(self, file: IO[Any] | None = None) -> None:
        for line in self.lines:  # the controller's or an agent's words may be in it
            click.echo(f"error: {printable(line)}", file=file, err=True)


class BadInputError(CliError):
    """The operator's input (a file, an argument) is invalid; the controller was not called."""

    exit_code = EXIT_BAD_INPUT


class ControllerError(CliError):
    """The controller rejected the request, or could not be reached."""

    exit_code = EXIT_CONTROLLER
