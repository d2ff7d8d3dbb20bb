"""`bulkhead-lab status`: what the state file says, checked against what is running."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from bulkhead.v1 import admin_pb2
from lab.daemons import list_agents
from lab.errors import DaemonError
from lab.procs import is_alive
from lab.state import LabState, ProcessRecord, Role

_STATUS_RPC_TIMEOUT = 1.0


def _alive(record: ProcessRecord) -> str:
    return "[green]running[/]" if is_alive(record.pid, record.start_ticks) else "[red]gone[/]"


def _sync(agent: admin_pb2.AgentSummary | None) -> str:
    if agent is None:
        return "not registered"
    if not agent.connected:
        return "[red]disconnected[/]"
    if agent.desired_hash and agent.applied_hash == agent.desired_hash:
        return f"[green]in sync[/] (rev {agent.applied_revision})"
    return f"[yellow]applied rev {agent.applied_revision} / desired rev {agent.desired_revision}[/]"


def _relative(path: Path, directory: Path) -> str:
    return str(path.relative_to(directory)) if path.is_relative_to(directory) else str(path)


def render_status(directory: Path, state: LabState, console: Console) -> None:
    console.print(
        f"lab in {directory}: {len(state.hosts)} hosts, mode {state.mode}, "
        f"dataplane {state.dataplane}, controller {state.controller}"
        + ("" if state.daemons else " (network only: no controller or agents)")
    )
    agents: dict[str, admin_pb2.AgentSummary] = {}
    if state.daemons:
        try:
            listed = list_agents(
                state.controller, Path(state.credentials), timeout=_STATUS_RPC_TIMEOUT
            )
            agents = {agent.agent_id: agent for agent in listed}
        except DaemonError as exc:
            console.print("[red]controller unreachable[/]:", escape(str(exc)))
    by_host = {p.host: p for p in state.processes if p.role == Role.AGENT}

    hosts = Table(title="hosts")
    hosts.caption = "each host runs in network namespace bh-HOST"
    for column in ("host", "IPv4", "IPv6", "labels", "agent", "policy"):
        hosts.add_column(column, no_wrap=column != "labels")
    for host in state.hosts:
        agent = by_host.get(host.name)
        hosts.add_row(
            host.name,
            host.ipv4,
            host.ipv6,
            ",".join(f"{k}={v}" for k, v in sorted(host.labels.items())) or "-",
            _alive(agent) if agent else "-",
            _sync(agents.get(host.name)) if state.daemons else "-",
        )
    console.print(hosts)

    processes = Table(title="processes")
    for column in ("role", "host", "pid", "state", "ports", "log"):
        processes.add_column(column, overflow="fold")
    processes.caption = f"logs are relative to {directory}"
    for record in state.processes:
        ports = ",".join(map(str, record.ports)) + (" (+udp)" if record.udp else "")
        processes.add_row(
            record.role.value, record.host or "(root)", str(record.pid), _alive(record),
            ports or "-", _relative(Path(record.log), directory),
        )  # fmt: skip
    console.print(processes)
