"""Stopping and restarting one lab daemon: how the tests and operators rehearse failures
(an agent killed with SIGKILL, a controller restart) on a running lab."""

from __future__ import annotations

import os
import signal
from pathlib import Path

from lab.daemons import (
    CONTROLLER_PORT,
    start_agent,
    start_controller,
    wait_controller,
    wait_ready,
)
from lab.errors import DaemonError
from lab.procs import is_alive, wait_gone
from lab.spec import OPS_V4
from lab.state import LabPaths, LabState, ProcessRecord, Role, load_state, save_state

CONTROLLER = "controller"
_STOP_GRACE = 5.0


def _running(state: LabState, target: str) -> ProcessRecord | None:
    for record in state.processes:
        matches = (
            record.role is Role.CONTROLLER
            if target == CONTROLLER
            else record.role is Role.AGENT and record.host == target
        )
        if matches and is_alive(record.pid, record.start_ticks):
            return record
    return None


def stop(directory: Path, target: str, *, sig: signal.Signals = signal.SIGTERM) -> int:
    """Send SIG to the controller or to host TARGET's agent and wait until it is gone."""
    state = load_state(directory)
    if target != CONTROLLER:
        state.host(target)  # names the known hosts if TARGET is not one
    record = _running(state, target)
    if record is None:
        raise DaemonError(f"{_label(target)} is not running")
    os.kill(record.pid, sig)
    if wait_gone({record.pid: record.start_ticks}, _STOP_GRACE):
        raise DaemonError(f"{_label(target)} (pid {record.pid}) did not exit after {sig.name}")
    state.processes.remove(record)
    save_state(directory, state)
    return record.pid


def start(directory: Path, target: str, *, wait: bool = True) -> int:
    """Start the controller or host TARGET's agent again; with WAIT, until it is in service
    (controller: accepting connections; agent: connected and in sync)."""
    state = load_state(directory)
    if _running(state, target) is not None:
        raise DaemonError(f"{_label(target)} is already running")
    paths = LabPaths(directory)
    if target == CONTROLLER:
        record = start_controller(paths, state.controller)
    else:
        host = state.host(target)
        record = start_agent(
            paths, host, controller=state.controller, mode=state.mode, dataplane=state.dataplane
        )
    state.processes.append(record)
    save_state(directory, state)
    if wait:
        if target == CONTROLLER:
            wait_controller(record, str(OPS_V4), CONTROLLER_PORT)
        else:
            wait_ready(state.controller, Path(state.credentials), [record])
    return record.pid


def _label(target: str) -> str:
    return "the controller" if target == CONTROLLER else f"the agent of {target}"
