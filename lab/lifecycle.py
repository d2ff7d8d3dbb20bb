"""Bringing a lab up and taking it down, all or nothing.

`up` records what it is about to make before making it, and removes what it made if
anything fails. `down` works from the state file when there is one and otherwise (after a
crash) from the marks the lab leaves on its namespaces and links, so it always finishes the
job and can be run any number of times.
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

from lab.daemons import (
    CONTROLLER_PORT,
    create_token,
    issue_operator_credentials,
    program,
    start_agent,
    start_controller,
    wait_controller,
    wait_ready,
)
from lab.errors import LabError, SpecError, StateError
from lab.iproute import netns_pids
from lab.listener import start_listener
from lab.procs import find_processes, is_alive, terminate
from lab.spec import OPS_V4, HostSpec, check_hosts
from lab.state import (
    LabPaths,
    LabState,
    ProcessRecord,
    is_lab_dir,
    load_state,
    make_lab_dir,
    save_state,
    state_path,
)
from lab.topology import (
    build_network,
    find_bh_namespaces,
    find_lab_namespaces,
    find_root_links,
    host_record,
    preflight,
    remove_link,
    remove_netns,
)

Report = Callable[[str], None]
CONTROLLER_ADDRESS = f"{OPS_V4}:{CONTROLLER_PORT}"
MODES = ("enforce", "visibility")
DATAPLANES = ("nftables", "iptables")
# Dataplanes the agent of this version can run; the lab names the others but refuses them.
AVAILABLE_DATAPLANES = ("nftables", "iptables")
MAX_LISTEN_PORTS = 32


def _quiet(_line: str) -> None:
    return None


def require_root() -> None:
    if os.geteuid() != 0:
        raise LabError(
            "bulkhead-lab must run as root (it creates network namespaces); try `sudo bulkhead-lab`"
        )


def _check_lab_dir_free(directory: Path) -> None:
    if state_path(directory).exists():
        raise StateError(
            f"a lab is already up (state in {state_path(directory)}); "
            "see `bulkhead-lab status`, remove it with `bulkhead-lab down`"
        )
    if is_lab_dir(directory):
        raise StateError(
            f"{directory} holds leftovers of an earlier lab; remove them with `bulkhead-lab down`"
        )
    if directory.exists() and any(directory.iterdir()):
        raise StateError(
            f"lab directory {directory} exists and is not empty; point BULKHEAD_LAB_DIR at a "
            "new or empty directory"
        )


def up(
    directory: Path,
    hosts: list[HostSpec],
    *,
    mode: str = "enforce",
    dataplane: str = "nftables",
    daemons: bool = True,
    report: Report = _quiet,
) -> LabState:
    """Create the lab network (and, with DAEMONS, the controller and one agent per host);
    return when every agent is in sync. On any failure, remove everything it made."""
    if mode not in MODES:
        raise SpecError(f"--mode: '{mode}' is not one of {', '.join(MODES)}")
    if dataplane not in DATAPLANES:
        raise SpecError(f"--dataplane: '{dataplane}' is not one of {', '.join(DATAPLANES)}")
    if dataplane not in AVAILABLE_DATAPLANES:
        raise SpecError(
            f"--dataplane: the {dataplane} dataplane is not in this version of the agent; "
            f"use {' or '.join(AVAILABLE_DATAPLANES)}"
        )
    check_hosts(hosts)
    _check_lab_dir_free(directory)
    preflight(hosts)
    if daemons:  # missing programs are found before anything is made
        program("bulkhead-controller")
        program("bulkhead-agent")
    paths = LabPaths(directory)
    state = LabState(
        controller=CONTROLLER_ADDRESS,
        dataplane=dataplane,
        mode=mode,
        daemons=daemons,
        hosts=[host_record(i, spec) for i, spec in enumerate(hosts)],
    )
    made: list[tuple[str, str]] = []
    try:
        make_lab_dir(directory)
        save_state(directory, state)
        build_network(state.hosts, lambda kind, name: made.append((kind, name)))
        for host in state.hosts:
            report(f"host {host.name}: {host.netns} {host.ipv4} {host.ipv6}")
        if daemons:
            _start_daemons(paths, state, report)
    except BaseException:
        # Ctrl-C included: leave nothing behind.
        try:
            _teardown(directory, state, made)
        except LabError as exc:
            report(f"cleanup after the failure was incomplete ({exc}); run `bulkhead-lab down`")
        raise
    return state


def _start_daemons(paths: LabPaths, state: LabState, report: Report) -> None:
    credentials = issue_operator_credentials(paths)
    state.credentials = str(credentials)
    report(f"operator credentials: {credentials} (admin)")
    controller = start_controller(paths, state.controller)
    _record(paths.root, state, controller)
    report(f"controller: pid {controller.pid}, listening on {state.controller}")
    wait_controller(controller, str(OPS_V4), CONTROLLER_PORT)
    agents = []
    for host in state.hosts:
        token = create_token(state.controller, credentials, host.labels)
        agent = start_agent(
            paths, host, controller=state.controller, mode=state.mode,
            dataplane=state.dataplane, token=token,
        )  # fmt: skip
        _record(paths.root, state, agent)
        agents.append(agent)
        report(f"agent {host.name}: pid {agent.pid}")
    wait_ready(state.controller, credentials, agents)
    report(f"all {len(agents)} agents enrolled, connected (mTLS) and in sync")


def _record(directory: Path, state: LabState, record: ProcessRecord) -> None:
    state.processes.append(record)
    save_state(directory, state)


def _teardown(directory: Path, state: LabState, made: list[tuple[str, str]]) -> None:
    """Remove exactly what a failed `up` made (it checked beforehand that nothing was there)."""
    pids = [p.pid for p in state.processes if is_alive(p.pid, p.start_ticks)]
    for kind, name in made:
        if kind == "netns":
            pids += netns_pids(name)
    terminate(pids)
    for kind, name in reversed(made):
        if kind == "netns":
            remove_netns(name)
        else:
            remove_link(name)
    if is_lab_dir(directory):
        shutil.rmtree(directory)


def down(directory: Path, *, every_bh: bool = False, report: Report = _quiet) -> list[str]:
    """Remove the lab: its processes, namespaces, links and directory. Works without (or
    with a corrupt) state file; with EVERY_BH also every bh-* namespace and root link, even
    ones another tool made. Returns what was removed (empty: nothing was there)."""
    removed: list[str] = []
    pids: list[int] = []
    try:
        state: LabState | None = load_state(directory)
    except StateError as exc:
        state = None
        if state_path(directory).exists():
            report(f"{exc}; sweeping by name")
    if state is not None:
        pids += [p.pid for p in state.processes if is_alive(p.pid, p.start_ticks)]
    # Without a state file the controller (root namespace) is found by its --state-dir.
    controller_state = str(LabPaths(directory).controller_state)
    pids += find_processes(
        lambda argv: (
            controller_state in argv
            and any(Path(arg).name == "bulkhead-controller" for arg in argv)
        )
    )
    namespaces = find_bh_namespaces() if every_bh else find_lab_namespaces()
    for name in namespaces:
        pids += netns_pids(name)
    for pid in terminate(pids):
        removed.append(f"process {pid}")
    problems: list[str] = []
    for name in namespaces:
        _attempt(problems, remove_netns, name)
        removed.append(f"namespace {name}")
    for name in find_root_links(every_bh=every_bh):
        _attempt(problems, remove_link, name)
        removed.append(f"link {name}")
    if is_lab_dir(directory):
        shutil.rmtree(directory)
        removed.append(f"directory {directory}")
    elif directory.exists() and state is None:
        report(f"left {directory} alone: it is not a lab directory")
    if problems:
        raise StateError("could not remove everything: " + "; ".join(problems))
    for line in removed:
        report(f"removed {line}")
    return removed


def _attempt(problems: list[str], action: Callable[[str], None], name: str) -> None:
    try:
        action(name)
    except LabError as exc:
        problems.append(str(exc))


def add_listener(directory: Path, host_name: str, ports: list[int], *, udp: bool) -> ProcessRecord:
    """Start a listener on HOST_NAME for PORTS and record it, so `down` stops it."""
    if not ports:
        raise SpecError("PORT: give at least one port")
    if len(ports) > MAX_LISTEN_PORTS:
        raise SpecError(f"PORT: at most {MAX_LISTEN_PORTS} ports per listener")
    for port in ports:
        if not 0 < port < 65536:
            raise SpecError(f"PORT: {port} is not between 1 and 65535")
    if len(set(ports)) != len(ports):
        raise SpecError("PORT: a port is given twice")
    state = load_state(directory)
    host = state.host(host_name)
    log = LabPaths(directory).listener_log(host.name, ports)
    record = start_listener(host, ports, udp=udp, python=sys.executable, log=log)
    _record(directory, state, record)
    return record
