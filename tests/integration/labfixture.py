"""A running lab (real controller, agents, nftables, CLI) shared by the end-to-end tests."""

from __future__ import annotations

import json
import os
import re
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

    def rules_present(self, host: str) -> bool:
        """Whether Bulkhead's rules are loaded on HOST, whichever the dataplane."""
        if self.state.dataplane == "iptables":
            return ":BULKHEAD-INPUT" in self.netns_run(host, "iptables-legacy-save")
        return bool(self.nft_table(host)["nftables"])

    def rules_fingerprint(self, host: str) -> str:
        """Bulkhead's rules and sets on HOST without counters, to compare before/after."""
        if self.state.dataplane == "iptables":
            saved = "".join(
                self.netns_run(host, tool, "-t", "filter")
                for tool in ("iptables-legacy-save", "ip6tables-legacy-save")
            )
            ours = [line for line in saved.splitlines() if "BULKHEAD" in line]
            # initval is a random hash seed drawn at each apply, not part of the policy.
            saved_sets = re.sub(r" initval 0x[0-9a-f]+", "", self.netns_run(host, "ipset", "save"))
            sets = saved_sets.splitlines()
            return "\n".join(
                ours + sorted(line for line in sets if " bh4-" in line or " bh6-" in line)
            )
        listing = self.netns_run(host, "nft", "list", "table", "inet", "bulkhead", check=False)
        listing = re.sub(r"counter packets \d+ bytes \d+", "counter", listing)
        # Ownership is not content: the owner's name, and the flags an orphan loses.
        listing = re.sub(r" # progname \S+", "", listing)
        return re.sub(r"\n\tflags [^\n]*\n", "\n", listing)

    def foreign_rules(self, host: str) -> str:
        """A listing of the rules someone else put on HOST (see add_foreign_rules)."""
        if self.state.dataplane == "iptables":
            listing = self.netns_run(host, "iptables-legacy-save", "-t", "filter")
            return "\n".join(
                line for line in listing.splitlines()
                if "FOREIGN" in line or ("-A INPUT" in line and "9999" in line)
            )  # fmt: skip
        return self.netns_run(host, "nft", "list", "table", "inet", "foreign")

    def add_foreign_rules(self, host: str) -> None:
        if self.state.dataplane == "iptables":
            self.netns_run(host, "iptables-legacy", "-N", "FOREIGN")
            self.netns_run(
                host,
                "iptables-legacy",
                "-A",
                "FOREIGN",
                "-p",
                "tcp",
                "--dport",
                "9999",
                "-j",
                "RETURN",
            )
            self.netns_run(
                host,
                "iptables-legacy",
                "-A",
                "INPUT",
                "-p",
                "tcp",
                "--dport",
                "9999",
                "-j",
                "FOREIGN",
            )
            return
        self.netns_run(
            host, "nft",
            "add table inet foreign; add chain inet foreign c; "
            "add rule inet foreign c tcp dport 9999 counter",
        )  # fmt: skip

    def remove_foreign_rules(self, host: str) -> None:
        if self.state.dataplane == "iptables":
            for args in (("-D", "INPUT", "-p", "tcp", "--dport", "9999", "-j", "FOREIGN"),
                         ("-F", "FOREIGN"), ("-X", "FOREIGN")):  # fmt: skip
                self.netns_run(host, "iptables-legacy", *args, check=False)
            return
        self.netns_run(host, "nft", "delete", "table", "inet", "foreign", check=False)

    def would_deny_packets(self, host: str) -> int:
        """Packets counted by the visibility-mode would-deny rules on HOST."""
        if self.state.dataplane == "iptables":
            total = 0
            for chain in ("BULKHEAD-INPUT", "BULKHEAD-OUTPUT"):
                listing = self.netns_run(host, "iptables-legacy", "-L", chain, "-v", "-x", "-n")
                total += sum(
                    int(line.split()[0]) for line in listing.splitlines() if "would-deny" in line
                )
            return total
        table = self.nft_table(host)["nftables"]
        assert isinstance(table, list)
        return sum(
            expr["counter"]["packets"]
            for item in table
            if "rule" in item and "would-deny" in item["rule"].get("comment", "")
            for expr in item["rule"]["expr"]
            if "counter" in expr
        )

    def netns_run(self, host: str, *argv: str, check: bool = True) -> str:
        return subprocess.run(
            ["ip", "netns", "exec", self.state.host(host).netns, *argv],
            capture_output=True, text=True, check=check, timeout=10,
        ).stdout  # fmt: skip

    def nft_table(self, host: str) -> dict[str, object]:
        """Our table's sets, chains and rules as nft's JSON, listed piecewise: nft 1.0.6
        prints the table of a killed agent (an orphan, flags: persist) as broken JSON."""
        items: list[object] = []
        commands = [["list", "sets", "table", "inet", "bulkhead"]] + [
            ["list", "chain", "inet", "bulkhead", chain]
            for chain in ("input", "output", "policy_in", "policy_out")
        ]
        for command in commands:
            result = subprocess.run(
                ["ip", "netns", "exec", self.state.host(host).netns, "nft", "-j", *command],
                capture_output=True, text=True, check=False, timeout=10,
            )  # fmt: skip
            if result.returncode == 0:
                listing = json.loads(result.stdout)["nftables"]
                items += [item for item in listing if "metainfo" not in item]
        return {"nftables": items}
