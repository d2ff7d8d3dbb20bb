"""The iptables and nftables backends side by side: apply, one-address update (whole and
as a policy delta), removal.

Run as root: .venv/bin/python bench/backend_compare.py [--sizes 1000,10000] [--runs 7]
             [--large-runs 5] [--markdown]

Both backends get the same rulesets, built by apply_bench.make_ruleset without networks:
four peer sets sharing that many host addresses (nine in ten IPv4 from 198.18.0.0/15, the
rest IPv6 from 2001:db8::/32) used by eight rules. Measured per backend and size:
* full apply: Backend.apply into a namespace holding nothing of ours;
* update: the same ruleset with one IPv4 peer address replaced, applied over the loaded
  one with Backend.apply (nftables, in its owned table, changes only the elements that
  differ after checking the whole ruleset; iptables swaps every ipset and restores its
  chains);
* update as a delta: one more address replaced, as a policy delta's SetChange, through
  Backend.update_elements (nftables: one element batch; iptables: one `ipset restore`);
* the delta through the tamper guard: that address put back, through the agent's
  TamperGuard (nftables, owned table: nothing read; iptables: our chains and sets read
  before and after, 5 tool processes each);
* update through the tamper guard: the first ruleset applied again through the guard,
  as the agent applies a snapshot (the apply, then what it loaded read back);
* removal: Backend.remove of the ruleset loaded last.

Each backend runs in a fresh namespace per size (bh-bench-<pid>, created and always
deleted by apply_bench.bench_namespace), in a child process started there with
`ip netns exec` that prints its timings as JSON. After every timed step the child reads
the kernel back with the command-line tools (`nft -j list ruleset`, `ipset save`) and
exits with an error unless it holds exactly the peer addresses applied (none after a
removal).
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from rich import box
from rich.console import Console
from rich.table import Table

from agent.dataplane.backend import Backend
from agent.dataplane.iptables.plan import ipset_name, is_our_set
from agent.dataplane.nftables import FAMILY, TABLE, set_name
from agent.dataplane.select import make_backend
from agent.tamper import TamperGuard
from bulkhead.v1 import agent_pb2
from bulkhead.v1 import ruleset_pb2 as pb
from bulkhead.v1.contract import set_changes

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # bench/ is not an installed package
from bench.apply_bench import (  # noqa: E402
    BASELINE,
    CHILD_TIMEOUT,
    SETTLE_SECONDS,
    Scenario,
    make_ruleset,
    ms,
    positive,
    refuse_foreign_namespace,
    run_inside,
    sizes,
    timed,
)

BACKENDS = ("nftables", "iptables")
SIZES = (1_000, 10_000)
RUNS = 7
LARGE_RUNS = 5  # from LARGE hosts up
LARGE = 10_000
MEASURES = {
    "full": "full apply",
    "update": "update (1 address)",
    "delta": "update (1 address) as a delta",
    "guarded": "the delta through the tamper guard",
    "guarded_update": "update through the tamper guard",
    "remove": "removal",
}
LAB_V4 = ipaddress.ip_network("198.18.0.0/15")
# Members as the kernel tools print them, keyed by set name.
Members = dict[str, set[str]]


def with_one_address_changed(ruleset: pb.Ruleset) -> pb.Ruleset:
    """A copy of RULESET whose first peer set has its first IPv4 host replaced by the
    address after the highest IPv4 host, which no set holds yet."""
    changed = pb.Ruleset()
    changed.CopyFrom(ruleset)
    hosts = [ipaddress.ip_address(host) for peer_set in changed.sets for host in peer_set.hosts]
    v4 = [host for host in hosts if host.version == 4]
    new = max(v4) + 1
    if new not in LAB_V4:
        raise ValueError(f"no free IPv4 address after {max(v4)} in {LAB_V4}")
    first = changed.sets[0]
    index = next(i for i, host in enumerate(first.hosts) if ":" not in host)
    first.hosts[index] = str(new)
    return changed


def _member(text: str) -> str:
    return str(ipaddress.ip_network(text))


def expected_members(backend: str, ruleset: pb.Ruleset) -> Members:
    """The sets BACKEND should have loaded for RULESET (hosts only, as make_ruleset
    builds them here) and their members."""
    expected: Members = {}
    for peer_set in ruleset.sets:
        by_family: dict[int, set[str]] = {4: set(), 6: set()}
        for host in peer_set.hosts:
            by_family[ipaddress.ip_address(host).version].add(_member(host))
        if backend == "iptables":
            expected[ipset_name(peer_set.name, 4)] = by_family[4]
            expected[ipset_name(peer_set.name, 6)] = by_family[6]
        else:
            expected[set_name(peer_set.name, "v4")] = by_family[4]
            expected[set_name(peer_set.name, "v6")] = by_family[6]
            expected[set_name(peer_set.name, "v4net")] = set()
            expected[set_name(peer_set.name, "v6net")] = set()
    return expected


def _run(argv: Sequence[str]) -> str:
    return subprocess.run(
        list(argv), check=True, capture_output=True, text=True, timeout=CHILD_TIMEOUT
    ).stdout


def _nft_element(element: Any) -> str:
    if isinstance(element, str):
        return _member(element)
    prefix = element["prefix"]  # interval sets print networks as prefixes
    return _member(f"{prefix['addr']}/{prefix['len']}")


def loaded_members(backend: str) -> Members:
    """Our sets in this namespace's kernel and their members, read with the CLI tools
    rather than through the backend under test."""
    loaded: Members = {}
    if backend == "iptables":
        for line in _run(["ipset", "save"]).splitlines():
            words = line.split()
            if len(words) >= 2 and words[0] == "create" and is_our_set(words[1]):
                loaded[words[1]] = set()
            elif len(words) >= 3 and words[0] == "add" and words[1] in loaded:
                loaded[words[1]].add(_member(words[2]))
        return loaded
    listing = json.loads(_run(["nft", "-j", "list", "ruleset"]))
    for item in listing["nftables"]:
        nft_set = item.get("set")
        if nft_set and nft_set["family"] == FAMILY and nft_set["table"] == TABLE:
            loaded[nft_set["name"]] = {_nft_element(e) for e in nft_set.get("elem", [])}
    return loaded


def _differences(expected: Members, loaded: Members) -> list[str]:
    lines = []
    for name in sorted(expected.keys() | loaded.keys()):
        want, have = expected.get(name), loaded.get(name)
        if want == have:
            continue
        if want is None or have is None:
            lines.append(f"set {name}: {'unexpected' if want is None else 'missing'}")
            continue
        missing, extra = sorted(want - have)[:3], sorted(have - want)[:3]
        lines.append(
            f"set {name}: {len(have)} members (want {len(want)}), missing {missing}, extra {extra}"
        )
    return lines


def verify(backend_name: str, backend: Backend, ruleset: pb.Ruleset | None, step: str) -> int:
    """Exit unless the kernel holds exactly RULESET's peers (nothing of ours if None);
    the number of peer addresses loaded."""
    expected = expected_members(backend_name, ruleset) if ruleset is not None else {}
    loaded = loaded_members(backend_name)
    problems = _differences(expected, loaded)
    present = backend.is_present()
    if present != (ruleset is not None):
        problems.append(f"is_present() is {present}")
    if problems:
        sys.exit(f"{backend_name} after {step}: kernel differs: " + "; ".join(problems))
    return sum(len(members) for members in loaded.values())


def measure_inside(backend_name: str, scenario: Scenario) -> dict[str, Any]:
    """Timings of full apply, update and removal; call only inside a namespace of our own."""
    refuse_foreign_namespace()
    ruleset = make_ruleset(scenario.hosts, scenario.networks)
    changed = with_one_address_changed(ruleset)
    moved = with_one_address_changed(changed)
    forth, back = set_changes(changed, moved), set_changes(moved, changed)
    if forth is None or back is None:
        sys.exit("the rulesets differ in more than set elements")
    backend = make_backend(backend_name)
    guard = TamperGuard.for_dataplane(backend_name, backend)
    times: dict[str, list[float]] = {measure: [] for measure in MEASURES}
    loaded = 0

    def update_elements(
        through: Backend, changes: Sequence[agent_pb2.SetChange], result: pb.Ruleset
    ) -> None:
        if not through.update_elements(changes, result, BASELINE):
            sys.exit(f"{backend_name}: the delta was refused")

    for _ in range(scenario.runs):
        verify(backend_name, backend, None, "start")
        time.sleep(SETTLE_SECONDS)
        times["full"].append(timed(lambda: backend.apply(ruleset, BASELINE)))
        verify(backend_name, backend, ruleset, "full apply")
        time.sleep(SETTLE_SECONDS)
        times["update"].append(timed(lambda: backend.apply(changed, BASELINE)))
        verify(backend_name, backend, changed, "update")
        time.sleep(SETTLE_SECONDS)
        times["delta"].append(timed(lambda: update_elements(backend, forth, moved)))
        verify(backend_name, backend, moved, "delta")
        guard.remember(moved, BASELINE)  # as after the agent's own apply
        time.sleep(SETTLE_SECONDS)
        times["guarded"].append(timed(lambda: update_elements(guard.backend, back, changed)))
        verify(backend_name, backend, changed, "guarded delta")
        time.sleep(SETTLE_SECONDS)
        times["guarded_update"].append(timed(lambda: guard.backend.apply(ruleset, BASELINE)))
        loaded = verify(backend_name, backend, ruleset, "guarded update")
        time.sleep(SETTLE_SECONDS)
        times["remove"].append(timed(backend.remove))
        verify(backend_name, backend, None, "removal")
    return {**times, "loaded": loaded}


def measure_kernel(backend_name: str, scenario: Scenario) -> dict[str, Any]:
    """Run measure_inside in a child process inside a namespace created for it."""
    args = [f"--backend={backend_name}", f"--hosts={scenario.hosts}", f"--runs={scenario.runs}"]
    result = run_inside(Path(__file__), args, backend_name)
    if result["loaded"] != scenario.hosts:
        sys.exit(f"{backend_name}: {result['loaded']} addresses loaded, not {scenario.hosts}")
    return result


Results = Mapping[str, Mapping[str, Any]]  # backend -> its child's result


def results_table(rows: Sequence[tuple[Scenario, Results]], markdown: bool) -> Table:
    table = Table(
        title="Backend compare, milliseconds: median / min",
        box=box.MARKDOWN if markdown else box.SIMPLE_HEAD,
    )
    for column in ("peer addresses", "runs", "measure", *BACKENDS, "iptables / nftables"):
        text = column in ("peer addresses", "measure")
        table.add_column(column, justify="left" if text else "right", no_wrap=True)
    for scenario, results in rows:
        for key, label in MEASURES.items():
            medians = {name: statistics.median(results[name][key]) for name in BACKENDS}
            table.add_row(
                f"{scenario.hosts:,}",
                str(scenario.runs),
                label,
                *(ms(results[name][key]) for name in BACKENDS),
                f"{medians['iptables'] / medians['nftables']:.2f}",
            )
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=sizes, default=list(SIZES), help="host counts, 1,2,3")
    parser.add_argument("--runs", type=positive, default=RUNS)
    parser.add_argument("--large-runs", type=positive, default=LARGE_RUNS)
    parser.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    # The child's side: one backend and size, timings printed as JSON.
    parser.add_argument("--inside", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--backend", choices=BACKENDS, default=BACKENDS[0], help=argparse.SUPPRESS)
    parser.add_argument("--hosts", type=positive, default=SIZES[0], help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.inside:
        scenario = Scenario(args.hosts, 0, args.runs)
        print(json.dumps(measure_inside(args.backend, scenario)))
        return
    if os.geteuid() != 0:
        sys.exit("needs root to create a network namespace")
    console = Console()
    if not console.is_terminal:
        console.width = 200  # a pipe or file gets the whole table, not 80 wrapped columns
    rows = []
    for hosts in args.sizes:
        scenario = Scenario(hosts, 0, args.large_runs if hosts >= LARGE else args.runs)
        results = {}
        for name in BACKENDS:
            console.print(f"measuring {name}, {hosts:,} peer addresses ...")
            results[name] = measure_kernel(name, scenario)
        rows.append((scenario, results))
    console.print(results_table(rows, args.markdown))
    console.print("kernel contents verified after every apply, update and removal")


if __name__ == "__main__":
    main()
