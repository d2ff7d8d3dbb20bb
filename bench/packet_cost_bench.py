"""Per-packet cost: new TCP connections per second through 10,000 allowed peers in a set,
through the same policy as one rule per peer, and through no firewall at all.

Run as root: .venv/bin/python bench/packet_cost_bench.py [--peers 10000] [--rounds 14]
             [--seconds 1.5] [--clients 4] [--markdown]

Namespaces bh-pc-<pid>-srv and bh-pc-<pid>-cli (always deleted, with whatever runs in
them) are joined by a veth pair. Two servers (SO_REUSEPORT) accept on tcp/5432 and close
at once; CLIENTS generator processes connect and close (SO_LINGER 0: a reset, so no
TIME_WAIT uses up ports) as fast as they can. The server namespace holds one of five
configurations, run interleaved (a, b, c, d, e, a, b, ...) so drift hits all alike:
* a: no firewall at all (no table, so no conntrack either);
* b: Bulkhead's table, loaded by the agent's backend (make_backend("nftables")), allowing
  tcp/5432 from one set of PEERS host addresses, the client's among them;
* c: the same policy as one rule per peer: a table whose input chain (policy drop) takes
  loopback, established/related and invalid as Bulkhead's does, then PEERS rules
  `ip saddr X tcp dport 5432 counter accept` (nft -f). The client's address sorts last,
  so each new connection's first packet walks all of them; later packets are
  established in b and c alike, so b against c is the peer lookup of each SYN;
* d: conntrack alone (established/related accepted, policy accept), to tell how much of
  b's cost any stateful firewall pays;
* e: the set form without connection tracking for the allowed service (hand-written,
  not Bulkhead's table): `notrack` at raw priority for tcp/5432 from the set and for its
  replies, then stateless accepts where b has `ct state`. What an opt-in untracked rule
  (Calico's doNotTrack) would load, to show what the per-packet target costs.

A phase is SECONDS of load; its rate is the connections per second of all generators.
Printed per configuration: the median over ROUNDS phases, b/a, c/a and b/d (target,
issue 17: b/d >= 0.90, within 10% of connection tracking alone), and the median of
per-round ratios (each phase against its round's a). After each
phase the allow rule's counter must have counted at least the connections made, and in
round one a connection from a client address outside the set must fail, or the bench
stops with an error.

This is a 2-core machine: generators, servers and the kernel's softirq work share both
cores, so the rate is CPU-bound and a firewall's cost shows as its share of the CPU spent
per connection. Other jobs on the machine add noise; interleaving spreads it evenly.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import select
import signal
import socket
import statistics
import struct
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PEERS = 10_000
ROUNDS = 14
SECONDS = 1.5
CLIENTS = 4
SERVERS = 2
PORT = 5432
BACKLOG = 65535  # with net.core.somaxconn raised to it in the server namespace
SERVER_ADDRESS = "198.19.255.1"
CLIENT_ADDRESS = "198.19.255.2"  # above every other peer: a rule list reaches it last
OUTSIDER_ADDRESS = "198.19.255.3"  # also on the client, in no set: must be refused
PEERS_FROM = ipaddress.IPv4Address("198.18.0.1")
PREFIX_LENGTH = 24
CONNECT_TIMEOUT = 1.0
PROBE_TIMEOUT = 0.5
SETTLE_SECONDS = 0.3  # after a load, so RCU frees the previous rules before the phase
CHILD_LIFETIME = 900  # seconds; an alarm ends any child the parent failed to stop
REPLY_TIMEOUT = 120.0
PER_PEER_TABLE = "perpeer"
SET_GROUP = "clients"
CONFIGS = {
    "none": "a: no firewall",
    "sets": "b: Bulkhead, set",
    "rules": "c: rule per peer",
    "conntrack": "d: conntrack only",
    "untracked": "e: set, untracked",
}
CONNTRACK_TABLE = "conntrack"
# Configuration d: state tracking and nothing else, so b's cost splits into conntrack's
# (any stateful firewall pays it) and that of Bulkhead's rules.
CONNTRACK_SCRIPT = f"""table inet {CONNTRACK_TABLE} {{
  chain input {{
    type filter hook input priority 0; policy accept;
    ct state established,related accept
  }}
}}
"""
UNTRACKED_TABLE = "untracked"
OPEN_CONFIGS = ("none", "conntrack")  # configurations that let anyone in
NAMESPACE_PREFIX = "bh-pc-"
LINGER_RESET = struct.pack("ii", 1, 0)  # l_onoff=1, l_linger=0: close sends a reset


def allowed_peers(count: int) -> list[str]:
    """COUNT addresses in ascending order, the client's last."""
    return [str(PEERS_FROM + i) for i in range(count - 1)] + [CLIENT_ADDRESS]


def untracked_rules(peers: Sequence[str]) -> str:
    """Configuration e as an `nft -f` script: the allowed service bypasses conntrack."""
    lines = [
        f"table inet {UNTRACKED_TABLE} {{",
        f"  set {SET_GROUP} {{ type ipv4_addr; elements = {{ {', '.join(peers)} }} }}",
        "  chain raw_in {",
        "    type filter hook prerouting priority raw;",
        f"    ip saddr @{SET_GROUP} tcp dport {PORT} notrack",
        "  }",
        "  chain raw_out {",
        "    type filter hook output priority raw;",
        f"    ip daddr @{SET_GROUP} tcp sport {PORT} notrack",
        "  }",
        "  chain input {",
        "    type filter hook input priority 0; policy drop;",
        '    iif "lo" accept',
        "    ct state established,related accept",
        "    ct state invalid drop",
        f"    ip saddr @{SET_GROUP} tcp dport {PORT} counter accept",
        "  }",
        "  chain output {",
        "    type filter hook output priority 0; policy drop;",
        '    oif "lo" accept',
        "    ct state established,related accept",
        f"    ip daddr @{SET_GROUP} tcp sport {PORT} accept",
        "  }",
        "}",
    ]
    return "\n".join(lines) + "\n"


def per_peer_rules(peers: Sequence[str]) -> str:
    """Configuration c as an `nft -f` script."""
    lines = [
        f"table inet {PER_PEER_TABLE} {{",
        "  chain input {",
        "    type filter hook input priority 0; policy drop;",
        '    iif "lo" accept',
        "    ct state established,related accept",
        "    ct state invalid drop",
        *(f"    ip saddr {peer} tcp dport {PORT} counter accept" for peer in peers),
        "  }",
        "  chain output {",
        "    type filter hook output priority 0; policy drop;",
        '    oif "lo" accept',
        "    ct state established,related accept",
        "  }",
        "}",
    ]
    return "\n".join(lines) + "\n"


# --- child processes (each started inside a namespace with `ip netns exec`) -------------


def serve() -> None:
    """Accept on SERVER_ADDRESS:PORT and close at once, until killed."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    listener.bind((SERVER_ADDRESS, PORT))
    listener.listen(BACKLOG)
    print(json.dumps("ready"), flush=True)
    while True:
        connection, _ = listener.accept()
        connection.close()


def _connect(source: str | None, timeout: float) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RESET)
        sock.settimeout(timeout)
        if source is not None:
            sock.bind((source, 0))
        try:
            sock.connect((SERVER_ADDRESS, PORT))
        except OSError:
            return False
        return True


def generate() -> None:
    """Commands on stdin: `run SECONDS` (connect/close loop; replies made, failed,
    elapsed) and `probe SOURCE` (one connection from SOURCE; replies true or false)."""
    for line in sys.stdin:
        command, argument = line.split()
        if command == "probe":
            print(json.dumps(_connect(argument, PROBE_TIMEOUT)), flush=True)
            continue
        made = failed = 0
        started = time.monotonic()
        deadline = started + float(argument)
        while time.monotonic() < deadline:
            if _connect(None, CONNECT_TIMEOUT):
                made += 1
            else:
                failed += 1
        elapsed = time.monotonic() - started
        print(json.dumps({"made": made, "failed": failed, "elapsed": elapsed}), flush=True)


def _nft(*argv: str, stdin: str | None = None) -> str:
    return subprocess.run(
        ["nft", *argv], input=stdin, check=True, capture_output=True, text=True, timeout=120
    ).stdout


def _allow_rule_packets(config: str) -> int:
    """Packets counted by the rule that accepts the client: Bulkhead's set rule, the
    client's own rule in configuration c, the set rule in e."""
    table, marker = {
        "sets": ("bulkhead", f"@{SET_GROUP}_v4"),
        "rules": (PER_PEER_TABLE, CLIENT_ADDRESS),
        "untracked": (UNTRACKED_TABLE, f"@{SET_GROUP}"),
    }[config]
    listing = json.loads(_nft("-j", "list", "table", "inet", table))
    for item in listing["nftables"]:
        expressions = item.get("rule", {}).get("expr", [])
        counters = [int(e["counter"]["packets"]) for e in expressions if "counter" in e]
        if counters and any(e.get("match", {}).get("right") == marker for e in expressions):
            return counters[0]
    raise LookupError(f"no rule matching {marker} in table inet {table}")


def firewall(peers: int) -> None:
    """Commands on stdin: `load CONFIG` (removes what is loaded, loads CONFIG, replies
    the seconds it took) and `count CONFIG` (replies _allow_rule_packets)."""
    from agent.dataplane.baseline import Baseline, Mode, PortSpec
    from agent.dataplane.select import make_backend
    from bulkhead.v1 import ruleset_pb2 as pb

    addresses = allowed_peers(peers)
    ruleset = pb.Ruleset()
    ruleset.sets.add(name=SET_GROUP, hosts=addresses)
    ruleset.rules.add(
        direction=pb.DIRECTION_INGRESS,
        protocol=pb.PROTOCOL_TCP,
        ports=[pb.PortRange(first=PORT, last=PORT)],
        peer_set=SET_GROUP,
        action=pb.ACTION_ALLOW,
        policy="bench-clients",
        id="r-clients",
    )
    baseline = Baseline(mode=Mode.ENFORCE, failsafe_inbound=(PortSpec("tcp", 22, 22),))
    scripts = {"rules": (PER_PEER_TABLE, per_peer_rules(addresses))}
    scripts["conntrack"] = (CONNTRACK_TABLE, CONNTRACK_SCRIPT)
    scripts["untracked"] = (UNTRACKED_TABLE, untracked_rules(addresses))
    backend = make_backend("nftables")  # kept for the run, as an agent keeps its table
    loaded = "none"
    for line in sys.stdin:
        command, config = line.split()
        if command == "count":
            print(json.dumps(_allow_rule_packets(config)), flush=True)
            continue
        if loaded == "sets":
            backend.remove()
        elif loaded in scripts:
            _nft("delete", "table", "inet", scripts[loaded][0])
        started = time.perf_counter()
        if config == "sets":
            backend.apply(ruleset, baseline)
        elif config in scripts:
            _nft("-f", "-", stdin=scripts[config][1])
        elapsed = time.perf_counter() - started
        loaded = config
        tables = json.loads(_nft("-j", "list", "tables"))["nftables"]
        names = sorted(item["table"]["name"] for item in tables if "table" in item)
        wanted = (
            ["bulkhead"] if config == "sets" else [scripts[config][0]] if config in scripts else []
        )
        if names != wanted:
            raise RuntimeError(f"after loading {config}: tables {names}, want {wanted}")
        print(json.dumps(elapsed), flush=True)


# --- the parent: namespaces, children, phases ------------------------------------------


def _ip(*argv: str) -> None:
    subprocess.run(["ip", *argv], check=True, capture_output=True, text=True, timeout=60)


@dataclass(frozen=True)
class Lab:
    server: str
    client: str


@contextmanager
def lab() -> Iterator[Lab]:
    """The two namespaces joined by a veth pair; deleted on exit with all inside them."""
    names = Lab(f"{NAMESPACE_PREFIX}{os.getpid()}-srv", f"{NAMESPACE_PREFIX}{os.getpid()}-cli")
    created: list[str] = []
    try:
        for name in (names.server, names.client):
            _ip("netns", "add", name)
            created.append(name)
            _ip("-n", name, "link", "set", "lo", "up")
        # Created straight into the namespaces: no interface ever exists in the root one.
        _ip("-n", names.server, "link", "add", "srv0", "type", "veth", "peer", "cli0")
        _ip("-n", names.server, "link", "set", "cli0", "netns", names.client)
        _ip(
            "-n", names.server, "address", "add", f"{SERVER_ADDRESS}/{PREFIX_LENGTH}", "dev", "srv0"
        )
        for address in (CLIENT_ADDRESS, OUTSIDER_ADDRESS):
            _ip("-n", names.client, "address", "add", f"{address}/{PREFIX_LENGTH}", "dev", "cli0")
        _ip("-n", names.server, "link", "set", "srv0", "up")
        # A full accept queue drops a SYN, and its client then waits a second for the
        # retransmission: room for bursts while the servers wait for a CPU.
        _ip("netns", "exec", names.server, "sysctl", "-qw", f"net.core.somaxconn={BACKLOG}")
        _ip("-n", names.client, "link", "set", "cli0", "up")
        yield names
    finally:
        for name in created:
            pids = subprocess.run(
                ["ip", "netns", "pids", name], check=False, capture_output=True, text=True
            ).stdout.split()
            for pid in pids:  # only our children can be in namespaces we made
                with suppress(ProcessLookupError):
                    os.kill(int(pid), signal.SIGKILL)
            subprocess.run(["ip", "netns", "del", name], check=False, capture_output=True)


class Child:
    """One of our child processes inside a namespace, answering one JSON line per command."""

    def __init__(self, namespace: str, role: str, *args: str) -> None:
        argv = [sys.executable, str(Path(__file__).resolve()), f"--role={role}", *args]
        self.role = role
        self.process = subprocess.Popen(
            ["ip", "netns", "exec", namespace, *argv],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            bufsize=1,
        )

    def send(self, line: str) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(line + "\n")
        self.process.stdin.flush()

    def reply(self, timeout: float = REPLY_TIMEOUT) -> Any:
        assert self.process.stdout is not None
        ready, _, _ = select.select([self.process.stdout], [], [], timeout)
        line = self.process.stdout.readline() if ready else ""
        if not line:
            raise RuntimeError(f"{self.role} child gave no reply within {timeout} s")
        return json.loads(line)

    def ask(self, line: str, timeout: float = REPLY_TIMEOUT) -> Any:
        self.send(line)
        return self.reply(timeout)

    def stop(self) -> None:
        # Nothing to finish cleanly: what the firewall child loaded goes with the namespace.
        self.process.kill()
        self.process.wait(timeout=10)


@dataclass(frozen=True)
class Phase:
    config: str
    rate: float  # connections per second, all generators together
    failed: int  # connects that timed out (each cost its generator CONNECT_TIMEOUT)
    load_seconds: float


def run_phase(
    config: str, seconds: float, fw: Child, generators: Sequence[Child], *, first: bool
) -> Phase:
    load_seconds = float(fw.ask(f"load {config}"))
    time.sleep(SETTLE_SECONDS)
    # The policy must be the one in force: the client gets through, an outsider does not
    # (asked once per configuration: a refused probe waits for its timeout).
    if not generators[0].ask(f"probe {CLIENT_ADDRESS}"):
        sys.exit(f"{config}: the client could not connect")
    if first and generators[0].ask(f"probe {OUTSIDER_ADDRESS}") != (config in OPEN_CONFIGS):
        sys.exit(f"{config}: a connection from outside the set was not handled as expected")
    counted_before = 0 if config in OPEN_CONFIGS else int(fw.ask(f"count {config}"))
    for generator in generators:
        generator.send(f"run {seconds}")
    results = [generator.reply(seconds + REPLY_TIMEOUT) for generator in generators]
    made = sum(int(r["made"]) for r in results)
    counted = made if config in OPEN_CONFIGS else int(fw.ask(f"count {config}")) - counted_before
    if counted < made:
        sys.exit(f"{config}: the allow rule counted {counted} packets for {made} connections")
    rate = sum(r["made"] / r["elapsed"] for r in results)
    return Phase(config, rate, sum(int(r["failed"]) for r in results), load_seconds)


def measure(args: argparse.Namespace) -> list[Phase]:
    children: list[Child] = []
    try:
        with lab() as names:
            servers = [Child(names.server, "serve") for _ in range(SERVERS)]
            children += servers
            for server in servers:
                if server.reply(60) != "ready":
                    sys.exit("a server did not start")
            fw = Child(names.server, "firewall", f"--peers={args.peers}")
            generators = [Child(names.client, "generate") for _ in range(args.clients)]
            children += [fw, *generators]
            run_phase("none", 1.0, fw, generators, first=False)  # warm-up, not counted
            phases = []
            for round_number in range(args.rounds):
                for config in CONFIGS:
                    phases.append(
                        run_phase(config, args.seconds, fw, generators, first=round_number == 0)
                    )
                print(
                    f"round {round_number + 1}/{args.rounds}: "
                    + ", ".join(f"{p.config} {p.rate:,.0f}/s" for p in phases[-len(CONFIGS) :]),
                    flush=True,
                )
            return phases
    finally:
        for child in children:
            child.stop()


def report(phases: Sequence[Phase], args: argparse.Namespace) -> None:
    from rich import box
    from rich.console import Console
    from rich.table import Table

    console = Console()
    if not console.is_terminal:
        console.width = 200
    table = Table(
        title=f"New TCP connections per second, {args.peers:,} allowed peers, "
        f"{args.rounds} rounds of {args.seconds:g} s, {args.clients} generator processes",
        box=box.MARKDOWN if args.markdown else box.SIMPLE_HEAD,
    )
    for column in ("configuration", "median /s", "min /s", "max /s", "vs a", "failed", "load s"):
        table.add_column(column, justify="left" if column == "configuration" else "right")
    by_config = {c: [p for p in phases if p.config == c] for c in CONFIGS}
    medians = {c: statistics.median(p.rate for p in ps) for c, ps in by_config.items()}
    for config, config_phases in by_config.items():
        rates = [p.rate for p in config_phases]
        table.add_row(
            CONFIGS[config],
            f"{medians[config]:,.0f}",
            f"{min(rates):,.0f}",
            f"{max(rates):,.0f}",
            f"{medians[config] / medians['none']:.3f}",
            str(sum(p.failed for p in config_phases)),
            f"{statistics.median(p.load_seconds for p in config_phases):.3f}",
        )
    console.print(table)
    per_round = {
        c: [p.rate / a.rate for p, a in zip(by_config[c], by_config["none"], strict=True)]
        for c in ("sets", "rules", "conntrack", "untracked")
    }
    ratio = medians["sets"] / medians["conntrack"]
    paired = {c: statistics.median(ratios) for c, ratios in per_round.items()}
    console.print(
        f"b/a = {medians['sets'] / medians['none']:.3f}, "
        f"c/a = {medians['rules'] / medians['none']:.3f}, "
        f"b/c = {medians['sets'] / medians['rules']:.2f}, "
        f"b/d = {ratio:.3f} (target >= 0.90: {'met' if ratio >= 0.90 else 'NOT met'}); "
        f"median of per-round ratios: b/a {paired['sets']:.3f}, c/a {paired['rules']:.3f}, "
        f"d/a {paired['conntrack']:.3f}, e/a {paired['untracked']:.3f}"
    )
    console.print(
        f"{os.cpu_count()} CPUs shared by {args.clients} generators, {SERVERS} servers and the "
        "kernel: the rate is CPU-bound, the firewall's cost is its share of CPU per connection"
    )


def positive(text: str) -> int:
    if not text.strip().isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive whole number")
    return int(text)


def peer_count(text: str) -> int:
    count = positive(text)
    if count > int(ipaddress.IPv4Address(CLIENT_ADDRESS)) - int(PEERS_FROM) - 256:
        raise argparse.ArgumentTypeError(f"{count:,} peers do not fit below {CLIENT_ADDRESS}")
    return count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--peers", type=peer_count, default=PEERS)
    parser.add_argument("--rounds", type=positive, default=ROUNDS)
    parser.add_argument("--seconds", type=float, default=SECONDS, help="per phase, 0.1-60")
    parser.add_argument("--clients", type=positive, default=CLIENTS, help="generator processes")
    parser.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    parser.add_argument("--role", choices=("serve", "generate", "firewall"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if not 0.1 <= args.seconds <= 60:
        parser.error(f"--seconds: {args.seconds:g} is not between 0.1 and 60")

    if args.role is not None:
        signal.alarm(CHILD_LIFETIME)  # a child outlives no parent by long
        if args.role == "serve":
            serve()
        elif args.role == "generate":
            generate()
        else:
            firewall(args.peers)
        return
    if os.geteuid() != 0:
        sys.exit("needs root to create network namespaces")
    report(measure(args), args)


if __name__ == "__main__":
    main()
