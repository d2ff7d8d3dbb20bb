"""The Vagrant lab's provisioning, run for real on this machine: vagrant/provision-*.sh
against temporary roots, with three network namespaces standing in for the three VMs.

What `vagrant up` does across VMs happens here in the same order:

1. controller (namespace bh-vg-ctl-*, a bridge holding 198.18.47.10/24): a real
   bulkhead-controller, started from the unit's ExecStart (systemd's part), then
   provision-controller.sh inside the namespace: unit placed, operator certificate, one
   enrollment token per workload, examples/web-db.yaml applied.
2. web and db (bh-vg-web-*, bh-vg-db-*, each a veth on that bridge): provision-agent.sh
   with the token file the Vagrantfile's trigger would copy over, writing config, unit
   and state dir below the workload's root; then the agent the written unit runs, started
   inside the namespace with BULKHEAD_REQUIRE_NETNS=1.
3. the controller (asked with the operator certificate the provisioning issued) lists
   both agents connected, labelled from their tokens and in sync; the policy holds.

The scripts run with SYSTEMCTL="echo systemctl" (systemd is not driven, its calls are
recorded) and BULKHEAD_SKIP_INSTALL=1; each root's /opt/bulkhead/venv links to the venv
running the tests.
"""

from __future__ import annotations

import json
import os
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, TextIO

import pytest
import yaml

from lab.probe import in_netns, probe_tcp_address

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
VAGRANT_DIR = REPO / "vagrant"
PREFIX = "bh-vg-"
SUBNET = "198.18.47"
CONTROLLER_IP = f"{SUBNET}.10"
PORT = 50151
# name -> (address, labels of its token), as the Vagrantfile has them.
WORKLOADS: dict[str, tuple[str, dict[str, str]]] = {
    "web": (f"{SUBNET}.11", {"app": "web", "env": "vagrant"}),
    "db": (f"{SUBNET}.12", {"app": "db", "env": "vagrant"}),
}
VENV_PATH = "opt/bulkhead/venv"
FAKE_SYSTEMCTL = "echo systemctl"
SCRIPT_TIMEOUT = 120
START_TIMEOUT = 20.0
SYNC_TIMEOUT = 45.0
POLL = 0.3
PROBE_TIMEOUT = 1.0


def _unavailable() -> str | None:
    if os.geteuid() != 0:
        return "needs root to create network namespaces"
    for tool in ("ip", "nft", "bash"):
        if shutil.which(tool) is None:
            return f"needs the {tool!r} command"
    return None


@dataclass(frozen=True)
class Machine:
    """One VM of the Vagrantfile: a namespace and a directory as its filesystem root."""

    name: str
    netns: str
    root: Path
    address: str

    def command(self, argv: Sequence[str]) -> list[str]:
        return ["ip", "netns", "exec", self.netns, *argv]

    def path(self, absolute: str) -> Path:
        """An absolute path of the VM, below this machine's root."""
        return self.root / absolute.lstrip("/")


def _ip(*argv: str) -> None:
    subprocess.run(["ip", *argv], check=True, capture_output=True, text=True, timeout=30)


def _kill_inside(netns: str) -> None:
    # Only namespaces this test created, so only processes it started.
    listing = subprocess.run(
        ["ip", "netns", "pids", netns], check=False, capture_output=True, text=True, timeout=30
    )
    for pid in listing.stdout.split():
        with suppress(ProcessLookupError):
            os.kill(int(pid), signal.SIGKILL)


@contextmanager
def _machines(base: Path) -> Iterator[dict[str, Machine]]:
    """The controller and the workloads, wired as the Vagrantfile's private network."""
    tag = secrets.token_hex(3)
    machines = {"controller": Machine("controller", f"{PREFIX}ctl-{tag}", base / "controller",
                                      CONTROLLER_IP)}  # fmt: skip
    for name, (address, _) in WORKLOADS.items():
        machines[name] = Machine(name, f"{PREFIX}{name}-{tag}", base / name, address)
    created: list[str] = []
    try:
        for machine in machines.values():
            _ip("netns", "add", machine.netns)
            created.append(machine.netns)
            _ip("-n", machine.netns, "link", "set", "lo", "up")
            venv = machine.path(VENV_PATH)
            venv.parent.mkdir(parents=True)
            venv.symlink_to(sys.prefix)
        ctl = machines["controller"].netns
        _ip("-n", ctl, "link", "add", "br0", "type", "bridge")
        _ip("-n", ctl, "address", "add", f"{CONTROLLER_IP}/24", "dev", "br0")
        _ip("-n", ctl, "link", "set", "br0", "up")
        for name in WORKLOADS:
            workload = machines[name]
            _ip("-n", ctl, "link", "add", f"vg-{name}", "type", "veth",
                "peer", "name", "eth0", "netns", workload.netns)  # fmt: skip
            _ip("-n", ctl, "link", "set", f"vg-{name}", "master", "br0", "up")
            _ip("-n", workload.netns, "address", "add", f"{workload.address}/24", "dev", "eth0")
            _ip("-n", workload.netns, "link", "set", "eth0", "up")
        yield machines
    finally:
        for netns in reversed(created):
            _kill_inside(netns)
            with suppress(subprocess.CalledProcessError):
                _ip("netns", "del", netns)


class Daemons:
    """Processes the test started, each with a log file; all stopped on close."""

    def __init__(self, logs: Path) -> None:
        self._logs = logs
        self._running: list[tuple[str, subprocess.Popen[bytes], TextIO]] = []
        self.log_of: dict[str, Path] = {}

    def start(self, name: str, argv: Sequence[str], env: Mapping[str, str]) -> None:
        log_path = self._logs / f"{name}.log"
        log = log_path.open("w")
        process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=dict(env))
        self._running.append((name, process, log))
        self.log_of[name] = log_path

    def check_alive(self) -> None:
        for name, process, _ in self._running:
            assert process.poll() is None, f"{name} exited:\n{self.tail(name)}"

    def tail(self, name: str, lines: int = 25) -> str:
        return "\n".join(self.log_of[name].read_text().splitlines()[-lines:])

    def close(self) -> None:
        for _, process, log in reversed(self._running):
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait(timeout=10)
            log.close()


@pytest.fixture
def lab() -> Iterator[tuple[dict[str, Machine], Daemons]]:
    reason = _unavailable()
    if reason:
        pytest.skip(reason)
    with ExitStack() as stack:
        base = Path(tempfile.mkdtemp(prefix="bh-vg-"))
        stack.callback(shutil.rmtree, base, ignore_errors=True)
        (base / "logs").mkdir()
        daemons = Daemons(base / "logs")
        machines = stack.enter_context(_machines(base))
        # Registered last, so run first: processes end before their namespaces go.
        stack.callback(daemons.close)
        yield machines, daemons


def exec_start(unit: Path, machine: Machine) -> list[str]:
    """The unit's ExecStart= command, its absolute paths taken below the machine's root."""
    for line in unit.read_text().splitlines():
        key, sep, value = line.partition("=")
        if sep and key.strip() == "ExecStart":
            words = shlex.split(value)
            return [str(machine.path(w)) if w.startswith("/") else w for w in words]
    raise AssertionError(f"{unit} has no ExecStart=")


def provision(machine: Machine, script: str, settings: Mapping[str, str]) -> str:
    """Run vagrant/SCRIPT as Vagrant would, inside the machine's namespace; its stdout."""
    env = {
        "PATH": os.environ["PATH"],
        "ROOT": str(machine.root),
        "SYSTEMCTL": FAKE_SYSTEMCTL,
        "BULKHEAD_SKIP_INSTALL": "1",
        **settings,
    }
    done = subprocess.run(
        machine.command(["bash", str(VAGRANT_DIR / script)]),
        env=env, capture_output=True, text=True, timeout=SCRIPT_TIMEOUT, check=False,
    )  # fmt: skip
    assert done.returncode == 0, f"{script} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def wait_listening(machine: Machine, daemons: Daemons) -> None:
    def connects() -> bool:
        with socket.socket() as sock:
            sock.settimeout(0.5)
            return sock.connect_ex(("127.0.0.1", PORT)) == 0

    deadline = time.monotonic() + START_TIMEOUT
    while not in_netns(machine.netns, connects):
        daemons.check_alive()
        assert time.monotonic() < deadline, f"no controller on port {PORT} after {START_TIMEOUT} s"
        time.sleep(POLL)


def list_agents(controller: Machine) -> dict[str, dict[str, Any]]:
    """AdminService.ListAgents through `bulkhead get agents` with the provisioned operator."""
    argv = [str(controller.path(f"{VENV_PATH}/bin/bulkhead")),
            "--controller", f"127.0.0.1:{PORT}",
            "--credentials", str(controller.path("/etc/bulkhead/operator")),
            "get", "agents", "-o", "json"]  # fmt: skip
    done = subprocess.run(
        controller.command(argv), capture_output=True, text=True, timeout=30, check=False
    )
    assert done.returncode == 0, f"bulkhead get agents: {done.stderr}"
    return {agent["agent_id"]: agent for agent in json.loads(done.stdout)["agents"]}


def sync_problems(agents: Mapping[str, Mapping[str, Any]]) -> dict[str, str]:
    """Why each workload is not yet enrolled, connected and enforcing its desired ruleset."""
    problems: dict[str, str] = {}
    for name, (address, _) in WORKLOADS.items():
        agent = agents.get(name)
        if agent is None:
            problems[name] = "not registered"
        elif not agent["connected"]:
            problems[name] = "not connected"
        elif address not in agent["addresses"]:
            problems[name] = f"has not reported {address} yet"
        elif not agent["desired_hash"] or agent["applied_hash"] != agent["desired_hash"]:
            problems[name] = (
                f"applied {agent['applied_hash']!r} != desired {agent['desired_hash']!r}"
            )
    return problems


def wait_in_sync(controller: Machine, daemons: Daemons) -> dict[str, dict[str, Any]]:
    deadline = time.monotonic() + SYNC_TIMEOUT
    while True:
        daemons.check_alive()
        agents = list_agents(controller)
        problems = sync_problems(agents)
        if not problems:
            return agents
        if time.monotonic() >= deadline:
            logs = "\n".join(f"--- {n} ---\n{daemons.tail(n)}" for n in WORKLOADS)
            raise AssertionError(f"not in sync after {SYNC_TIMEOUT} s: {problems}\n{logs}")
        time.sleep(POLL)


def provision_controller(controller: Machine, daemons: Daemons) -> None:
    unit = REPO / "systemd" / "bulkhead-controller.service"
    # systemd's part: the service the script enables, as its unit runs it.
    daemons.start("controller", controller.command(exec_start(unit, controller)), os.environ)
    wait_listening(controller, daemons)
    workloads = " ".join(
        f"{name}:{','.join(f'{k}={v}' for k, v in labels.items())}"
        for name, (_, labels) in WORKLOADS.items()
    )
    output = provision(controller, "provision-controller.sh",
                       {"WORKLOADS": workloads, "READY_WAIT": "30",
                        "ALLOWED_RANGES": f"{SUBNET}.0/24"})  # fmt: skip
    assert "systemctl enable --now bulkhead-controller.service" in output.splitlines()
    placed = controller.path("/etc/systemd/system/bulkhead-controller.service")
    assert placed.read_text() == unit.read_text()
    link = controller.path("/usr/local/bin/bulkhead")
    assert link.readlink() == Path("/", VENV_PATH, "bin", "bulkhead")  # as the VM sees it
    for name in ("operator.crt", "operator.key", "ca.crt"):
        assert controller.path(f"/etc/bulkhead/operator/{name}").stat().st_mode & 0o077 == 0


def provision_workload(workload: Machine, controller: Machine, daemons: Daemons) -> None:
    token_file = controller.path(f"/var/lib/bulkhead/enrollment/{workload.name}.token")
    assert token_file.stat().st_mode & 0o777 == 0o600
    output = provision(workload, "provision-agent.sh", {
        "CONTROLLER": f"{CONTROLLER_IP}:{PORT}",
        "AGENT_ID": workload.name,
        "TOKEN_FILE": str(token_file),
    })  # fmt: skip
    assert "systemctl enable --now bulkhead-agent.service" in output.splitlines()
    config_path = workload.path("/etc/bulkhead/agent.yaml")
    state_dir = workload.path("/var/lib/bulkhead/agent")
    assert config_path.stat().st_mode & 0o777 == 0o600
    assert state_dir.stat().st_mode & 0o777 == 0o700
    config = yaml.safe_load(config_path.read_text())
    assert config["agent_id"] == workload.name
    assert config["controller"] == f"{CONTROLLER_IP}:{PORT}"
    assert config["token"] == token_file.read_text().strip()
    # systemd's StateDirectory= is the config's default /var/lib/bulkhead/agent; here the
    # state belongs below the workload's root like everything else.
    config["state_dir"] = str(state_dir)
    config_path.write_text(yaml.safe_dump(config))
    unit = workload.path("/etc/systemd/system/bulkhead-agent.service")
    env = {**os.environ, "BULKHEAD_REQUIRE_NETNS": "1"}
    daemons.start(workload.name, workload.command(exec_start(unit, workload)), env)


def test_provisioned_vms_enroll_sync_and_enforce_the_example_policy(
    lab: tuple[dict[str, Machine], Daemons],
) -> None:
    machines, daemons = lab
    controller = machines["controller"]
    provision_controller(controller, daemons)
    for name in WORKLOADS:
        provision_workload(machines[name], controller, daemons)

    agents = wait_in_sync(controller, daemons)

    for name, (address, labels) in WORKLOADS.items():
        assert agents[name]["labels"] == labels  # from the token, not from the host
        assert agents[name]["mode"] == "MODE_ENFORCE"
        # The token pinned the range: the agent holds its own address, inside it.
        assert agents[name]["allowed_ranges"] == [f"{SUBNET}.0/24"]
        assert address in agents[name]["addresses"]
    web, db = machines["web"], machines["db"]
    listeners = [
        in_netns(machine.netns, partial(_listen, machine.address, port))
        for machine, port in ((db, 5432), (db, 5433), (web, 5432))
    ]
    try:
        assert probe_tcp_address(web.netns, db.address, 5432, timeout=PROBE_TIMEOUT).connected
        assert not probe_tcp_address(web.netns, db.address, 5433, timeout=PROBE_TIMEOUT).connected
        assert not probe_tcp_address(db.netns, web.address, 5432, timeout=PROBE_TIMEOUT).connected
    finally:
        for listener in listeners:
            listener.close()
    table = subprocess.run(db.command(["nft", "list", "table", "inet", "bulkhead"]),
                           capture_output=True, text=True, timeout=30, check=True)  # fmt: skip
    assert "5432" in table.stdout


def _listen(address: str, port: int) -> socket.socket:
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((address, port))
    sock.listen(4)
    return sock
