"""Bulkhead's apply against a peer's: the same policy as plain iptables, one rule per peer.

Run as root: .venv/bin/python bench/peer_compare_bench.py [--sizes 1000,10000] [--runs 7]
             [--large-runs 5] [--append-runs 2] [--markdown]

The policy: allow tcp/5432 in from N peer hosts (IPv4, from 198.18.0.1 up), drop other new
inbound traffic, keep loopback, established/related and ssh (tcp/22) open. Timed, per N,
in the same run:
* Bulkhead, nftables: NftablesBackend.apply (built as make_backend("nftables") builds it)
  of a ruleset with one set of N hosts and one rule, into a namespace without our table;
  changing one peer is the apply of the whole ruleset with that peer replaced, which
  parses all N peers and then changes one set element of the owned table, and, apart,
  that one-element transaction alone (what a controller's delta lets the agent send);
* Bulkhead, iptables: make_backend("iptables").apply of the same ruleset (ipset restore,
  then iptables-legacy-restore and ip6tables-legacy-restore of the filter and security
  copies of our chains); changing one peer re-applies all of it (every ipset is swapped);
* iptables-legacy-restore: one file with the baseline and N rules
  `-A INPUT -s X/32 -p tcp -m tcp --dport 5432 -j ACCEPT` in filter's INPUT (policy
  DROP), loaded with one iptables-legacy-restore; changing one peer the way an operator
  edits a live ruleset: `iptables-legacy -D` of its rule and `iptables-legacy -I` of the
  new one at the same position (two commands), and the way a generated file is
  reloaded: iptables-legacy-restore of the whole changed file;
* iptables-legacy -A: the same rules added one command at a time, as shell scripts do
  (N only up to APPEND_MAX_PEERS: each -A reads and rewrites the whole table, so the
  total grows with the square of N; 10,000 take minutes).
The printed ratio is to Bulkhead nftables' median for the same step (for every change,
to its apply of the changed ruleset). Bulkhead's figures are calls inside a running
process, as the agent makes them; the iptables figures include starting the tool, as it
is used. Bulkhead also loads more: its baseline (ICMP, invalid, logging of denials) and,
with iptables, IPv6 and a second copy of its chains in the security table.

firewalld is not in the comparison. It is not installed here, and its offline tool
(firewall-offline-cmd) only writes XML zone files under /etc/firewalld without touching
the kernel, so timing it would time file editing, not an apply. Applying rich rules
takes the firewalld daemon, which needs the system D-Bus and reads /etc/firewalld,
neither of which a network namespace separates: running it here would need a private bus
and mount namespace for the daemon and a daemon package installed on a shared machine.
A rich rule per peer is, like the iptables form here, one kernel rule per peer.

Each method runs in a fresh namespace (bh-bench-<pid>, created and always deleted by
apply_bench.run_inside) in a child process started there with `ip netns exec`, which
resets the tables between runs (untimed) and, after every timed step, reads the kernel
back (`iptables-legacy-save`, `nft -j list set`, `ipset save`) and exits with an error
unless it holds exactly the peers applied.
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
from collections.abc import Callable, Sequence
from pathlib import Path

from rich import box
from rich.console import Console
from rich.table import Table

from agent.dataplane.baseline import Baseline, Mode, PortSpec
from agent.dataplane.iptables.plan import ipset_name
from agent.dataplane.libnftables import JsonDocument, LibNftables
from agent.dataplane.model import load_ruleset
from agent.dataplane.nftables import FAMILY, TABLE, NftablesBackend, element_changes, set_name
from agent.dataplane.select import make_backend
from bulkhead.v1 import ruleset_pb2 as pb

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # bench/ is not an installed package
from bench.apply_bench import (  # noqa: E402
    CHILD_TIMEOUT,
    SETTLE_SECONDS,
    ms,
    positive,
    refuse_foreign_namespace,
    run_inside,
    timed,
)

SIZES = (1_000, 10_000)
RUNS = 7
LARGE_RUNS = 5  # from LARGE peers up
LARGE = 10_000
APPEND_RUNS = 2  # each takes seconds
APPEND_MAX_PEERS = 1_000
PORT = 5432
GROUP = "clients"
PEERS_FROM = ipaddress.IPv4Address("198.18.0.1")
MAX_PEERS = 65_000  # the new peer (PEERS_FROM + N) must stay in 198.18.0.0/15
BASELINE = Baseline(mode=Mode.ENFORCE, failsafe_inbound=(PortSpec("tcp", 22, 22),))
IPTABLES, RESTORE, SAVE = "iptables-legacy", "iptables-legacy-restore", "iptables-legacy-save"
BASELINE_RULES = (  # rule positions 1-3 in INPUT; the peers' rules follow
    "-i lo -j ACCEPT",
    "-m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT",
    "-p tcp -m tcp --dport 22 -j ACCEPT",
)
METHODS = {
    "bulkhead-nftables": "Bulkhead, nftables (set)",
    "bulkhead-iptables": "Bulkhead, iptables (ipset)",
    "iptables-restore": "iptables-legacy-restore, rule per peer",
    "iptables-append": "iptables-legacy -A per rule",
}
STEPS = {
    "apply": "apply all peers",
    "change": "change one peer",
    "change_delta": "change one peer (element delta only)",
    "change_restore": "change one peer (restore whole file)",
}


def peers(count: int) -> list[str]:
    return [str(PEERS_FROM + i) for i in range(count)]


def changed_peers(count: int) -> tuple[list[str], int]:
    """The peers with the middle one replaced by a new address, and its index."""
    changed, index = peers(count), count // 2
    changed[index] = str(PEERS_FROM + count)
    return changed, index


def peer_rule(peer: str) -> str:
    return f"-s {peer}/32 -p tcp -m tcp --dport {PORT} -j ACCEPT"


def restore_file(addresses: Sequence[str]) -> str:
    lines = ["*filter", ":INPUT DROP [0:0]", ":FORWARD DROP [0:0]", ":OUTPUT ACCEPT [0:0]"]
    lines += [f"-A INPUT {rule}" for rule in BASELINE_RULES]
    lines += [f"-A INPUT {peer_rule(peer)}" for peer in addresses]
    return "\n".join([*lines, "COMMIT"]) + "\n"


def bulkhead_ruleset(addresses: Sequence[str]) -> pb.Ruleset:
    ruleset = pb.Ruleset()
    ruleset.sets.add(name=GROUP, hosts=addresses)
    ruleset.rules.add(
        direction=pb.DIRECTION_INGRESS,
        protocol=pb.PROTOCOL_TCP,
        ports=[pb.PortRange(first=PORT, last=PORT)],
        peer_set=GROUP,
        action=pb.ACTION_ALLOW,
        policy="bench-peers",
        id="r-peers",
    )
    return ruleset


def _run(argv: Sequence[str], stdin: str | None = None) -> str:
    return subprocess.run(
        list(argv), input=stdin, check=True, capture_output=True, text=True, timeout=CHILD_TIMEOUT
    ).stdout


def loaded_peers(method: str) -> set[str]:
    """The peer addresses this namespace's kernel allows, read with the tools' own CLIs."""
    if method == "bulkhead-nftables":
        listing = json.loads(
            _run(["nft", "-j", "list", "set", FAMILY, TABLE, set_name(GROUP, "v4")])
        )
        return {e for item in listing["nftables"] if "set" in item for e in item["set"]["elem"]}
    if method == "bulkhead-iptables":
        name = ipset_name(GROUP, 4)
        lines = _run(["ipset", "save", name]).splitlines()
        return {
            str(ipaddress.ip_network(w[2]).network_address)
            for w in map(str.split, lines)
            if w[0] == "add"
        }
    suffix = f"/32 -p tcp -m tcp --dport {PORT} -j ACCEPT"
    return {
        line.removeprefix("-A INPUT -s ").removesuffix(suffix)
        for line in _run([SAVE, "-t", "filter"]).splitlines()
        if line.startswith("-A INPUT -s ") and line.endswith(suffix)
    }


def verify(method: str, expected: Sequence[str], step: str) -> None:
    loaded = loaded_peers(method)
    if loaded != set(expected):
        missing, extra = sorted(set(expected) - loaded)[:3], sorted(loaded - set(expected))[:3]
        sys.exit(
            f"{method} after {step}: {len(loaded)} peers loaded, want {len(expected)}; "
            f"missing {missing}, extra {extra}"
        )


def _reset_iptables() -> None:
    _run(
        [RESTORE],
        stdin="*filter\n:INPUT ACCEPT [0:0]\n:FORWARD ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\nCOMMIT\n",
    )


def _append_all(addresses: Sequence[str]) -> None:
    _run([IPTABLES, "-P", "INPUT", "DROP"])
    _run([IPTABLES, "-P", "FORWARD", "DROP"])
    for rule in (*BASELINE_RULES, *(peer_rule(peer) for peer in addresses)):
        _run([IPTABLES, "-A", "INPUT", *rule.split()])


def _delete_and_insert(old: str, new: str, index: int) -> None:
    _run([IPTABLES, "-D", "INPUT", *peer_rule(old).split()])
    position = len(BASELINE_RULES) + index + 1
    _run([IPTABLES, "-I", "INPUT", str(position), *peer_rule(new).split()])


def _element_delta(old: pb.Ruleset, new: pb.Ruleset) -> JsonDocument:
    """The one-transaction element change from OLD's peers to NEW's, as a controller's
    delta lets the agent send it without parsing a whole snapshot."""
    groups = {group.name: group for group in load_ruleset(old).groups}
    changes = element_changes(groups, load_ruleset(new))
    return {"nftables": [{"metainfo": {"json_schema_version": 1}}, *changes]}


def measure_inside(method: str, count: int, runs: int) -> dict[str, list[float]]:
    """Timings of each step of METHOD; call only inside a namespace of our own."""
    refuse_foreign_namespace()
    before = peers(count)
    after, index = changed_peers(count)
    times: dict[str, list[float]] = {}

    def step(name: str, action: Callable[[], object], expected: Sequence[str]) -> None:
        time.sleep(SETTLE_SECONDS)
        times.setdefault(name, []).append(timed(action))
        verify(method, expected, STEPS[name])

    ruleset, changed = bulkhead_ruleset(before), bulkhead_ruleset(after)
    if method == "bulkhead-nftables":
        # Built as make_backend("nftables") builds it, keeping the owning context: only it
        # may send the element delta to the owned table.
        with LibNftables() as nft:
            backend = NftablesBackend(nft, owner=nft)
            delta, back = _element_delta(ruleset, changed), _element_delta(changed, ruleset)
            for _ in range(runs):
                backend.remove()
                step("apply", lambda: backend.apply(ruleset, BASELINE), before)
                step("change", lambda: backend.apply(changed, BASELINE), after)
                backend.apply(ruleset, BASELINE)
                step("change_delta", lambda: nft.json_cmd(delta), after)
                nft.json_cmd(back)
            backend.remove()
        return times
    if method == "bulkhead-iptables":
        iptables = make_backend("iptables")
        for _ in range(runs):
            iptables.remove()
            step("apply", lambda: iptables.apply(ruleset, BASELINE), before)
            step("change", lambda: iptables.apply(changed, BASELINE), after)
        iptables.remove()
        return times
    for _ in range(runs):
        _reset_iptables()
        if method == "iptables-append":
            step("apply", lambda: _append_all(before), before)
            continue
        step("apply", lambda: _run([RESTORE], stdin=restore_file(before)), before)
        step("change", lambda: _delete_and_insert(before[index], after[index], index), after)
        _run([RESTORE], stdin=restore_file(before))
        step("change_restore", lambda: _run([RESTORE], stdin=restore_file(after)), after)
    _reset_iptables()
    return times


Results = dict[str, dict[str, list[float]]]  # method -> step -> seconds


def results_table(rows: Sequence[tuple[int, Results]], markdown: bool) -> Table:
    table = Table(
        title="Apply with Bulkhead vs plain iptables, milliseconds: median / min",
        box=box.MARKDOWN if markdown else box.SIMPLE_HEAD,
    )
    for column in ("peers", "method", "step", "runs", "ms", "vs Bulkhead nftables"):
        text = column in ("peers", "method", "step")
        table.add_column(column, justify="left" if text else "right", no_wrap=True)
    for count, results in rows:
        reference = results["bulkhead-nftables"]
        for method, steps in results.items():
            for name, seconds in steps.items():
                base = reference["change" if name.startswith("change") else name]
                table.add_row(
                    f"{count:,}",
                    METHODS[method],
                    STEPS[name],
                    str(len(seconds)),
                    ms(seconds),
                    f"{statistics.median(seconds) / statistics.median(base):,.2f}",
                )
    return table


def sizes(text: str) -> list[int]:
    counts = [positive(part) for part in text.split(",")]
    if max(counts) > MAX_PEERS:
        raise argparse.ArgumentTypeError(f"at most {MAX_PEERS:,} peers fit the lab range")
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=sizes, default=list(SIZES), help="peer counts, 1,2")
    parser.add_argument("--runs", type=positive, default=RUNS)
    parser.add_argument("--large-runs", type=positive, default=LARGE_RUNS)
    parser.add_argument("--append-runs", type=positive, default=APPEND_RUNS)
    parser.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    # The child's side: one method and size, timings printed as JSON.
    parser.add_argument("--inside", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument(
        "--method", choices=METHODS, default="iptables-restore", help=argparse.SUPPRESS
    )
    parser.add_argument("--peers", type=positive, default=SIZES[0], help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.inside:
        print(json.dumps(measure_inside(args.method, args.peers, args.runs)))
        return
    if os.geteuid() != 0:
        sys.exit("needs root to create a network namespace")
    console = Console()
    if not console.is_terminal:
        console.width = 200  # a pipe or file gets the whole table, not 80 wrapped columns
    rows = []
    for count in args.sizes:
        results: Results = {}
        for method, label in METHODS.items():
            if method == "iptables-append" and count > APPEND_MAX_PEERS:
                continue
            runs = args.append_runs if method == "iptables-append" else args.runs
            runs = args.large_runs if count >= LARGE and method != "iptables-append" else runs
            console.print(f"measuring {label}, {count:,} peers ...")
            child_args = [f"--method={method}", f"--peers={count}", f"--runs={runs}"]
            results[method] = run_inside(Path(__file__), child_args, method)
        rows.append((count, results))
    console.print(results_table(rows, args.markdown))
    console.print("kernel contents verified after every timed step")


if __name__ == "__main__":
    main()
