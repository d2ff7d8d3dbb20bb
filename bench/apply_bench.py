"""How long the nftables backend takes to load big peer address sets into the kernel.

Run as root: .venv/bin/python bench/apply_bench.py [--sizes 1000,10000,100000] [--runs N]
             [--large-runs N] [--markdown]
Without root: .venv/bin/python bench/apply_bench.py --render-only

For each size the ruleset holds that many host addresses (nine in ten IPv4 from
198.18.0.0/15, the rest IPv6 from 2001:db8::/32) spread over four peer sets used by
eight rules; a second variant adds 1,000 CIDR networks, which go to interval sets.
Measured per ruleset: the full apply into a namespace with no table, the re-apply that
atomically replaces the same table's content, the update when one peer address moves
(a whole snapshot, diffed by the backend), the same move as a controller delta through
the agent's Enforcer and tamper guard up to its ack (`Enforcer.apply_delta`; the conntrack
cut runs after the ack and is not in it),
(set elements only, one transaction), and the pure-Python part of an apply (render to
the JSON document, then json.dumps), so what remains is libnftables and the kernel.

The kernel work runs only in a network namespace this script creates
(bh-bench-<pid>, one per ruleset) and always deletes: the timed part is a child process
started with `ip netns exec` that prints its timings as JSON. Before each full apply the
child removes the table (untimed), so every full apply starts from an empty namespace.
"""

from __future__ import annotations

import argparse
import gc
import ipaddress
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich import box
from rich.console import Console
from rich.table import Table

from agent.dataplane.baseline import Baseline, Endpoint, Mode, PortSpec
from agent.dataplane.libnftables import LibNftables
from agent.dataplane.model import load_ruleset
from agent.dataplane.nftables import NftablesBackend, element_changes, render
from agent.enforcer import Enforcer
from agent.tamper import TamperGuard
from bulkhead.v1 import agent_pb2
from bulkhead.v1 import ruleset_pb2 as pb
from bulkhead.v1.contract import host_order, ruleset_hash, set_changes

SIZES = (1_000, 10_000, 100_000)
MOVED_ADDRESS = "198.19.127.254"  # inside the hosts' range, never generated at these sizes
NETWORKS = 1_000
RUNS = 5
LARGE_RUNS = 3  # from LARGE hosts up: each run takes seconds
LARGE = 100_000
GROUPS = ("web", "api", "db", "office")
V6_EVERY = 10  # one host in ten is IPv6
V4_HOSTS_FROM = ipaddress.IPv4Address("198.18.0.1")  # up to 198.19.127.255
V4_NETWORKS_FROM = ipaddress.IPv4Address("198.19.128.0")
# IPv4 hosts must stay below the networks, within 198.18.0.0/15.
MAX_HOSTS = (int(V4_NETWORKS_FROM) - int(V4_HOSTS_FROM)) * V6_EVERY // (V6_EVERY - 1)
V6_HOSTS_FROM = ipaddress.IPv6Address("2001:db8::1")
V6_NETWORKS_FROM = ipaddress.IPv6Address("2001:db8:1::")
# Networks sit two blocks apart: adjacent ones would be collapsed into one by the agent.
V4_NETWORK_PREFIX, V4_NETWORK_STRIDE = 28, 32
V6_NETWORK_PREFIX, V6_NETWORK_STRIDE = 64, 2 << 64
SETTLE_SECONDS = 0.2  # lets the kernel free the last table before the next timing
CHILD_TIMEOUT = 1800.0
NAMESPACE_PREFIX = "bh-bench-"
TABLE = {"family": "inet", "name": "bulkhead"}
BASELINE = Baseline(
    mode=Mode.ENFORCE,
    failsafe_inbound=(PortSpec("tcp", 22, 22),),
    controllers=(Endpoint("198.18.255.254", 7443),),
)


@dataclass(frozen=True)
class Scenario:
    """One ruleset size and how many times to time it."""

    hosts: int
    networks: int
    runs: int

    @property
    def elements(self) -> int:
        return self.hosts + self.networks


def _spread(count: int, groups: int) -> Iterator[range]:
    """Consecutive index ranges, one per group, as even as count allows."""
    start = 0
    for group in range(groups):
        end = start + count // groups + (1 if group < count % groups else 0)
        yield range(start, end)
        start = end


def make_ruleset(hosts: int, networks: int) -> pb.Ruleset:
    """Four peer sets sharing `hosts` addresses and `networks` CIDRs, and eight rules."""
    v6_hosts = hosts // V6_EVERY
    v6_networks = networks // V6_EVERY
    host_texts = [str(V4_HOSTS_FROM + i) for i in range(hosts - v6_hosts)]
    host_texts += [str(V6_HOSTS_FROM + i) for i in range(v6_hosts)]
    network_texts = [
        f"{V4_NETWORKS_FROM + i * V4_NETWORK_STRIDE}/{V4_NETWORK_PREFIX}"
        for i in range(networks - v6_networks)
    ]
    network_texts += [
        f"{V6_NETWORKS_FROM + i * V6_NETWORK_STRIDE}/{V6_NETWORK_PREFIX}"
        for i in range(v6_networks)
    ]
    ruleset = pb.Ruleset()
    host_parts = _spread(len(host_texts), len(GROUPS))
    network_parts = _spread(len(network_texts), len(GROUPS))
    for name, host_part, network_part in zip(GROUPS, host_parts, network_parts, strict=True):
        ruleset.sets.add(
            name=name,
            hosts=[host_texts[i] for i in host_part],
            networks=[network_texts[i] for i in network_part],
        )
    for index, name in enumerate(GROUPS):
        port = 5000 + index
        for direction in (pb.DIRECTION_INGRESS, pb.DIRECTION_EGRESS):
            ruleset.rules.add(
                direction=direction,
                protocol=pb.PROTOCOL_TCP,
                ports=[pb.PortRange(first=port, last=port)],
                peer_set=name,
                action=pb.ACTION_ALLOW,
                policy=f"bench-{name}",
                id=f"r{index}{direction}",
            )
    return ruleset


def timed(action: Callable[[], object]) -> float:
    gc.collect()  # so one run does not pay for the garbage of the previous one
    started = time.perf_counter()
    action()
    return time.perf_counter() - started


def measure_python(scenario: Scenario) -> dict[str, Any]:
    """The Python part of an apply, no kernel involved: render (which starts with
    load_ruleset, timed apart too) and json.dumps of the document."""
    ruleset = make_ruleset(scenario.hosts, scenario.networks)
    document = render(ruleset, BASELINE)
    return {
        "render": [timed(lambda: render(ruleset, BASELINE)) for _ in range(scenario.runs)],
        "load": [timed(lambda: load_ruleset(ruleset)) for _ in range(scenario.runs)],
        "encode": [timed(lambda: json.dumps(document)) for _ in range(scenario.runs)],
        "payload_bytes": len(json.dumps(document).encode()),
    }


def refuse_foreign_namespace() -> None:
    # Rules loaded into the root namespace could cut the machine off.
    here = subprocess.run(
        ["ip", "netns", "identify"], check=True, capture_output=True, text=True, timeout=60
    ).stdout.strip()
    if not here.startswith(NAMESPACE_PREFIX):
        sys.exit(f"--inside: runs only in a {NAMESPACE_PREFIX}* namespace, not {here or 'root'!r}")


def measure_inside(scenario: Scenario) -> dict[str, Any]:
    """Full apply and re-apply timings; call only inside a namespace of our own."""
    refuse_foreign_namespace()
    ruleset = make_ruleset(scenario.hosts, scenario.networks)
    moved = make_ruleset(scenario.hosts, scenario.networks)
    moved.sets[0].hosts[0] = MOVED_ADDRESS  # one peer changes address
    # One context for every call, as the agent keeps one for its lifetime, which owns the
    # table as the agent does.
    with LibNftables() as nft:
        backend = NftablesBackend(nft, owner=nft)
        full, replace, update, kernel_update = [], [], [], []
        agent_delta = measure_agent_delta(nft, scenario)
        before = {g.name: g for g in load_ruleset(ruleset).groups}
        delta = {
            "nftables": [
                {"metainfo": {"json_schema_version": 1}},
                *element_changes(before, load_ruleset(moved)),
            ]
        }
        back = {
            "nftables": [
                {"metainfo": {"json_schema_version": 1}},
                *element_changes(
                    {g.name: g for g in load_ruleset(moved).groups}, load_ruleset(ruleset)
                ),
            ]
        }
        for _ in range(scenario.runs):
            backend.remove()
            time.sleep(SETTLE_SECONDS)
            full.append(timed(lambda: backend.apply(ruleset, BASELINE)))
            time.sleep(SETTLE_SECONDS)
            replace.append(timed(lambda: backend.apply(ruleset, BASELINE)))
            time.sleep(SETTLE_SECONDS)
            update.append(timed(lambda: backend.apply(moved, BASELINE)))
            backend.apply(ruleset, BASELINE)  # and back: element-only as well
            time.sleep(SETTLE_SECONDS)
            # The same update as the controller's delta would carry it: the kernel alone.
            kernel_update.append(timed(lambda: nft.json_cmd(delta)))
            nft.json_cmd(back)
        listing = nft.json_cmd({"nftables": [{"list": {"table": TABLE}}]})
        backend.remove()
    sets = [item["set"] for item in listing["nftables"] if "set" in item]
    loaded = sum(len(item.get("elem", [])) for item in sets)
    return {
        "full": full,
        "replace": replace,
        "update": update,
        "kernel_update": kernel_update,
        "agent_delta": agent_delta,
        "loaded_elements": loaded,
    }


def measure_agent_delta(nft: LibNftables, scenario: Scenario) -> list[float]:
    """One peer moving and back, as controller deltas through the agent's Enforcer and
    tamper guard, timed to the ack; the table is removed afterwards."""
    ruleset = make_ruleset(scenario.hosts, scenario.networks)
    moved = make_ruleset(scenario.hosts, scenario.networks)
    moved.sets[0].hosts[0] = MOVED_ADDRESS
    for rules in (ruleset, moved):  # AddressSet order, as the controller sends it
        for address_set in rules.sets:
            address_set.hosts[:] = sorted(address_set.hosts, key=host_order)
    there, back = ruleset_hash(moved), ruleset_hash(ruleset)
    forth = agent_pb2.PolicyDelta(base_hash=back, revision=2, hash=there)
    forth.sets.extend(set_changes(ruleset, moved) or [])
    home = agent_pb2.PolicyDelta(base_hash=there, revision=3, hash=back)
    home.sets.extend(set_changes(moved, ruleset) or [])
    backend = NftablesBackend(nft, owner=nft)
    guard = TamperGuard.for_dataplane("nftables", backend)
    timings = []
    with tempfile.TemporaryDirectory() as state:
        enforcer = Enforcer(guard.backend, BASELINE, Path(state), cut_flows=lambda *_: 0)
        first = enforcer.apply(agent_pb2.PolicySnapshot(revision=1, hash=back, ruleset=ruleset), [])
        if not first.ok:
            raise RuntimeError(first.error)
        for _ in range(scenario.runs):
            time.sleep(SETTLE_SECONDS)
            timings.append(timed(lambda: _acked(enforcer.apply_delta(forth, []))))
            _acked(enforcer.apply_delta(home, []))
        backend.remove()
    return timings


def _acked(ack: agent_pb2.Ack) -> None:
    if not ack.ok:
        raise RuntimeError(f"delta not applied: {ack.error}")


def _ip(*argv: str) -> None:
    subprocess.run(["ip", *argv], check=True, capture_output=True, text=True, timeout=60)


@contextmanager
def bench_namespace() -> Iterator[str]:
    """A fresh namespace; deleted on exit, with anything of ours still running in it."""
    name = f"{NAMESPACE_PREFIX}{os.getpid()}"
    _ip("netns", "add", name)
    try:
        yield name
    finally:
        pids = subprocess.run(
            ["ip", "netns", "pids", name], check=False, capture_output=True, text=True, timeout=60
        )
        for pid in pids.stdout.split():  # only our child can be in a namespace we made
            with suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGKILL)
        _ip("netns", "del", name)


def run_inside(script: Path, args: Sequence[str], label: str) -> dict[str, Any]:
    """Run SCRIPT --inside ARGS in a child process inside a namespace made for it; its JSON."""
    child_argv = [sys.executable, str(script.resolve()), "--inside", *args]
    with bench_namespace() as name:
        child = subprocess.run(
            ["ip", "netns", "exec", name, *child_argv],
            capture_output=True,
            text=True,
            timeout=CHILD_TIMEOUT,
            check=False,
        )
    if child.returncode != 0:
        sys.exit(f"{label} child failed ({child.returncode}): {child.stderr.strip()[-2000:]}")
    result: dict[str, Any] = json.loads(child.stdout)
    return result


def measure_kernel(scenario: Scenario) -> dict[str, Any]:
    """Run measure_inside in a child process inside a namespace created for it."""
    args = [f"--hosts={scenario.hosts}", f"--networks={scenario.networks}"]
    return run_inside(Path(__file__), [*args, f"--runs={scenario.runs}"], "benchmark")


def ms(seconds: Sequence[float]) -> str:
    return f"{statistics.median(seconds) * 1e3:,.1f} / {min(seconds) * 1e3:,.1f}"


def _per_element_us(seconds: Sequence[float], elements: int) -> str:
    return f"{statistics.median(seconds) * 1e6 / elements:.2f}"


def results_table(rows: Sequence[tuple[Scenario, dict[str, Any]]], markdown: bool) -> Table:
    table = Table(
        title="nftables apply, milliseconds: median / min",
        box=box.MARKDOWN if markdown else box.SIMPLE_HEAD,
    )
    columns = ["hosts + networks", "runs", "JSON kB", "render", "of which load_ruleset"]
    columns.append("json.dumps")
    kernel = bool(rows) and "full" in rows[0][1]
    if kernel:
        columns += ["full apply", "re-apply", "one address moved", "of which kernel"]
        columns += ["as a delta, to the ack"]
        columns += ["µs/elem full"]
        columns += ["µs/elem re-apply", "Python share"]
    for column in columns:
        table.add_column(column, justify="left" if column == columns[0] else "right", no_wrap=True)
    for scenario, result in rows:
        cells = [
            f"{scenario.hosts:,} + {scenario.networks:,}",
            str(scenario.runs),
            f"{result['payload_bytes'] / 1e3:,.0f}",
            ms(result["render"]),
            ms(result["load"]),
            ms(result["encode"]),
        ]
        if kernel:
            python = statistics.median(result["render"]) + statistics.median(result["encode"])
            cells += [
                ms(result["full"]),
                ms(result["replace"]),
                ms(result["update"]),
                ms(result["kernel_update"]),
                ms(result["agent_delta"]),
                _per_element_us(result["full"], scenario.elements),
                _per_element_us(result["replace"], scenario.elements),
                f"{python / statistics.median(result['full']):.0%}",
            ]
        table.add_row(*cells)
    return table


def _scenarios(sizes: Sequence[int], runs: int, large_runs: int) -> list[Scenario]:
    return [
        Scenario(hosts, networks, large_runs if hosts >= LARGE else runs)
        for hosts in sizes
        for networks in (0, NETWORKS)
    ]


def positive(text: str) -> int:
    if not text.strip().isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive whole number")
    return int(text)


def sizes(text: str) -> list[int]:
    sizes = [positive(part) for part in text.split(",")]
    if max(sizes) > MAX_HOSTS:
        raise argparse.ArgumentTypeError(f"at most {MAX_HOSTS:,} hosts fit the lab ranges")
    return sizes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=sizes, default=list(SIZES), help="host counts, 1,2,3")
    parser.add_argument("--runs", type=positive, default=RUNS)
    parser.add_argument("--large-runs", type=positive, default=LARGE_RUNS)
    parser.add_argument("--render-only", action="store_true", help="no kernel, no root needed")
    parser.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    # The child's side: one scenario, timings printed as JSON.
    parser.add_argument("--inside", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--hosts", type=positive, default=SIZES[0], help=argparse.SUPPRESS)
    parser.add_argument("--networks", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.inside:
        print(json.dumps(measure_inside(Scenario(args.hosts, args.networks, args.runs))))
        return
    if not args.render_only and os.geteuid() != 0:
        sys.exit("needs root to create a network namespace (or pass --render-only)")
    console = Console()
    if not console.is_terminal:
        console.width = 200  # a pipe or file gets the whole table, not 80 wrapped columns
    rows = []
    for scenario in _scenarios(args.sizes, args.runs, args.large_runs):
        console.print(f"measuring {scenario.hosts:,} hosts + {scenario.networks:,} networks ...")
        result = measure_python(scenario)
        if not args.render_only:
            kernel = measure_kernel(scenario)
            if kernel["loaded_elements"] != scenario.elements:
                sys.exit(f"loaded {kernel['loaded_elements']} elements, not {scenario.elements}")
            timings = ("full", "replace", "update", "kernel_update", "agent_delta")
            result |= {key: kernel[key] for key in timings}
        rows.append((scenario, result))
    console.print(results_table(rows, args.markdown))


if __name__ == "__main__":
    main()
