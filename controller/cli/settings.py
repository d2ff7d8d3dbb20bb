"""The global options every command gets through the click context, and shared options."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import click
from google.protobuf.message import Message

from controller.cli.client import AdminClient
from controller.cli.output import OUTPUT_FORMATS, OutputFormat, dump_data, message_to_data

_F = TypeVar("_F", bound=Callable[..., Any])


@dataclass(frozen=True)
class Settings:
    """Where the controller is, who we are to it, and how long to wait for it."""

    controller: str
    credentials: Path
    timeout: float

    def client(self) -> AdminClient:
        return AdminClient(self.controller, self.credentials, self.timeout)


def output_option(command: _F) -> _F:
    return click.option(
        "-o",
        "--output",
        "fmt",
        type=click.Choice(OUTPUT_FORMATS),
        default="table",
        show_default=True,
        help="Output format.",
    )(command)


def echo_message(message: Message, fmt: OutputFormat) -> None:
    """The whole response as JSON or YAML on stdout."""
    click.echo(dump_data(message_to_data(message), fmt), nl=False)
