"""The controller and the agents of a lab: their configuration, start and readiness.

The controller runs in the root namespace on the console address; each agent runs inside
its host's namespace with BULKHEAD_REQUIRE_NETNS=1, so a mistake can never load its
rules into the machine's own namespace, and with the environment of the agent's systemd
unit (MALLOC_ARENA_MAX=2), so what the lab's benches measure is the agent as shipped. An
agent is ready when the controller lists it
connected with applied_hash == desired_hash (and a desired hash at all).
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import grpc
import yaml

from bulkhead.privatefile import write_private_file
from bulkhead.v1 import admin_pb2, admin_pb2_grpc
from lab.errors import DaemonError
from lab.iproute import ip_binary
from lab.procs import is_alive, log_tail, start_detached
from lab.state import HostRecord, LabPaths, ProcessRecord, Role

CONTROLLER_PORT = 50151
# The name the controller's certificate always carries; clients verify it by this name.
CONTROLLER_NAME = "bulkhead-controller"
READY_TIMEOUT = 30.0
CONTROLLER_START_TIMEOUT = 15.0
FAILSAFE_INBOUND = ("tcp/22",)
_POLL = 0.3
_RPC_TIMEOUT = 2.0
# The generated gRPC module is untyped; this is the one place that says what it returns.
_admin_stub: Callable[[grpc.Channel], Any] = admin_pb2_grpc.AdminServiceStub


# The environment the agent's systemd unit sets (Environment= in systemd/bulkhead-agent.service;
# a unit test keeps the two equal): lab agents, and the benches that measure them, run as
# shipped. MALLOC_ARENA_MAX=2: two glibc arenas, not one per thread (docs/benchmarks.md).
AGENT_UNIT_ENVIRONMENT: Mapping[str, str] = {"MALLOC_ARENA_MAX": "2"}

AGENT_METRICS_PORT = 9471
CONTROLLER_METRICS_PORT = 9470


def program(name: str) -> str:
    """A Bulkhead program: beside the running interpreter (the venv), else on PATH."""
    beside = Path(sys.executable).parent / name
    if beside.is_file():
        return str(beside)
    found = shutil.which(name)
    if found is None:
        raise DaemonError(f"`{name}` is not installed (looked in {beside.parent} and PATH)")
    return found


def agent_config(
    host: HostRecord,
    *,
    controller: str,
    mode: str,
    dataplane: str,
    state_dir: Path,
    token: str | None,
) -> dict[str, Any]:
    config: dict[str, Any] = {
        "agent_id": host.name,
        "hostname": host.name,
        "controller": controller,
        "labels": dict(host.labels),
        "mode": mode,
        "failsafe": {"inbound": list(FAILSAFE_INBOUND), "outbound": []},
        "state_dir": str(state_dir),
        "dataplane": dataplane,
        # Inside the host's namespace: `bulkhead-lab exec HOST curl 127.0.0.1:9471/metrics`.
        "metrics_listen": f"127.0.0.1:{AGENT_METRICS_PORT}",
    }
    if dataplane == "iptables":
        # The lab's hosts are namespaces nothing else writes iptables rules into, so the
        # legacy tables are safe there even though this machine's iptables is nf_tables.
        config["allow_iptables_on_nft_host"] = True
    if token is not None:  # first start: the agent enrolls with it
        config["token"] = token
    return config


def issue_operator_credentials(paths: LabPaths) -> Path:
    """An admin certificate for the lab (creating the controller's CA on the way)."""
    argv = [program("bulkhead-controller"), "admin-cert",
            "--state-dir", str(paths.controller_state),
            "--name", "lab-admin", "--role", "admin", "--out", str(paths.operator)]  # fmt: skip
    done = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
    if done.returncode != 0:
        raise DaemonError(f"bulkhead-controller admin-cert failed: {done.stderr.strip()}")
    return paths.operator


def admin_channel(address: str, credentials: Path) -> grpc.Channel:
    """A mutual-TLS channel to the controller with the lab operator's certificate."""
    try:
        ca, key, cert = (
            (credentials / name).read_bytes() for name in ("ca.crt", "operator.key", "operator.crt")
        )
    except OSError as exc:
        raise DaemonError(f"lab operator credentials: {exc}") from exc
    return grpc.secure_channel(
        address,
        grpc.ssl_channel_credentials(ca, key, cert),
        options=[("grpc.ssl_target_name_override", CONTROLLER_NAME)],
    )


def create_token(address: str, credentials: Path, labels: Mapping[str, str]) -> str:
    """A one-use enrollment token carrying LABELS."""
    with admin_channel(address, credentials) as channel:
        try:
            reply: admin_pb2.CreateTokenResponse = _admin_stub(channel).CreateToken(
                admin_pb2.CreateTokenRequest(labels=dict(labels), ttl_seconds=600, uses=1),
                timeout=_RPC_TIMEOUT,
            )
        except grpc.RpcError as exc:
            detail = exc.details() if isinstance(exc, grpc.Call) else str(exc)
            raise DaemonError(f"controller {address}: cannot create a token: {detail}") from exc
    return reply.token


def start_controller(paths: LabPaths, listen: str) -> ProcessRecord:
    argv = [
        program("bulkhead-controller"),
        "--listen", listen,
        "--state-dir", str(paths.controller_state),
        # On the console address (the root namespace's end of the lab bridge).
        "--metrics-listen", f"{listen.rpartition(':')[0]}:{CONTROLLER_METRICS_PORT}",
    ]  # fmt: skip
    paths.controller_state.mkdir(mode=0o700, parents=True, exist_ok=True)
    started = start_detached(argv, paths.controller_log, cwd=paths.root)
    return ProcessRecord(
        role=Role.CONTROLLER,
        pid=started.pid,
        start_ticks=started.start_ticks,
        argv=argv,
        log=str(paths.controller_log),
    )


def wait_controller(record: ProcessRecord, host: str, port: int) -> None:
    """Wait until the controller accepts TCP connections (bounded)."""
    deadline = time.monotonic() + CONTROLLER_START_TIMEOUT
    while time.monotonic() < deadline:
        if not is_alive(record.pid, record.start_ticks):
            raise DaemonError(
                "the controller exited during start; its log ends with:\n"
                + log_tail(Path(record.log))
            )
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(_POLL)
    raise DaemonError(
        f"the controller does not accept connections on {host}:{port} after "
        f"{CONTROLLER_START_TIMEOUT:.0f} s; its log ends with:\n" + log_tail(Path(record.log))
    )


def start_agent(
    paths: LabPaths,
    host: HostRecord,
    *,
    controller: str,
    mode: str,
    dataplane: str,
    token: str | None = None,
) -> ProcessRecord:
    state_dir = paths.agent_dir(host.name) / "state"
    state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    config = agent_config(
        host, controller=controller, mode=mode, dataplane=dataplane, state_dir=state_dir,
        token=token,
    )  # fmt: skip
    config_path = paths.agent_config(host.name)
    # Private: until the agent's first start it holds a live enrollment token.
    try:
        write_private_file(config_path, yaml.safe_dump(config, sort_keys=False).encode())
    except OSError as exc:  # UnsafeLocation included: its reason says what is wrong
        raise DaemonError(f"cannot write {config_path}: {exc.strerror or exc}") from exc
    argv = [ip_binary(), "netns", "exec", host.netns, program("bulkhead-agent"),
            "--config", str(config_path)]  # fmt: skip
    log = paths.agent_log(host.name)
    env = {**AGENT_UNIT_ENVIRONMENT, "BULKHEAD_REQUIRE_NETNS": "1"}
    started = start_detached(argv, log, env=env, cwd=paths.root)
    return ProcessRecord(
        role=Role.AGENT,
        host=host.name,
        pid=started.pid,
        start_ticks=started.start_ticks,
        argv=argv,
        log=str(log),
    )


def list_agents(
    address: str, credentials: Path, *, timeout: float = _RPC_TIMEOUT
) -> list[admin_pb2.AgentSummary]:
    """The controller's view of the agents; DaemonError if it cannot be asked."""
    with admin_channel(address, credentials) as channel:
        stub = _admin_stub(channel)
        try:
            reply: admin_pb2.ListAgentsResponse = stub.ListAgents(
                admin_pb2.ListAgentsRequest(), timeout=timeout
            )
        except grpc.RpcError as exc:
            detail = exc.details() if isinstance(exc, grpc.Call) else str(exc)
            raise DaemonError(f"controller {address}: {detail}") from exc
    return list(reply.agents)


def readiness_problems(
    agents: Sequence[admin_pb2.AgentSummary],
    expected: Sequence[str],
    changed_from: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """Why each expected agent is not ready yet (empty: all ready). With CHANGED_FROM, an
    agent listed there is ready only once its desired hash differs from the one given
    (the controller has compiled a change for it)."""
    by_id = {agent.agent_id: agent for agent in agents}
    problems: dict[str, str] = {}
    for name in expected:
        agent = by_id.get(name)
        if agent is None:
            problems[name] = "not registered with the controller"
        elif not agent.connected:
            problems[name] = "not connected"
        elif not agent.desired_hash:
            problems[name] = "no ruleset compiled yet"
        elif changed_from is not None and agent.desired_hash == changed_from.get(name):
            problems[name] = "policy change not compiled yet"
        elif agent.applied_hash != agent.desired_hash:
            problems[name] = (
                f"applied {agent.applied_hash[:12] or '-'} != desired {agent.desired_hash[:12]}"
            )
    return problems


def wait_ready(
    address: str,
    credentials: Path,
    agents: Sequence[ProcessRecord],
    *,
    changed_from: Mapping[str, str] | None = None,
    timeout: float = READY_TIMEOUT,
) -> list[admin_pb2.AgentSummary]:
    """Poll the controller until every agent in AGENTS is ready; DaemonError naming the
    agents that are not, with the end of their logs, after TIMEOUT or if one exits."""
    names = [record.host or "" for record in agents]
    deadline = time.monotonic() + timeout
    problems: dict[str, str] = {}
    while True:
        for record in agents:
            if not is_alive(record.pid, record.start_ticks):
                raise DaemonError(
                    f"agent {record.host} exited; its log ends with:\n" + log_tail(Path(record.log))
                )
        try:
            summaries = list_agents(address, credentials)
            problems = readiness_problems(summaries, names, changed_from)
        except DaemonError as exc:
            problems = dict.fromkeys(names, str(exc))
        if not problems:
            return summaries
        if time.monotonic() >= deadline:
            break
        time.sleep(_POLL)
    lines = [f"agents not ready after {timeout:.0f} s: "
             + "; ".join(f"{name} ({why})" for name, why in problems.items())]  # fmt: skip
    for record in agents:
        if record.host in problems:
            lines.append(f"--- end of {record.log} ---\n{log_tail(Path(record.log), 10)}")
    raise DaemonError("\n".join(lines))
