"""The lab's state file: what `up` made, so `down`, `status`, `probe` and `listen` find it.

JSON in the lab directory (default /run/bulkhead-lab, override with BULKHEAD_LAB_DIR),
written by the shared private-file writer (bulkhead.privatefile): 0600, atomically.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from bulkhead.privatefile import write_private_file
from lab.errors import StateError

DEFAULT_LAB_DIR = Path("/run/bulkhead-lab")
LAB_DIR_ENV = "BULKHEAD_LAB_DIR"
STATE_FILE = "state.json"
# Present in every lab directory we create: `down` removes a directory only if it is there,
# so a mistyped BULKHEAD_LAB_DIR can never make us delete someone else's files.
MARKER_FILE = ".bulkhead-lab"
STATE_VERSION = 1


@dataclass(frozen=True)
class LabPaths:
    """Where each thing lives in the lab directory."""

    root: Path

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def controller_state(self) -> Path:
        return self.root / "controller"

    @property
    def controller_log(self) -> Path:
        return self.logs / "controller.log"

    @property
    def operator(self) -> Path:
        """The lab operator's credentials (operator.crt, operator.key, ca.crt)."""
        return self.root / "operator"

    def agent_dir(self, host: str) -> Path:
        return self.root / "agents" / host

    def agent_config(self, host: str) -> Path:
        return self.agent_dir(host) / "config.yaml"

    def agent_log(self, host: str) -> Path:
        return self.logs / f"agent-{host}.log"

    def listener_log(self, host: str, ports: list[int]) -> Path:
        return self.logs / f"listener-{host}-{'-'.join(map(str, ports))}.log"


class Role(StrEnum):
    CONTROLLER = "controller"
    AGENT = "agent"
    LISTENER = "listener"


class HostRecord(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    netns: str
    ipv4: str
    ipv6: str
    labels: dict[str, str] = Field(default_factory=dict)


class ProcessRecord(BaseModel):
    """A process the lab started; (pid, start_ticks) identifies it even after pid reuse."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    role: Role
    host: str | None = None  # None for the controller (root namespace)
    pid: int
    start_ticks: int
    argv: list[str]
    log: str
    ports: list[int] = Field(default_factory=list)
    udp: bool = False


class LabState(BaseModel):
    model_config = ConfigDict(extra="forbid")

    version: int = STATE_VERSION
    created_unix: float = Field(default_factory=time.time)
    daemons: bool = True
    controller: str
    # Directory of the operator credentials the lab uses to talk to its controller.
    credentials: str = ""
    dataplane: str
    mode: str
    hosts: list[HostRecord] = Field(default_factory=list)
    processes: list[ProcessRecord] = Field(default_factory=list)

    def host(self, name: str) -> HostRecord:
        for host in self.hosts:
            if host.name == name:
                return host
        known = ", ".join(h.name for h in self.hosts) or "none"
        raise StateError(f"no host '{name}' in the lab (hosts: {known})")


def lab_dir() -> Path:
    return Path(os.environ.get(LAB_DIR_ENV) or DEFAULT_LAB_DIR)


def state_path(directory: Path) -> Path:
    return directory / STATE_FILE


def load_state(directory: Path) -> LabState:
    """The recorded lab; StateError if there is none or it cannot be read."""
    path = state_path(directory)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise StateError(f"no lab is up (no {path}); start one with `bulkhead-lab up`") from None
    except OSError as exc:
        raise StateError(f"{path}: cannot read ({exc.strerror})") from exc
    try:
        return LabState.model_validate_json(text)
    except ValidationError as exc:
        raise StateError(
            f"{path}: not a valid lab state file ({exc.error_count()} problems); "
            "`bulkhead-lab down` still removes the lab"
        ) from exc


def save_state(directory: Path, state: LabState) -> None:
    _write_private(state_path(directory), state.model_dump_json(indent=2) + "\n")


def make_lab_dir(directory: Path) -> None:
    """Create the lab directory (private: the controller keeps its state in it)."""
    _write_private(
        directory / MARKER_FILE, "created by bulkhead-lab; removed by `bulkhead-lab down`\n"
    )


def _write_private(path: Path, text: str) -> None:
    """PATH written by the shared writer (its directory created 0700 if missing)."""
    try:
        write_private_file(path, text.encode())
    except OSError as exc:  # UnsafeLocation included: its reason says what is wrong
        raise StateError(f"cannot write {path}: {exc.strerror or exc}") from exc


def is_lab_dir(directory: Path) -> bool:
    return (directory / MARKER_FILE).is_file()
