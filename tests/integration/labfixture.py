"""A running lab (real controller, agents, nftables, CLI) shared by the end-to-end tests."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from lab import topology
from lab.daemons import list_agents, program, wait_ready
from lab.iproute import link_exists
from lab.probe import in_netns, probe_hosts
from lab.state import LabState, Role, load_state

PROBE_TIMEOUT = 0.5


def lab_unavailable() -> str | None:
    if os.geteuid() != 0:
        return "needs root to create network namespaces"
    if topology.find_lab_namespaces() or link_exists(topology.UPLINK):
        return "a bulkhead-lab lab is already up on this machine; not touching it"
    return None


@dataclass
class Lab:
    directory: Path

    @property
    def state(self) -> LabState:
        return load_state(self.directory)

    def cli(self, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        """Run the operator CLI against the lab's controller."""
        return subprocess.run(
            [
                program("bulkhead"),
                "--controller",
                self.state.controller,
                "--credentials",
                self.state.credentials,
                *args,
            ],
            input=stdin,
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )

    def ok(self, *args: str, stdin: str | None = None) -> str:
        result = self.cli(*args, stdin=stdin)
        assert result.returncode == 0, f"bulkhead {' '.join(args)}: {result.stderr}"
        return result.stdout

    def wait_in_sync(self, timeout: float = 15.0) -> None:
        """Until every running agent enforces what the controller wants for it."""
        state = self.state
        agents = [p for p in state.processes if p.role is Role.AGENT]
        wait_ready(state.controller, Path(state.credentials), agents, timeout=timeout)

    def desired(self) -> dict[str, tuple[int, str]]:
        return {
            a.agent_id: (a.desired_revision, a.desired_hash)
            for a in list_agents(self.state.controller, Path(self.state.credentials))
        }

    def probe(self, source: str, target: str, port: int, *, ipv6: bool = False,
              timeout: float = PROBE_TIMEOUT) -> bool:  # fmt: skip
        return probe_hosts(self.state, source, target, port, ipv6=ipv6, timeout=timeout).connected

    def probe_until(self, source: str, target: str, port: int, *, want: bool,
                    within: float) -> float | None:  # fmt: skip
        """Seconds until the probe gives WANT (bounded by WITHIN), None if it never did."""
        start = time.monotonic()
        while time.monotonic() - start < within:
            if self.probe(source, target, port, timeout=0.3) is want:
                return time.monotonic() - start
            time.sleep(0.05)
        return None

    def start_echo(self, host: str, port: int) -> subprocess.Popen[str]:
        """A server on HOST:PORT that keeps connections open and echoes lines."""
        server = subprocess.Popen(
            ["ip", "netns", "exec", self.state.host(host).netns, sys.executable,
             str(Path(__file__).with_name("echo_server.py")), str(port)],
            stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        assert server.stdout is not None
        assert server.stdout.readline().strip() == "ready"
        return server

    def connect(
        self, source: str, target: str, port: int, *, bind: str | None = None, timeout: float = 2
    ) -> socket.socket:
        """A TCP socket opened from inside SOURCE's namespace (from address BIND if given)
        to TARGET:PORT."""

        def make() -> socket.socket:
            return socket.socket(socket.AF_INET, socket.SOCK_STREAM)

        sock: socket.socket = in_netns(self.state.host(source).netns, make)
        sock.settimeout(timeout)
        if bind is not None:
            sock.bind((bind, 0))
        sock.connect((self.state.host(target).ipv4, port))
        return sock

    def nft_table(self, host: str) -> dict[str, object]:
        out = subprocess.run(
            ["ip", "netns", "exec", self.state.host(host).netns,
             "nft", "-j", "list", "table", "inet", "bulkhead"],
            capture_output=True, text=True, check=True, timeout=10,
        ).stdout  # fmt: skip
        result: dict[str, object] = json.loads(out)
        return result
