"""What the agent's two netlink jobs cost: the address dump (polled every 2 s) and the
conntrack cut after an apply (one dump of the namespace's table, a delete per entry the
policy no longer allows), with an empty table and with ENTRIES entries.

Needs root: two namespaces of its own (bh-nlb-*, 198.18.251.0/24 and 2001:db8:251::/64
on a veth pair, no route out, removed at the end). The server namespace gets a table
with a `ct state` rule, so that conntrack tracks it; the client sends one UDP datagram
to each of ENTRIES ports (half IPv4, half IPv6), which makes as many entries there. The
cut judges them by an enforced empty policy: every one is deleted.

The figures come from `python -c` snippets run inside the server namespace from the
current directory, so the bench times whichever checkout it is run from (an export of
an older commit, with PYTHONPATH=.:proto, times that one).

Prints figures; asserts nothing. Run: .venv/bin/python bench/netlink_bench.py
"""

from __future__ import annotations

import argparse
import json
import secrets
import subprocess
import sys
from contextlib import suppress
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CLIENT = {4: "198.18.251.1", 6: "2001:db8:251::1"}
SERVER = {4: "198.18.251.2", 6: "2001:db8:251::2"}
ENTRIES = 1000
ROUNDS = 7
ADDRESS_DUMPS = 200
TRACKED = """
table inet bh_bench {
  chain input { type filter hook input priority 0; ct state established accept; }
}
"""

# argv[1]: how many dumps. Prints the median time of one address dump (ms).
ADDRESSES_CODE = """
import statistics, sys, time
from agent.addresses import discover_addresses
times = []
for _ in range(int(sys.argv[1])):
    start = time.perf_counter()
    discover_addresses()
    times.append((time.perf_counter() - start) * 1000)
print(statistics.median(times))
"""

# argv[1]: the request file (ruleset, baseline, local addresses). One cut; prints
# [milliseconds, entries cut].
CUT_CODE = """
import json, sys, time
from google.protobuf import json_format
from agent.dataplane.baseline import baseline_from_json
from agent.dataplane.conntrack import cut_disallowed
from bulkhead.v1 import ruleset_pb2
request = json.load(open(sys.argv[1]))
ruleset = json_format.ParseDict(request["ruleset"], ruleset_pb2.Ruleset())
baseline = baseline_from_json(json.dumps(request["baseline"]))
start = time.perf_counter()
cut = cut_disallowed(ruleset, baseline, request["local_addresses"])
print(json.dumps([(time.perf_counter() - start) * 1000, cut]))
"""

# argv[1]: how many datagrams per family; argv[2], argv[3]: the server's addresses.
FLOOD_CODE = """
import socket, sys
for family, address in ((socket.AF_INET, sys.argv[2]), (socket.AF_INET6, sys.argv[3])):
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        for port in range(20000, 20000 + int(sys.argv[1])):
            s.sendto(b"x", (address, port))
"""


def sh(*argv: str, stdin: str | None = None) -> str:
    done = subprocess.run(
        argv, input=stdin, capture_output=True, text=True, timeout=120, check=False
    )
    if done.returncode:
        raise RuntimeError(f"{' '.join(argv)}: {done.stderr.strip()}")
    return done.stdout


def in_ns(netns: str, *argv: str, stdin: str | None = None) -> str:
    return sh("ip", "netns", "exec", netns, *argv, stdin=stdin)


def entries_in(netns: str) -> int:
    return int(in_ns(netns, "cat", "/proc/sys/net/netfilter/nf_conntrack_count"))


def median(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[len(ordered) // 2]


def measure(client: str, server: str, request: Path) -> None:
    addresses = float(in_ns(server, sys.executable, "-c", ADDRESSES_CODE, str(ADDRESS_DUMPS)))
    print(f"address dump: {addresses:.2f} ms (median of {ADDRESS_DUMPS})")
    for count in (0, ENTRIES):
        times, cuts = [], []
        for _ in range(ROUNDS):
            if count:
                in_ns(client, sys.executable, "-c", FLOOD_CODE, str(count // 2), *SERVER.values())
            before = entries_in(server)
            took, cut = json.loads(in_ns(server, sys.executable, "-c", CUT_CODE, str(request)))
            times.append(took)
            cuts.append((before, cut))
        print(
            f"cut, {count} entries: {median(times):.1f} ms (median of {ROUNDS}; "
            f"range {min(times):.1f}-{max(times):.1f}); entries before/cut: {cuts[0]}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.parse_args()
    tag = secrets.token_hex(3)
    client, server = f"bh-nlb-{tag}-c", f"bh-nlb-{tag}-s"
    request = Path(f"/tmp/bh-nlb-{tag}.json")
    golden = json.loads((ROOT / "tests/golden/nftables/empty_enforce.input.json").read_text())
    golden["local_addresses"] = list(SERVER.values())
    request.write_text(json.dumps(golden))
    made: list[str] = []
    try:
        for netns in (client, server):
            sh("ip", "netns", "add", netns)
            made.append(netns)
            sh("ip", "-n", netns, "link", "set", "lo", "up")
        sh("ip", "-n", client, "link", "add", "veth0", "type", "veth", "peer", "veth1",
           "netns", server)  # fmt: skip
        for netns, device, addresses in ((client, "veth0", CLIENT), (server, "veth1", SERVER)):
            sh("ip", "-n", netns, "address", "add", f"{addresses[4]}/24", "dev", device)
            sh("ip", "-n", netns, "address", "add", f"{addresses[6]}/64", "dev", device, "nodad")
            sh("ip", "-n", netns, "link", "set", device, "up")
        in_ns(server, "nft", "-f", "-", stdin=TRACKED)
        measure(client, server, request)
    finally:
        request.unlink(missing_ok=True)
        for netns in made:
            with suppress(RuntimeError):
                sh("ip", "netns", "del", netns)


if __name__ == "__main__":
    main()
