"""Running the iptables-legacy and ipset tools, with their failures as DataplaneError."""

from __future__ import annotations

import subprocess
from collections.abc import Sequence
from typing import Protocol

from agent.dataplane.backend import DataplaneError

COMMAND_TIMEOUT = 120.0  # seconds; a restore of 100k set members takes well under this


class CommandRunner(Protocol):
    """Runs one tool to completion; raises DataplaneError with its message if it fails."""

    def run(self, argv: Sequence[str], stdin: str | None = None) -> str:
        """The command's standard output."""
        ...


class SubprocessRunner:
    """The CommandRunner that runs real commands in this process's network namespace."""

    def __init__(self, timeout: float = COMMAND_TIMEOUT) -> None:
        self._timeout = timeout

    def run(self, argv: Sequence[str], stdin: str | None = None) -> str:
        try:
            result = subprocess.run(
                list(argv),
                input=stdin,
                capture_output=True,
                text=True,
                timeout=self._timeout,
                check=False,
            )
        except FileNotFoundError as exc:
            raise DataplaneError(f"{argv[0]}: not installed ({exc.strerror})") from exc
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise DataplaneError(f"{argv[0]}: {exc}") from exc
        if result.returncode != 0:
            message = (result.stderr.strip() or result.stdout.strip()).replace("\n", "; ")
            raise DataplaneError(f"{argv[0]}: {message or f'exit status {result.returncode}'}")
        return result.stdout
