"""The nftables backend against the real kernel, inside namespaces this module creates.

The test process stays in the root namespace: the backend runs in a namespace through
``python -m agent.dataplane.apply_cli`` under ``ip netns exec``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from google.protobuf import json_format

from agent.dataplane.baseline import baseline_from_json
from agent.dataplane.nftables import render
from bulkhead.v1 import ruleset_pb2 as pb
from tests.integration.nslab import PYTHON, Namespace, lab_unavailable_reason, link, namespace

_REASON = lab_unavailable_reason()
pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(_REASON is not None, reason=f"namespace lab unavailable: {_REASON}"),
]

GOLDEN = Path(__file__).resolve().parents[1] / "golden" / "nftables"
CASES = sorted(path.name.removesuffix(".input.json") for path in GOLDEN.glob("*.input.json"))
WEB = {4: "198.18.0.1", 6: "2001:db8::1"}
DB = {4: "198.18.0.2", 6: "2001:db8::2"}
TABLE = {"family": "inet", "table": "bulkhead"}
SERVED_PORTS = (5432, 6000, 7000)
SERVER_LIFETIME = 120  # seconds; the fixture kills it sooner

# Listens on every port in argv[1] (IPv4 and IPv6) and echoes what it receives.
ECHO_SERVER = """
import select, socket, sys, time
listeners = []
for port in map(int, sys.argv[1].split(",")):
    s = socket.socket(socket.AF_INET6)
    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("::", port))
    s.listen(16)
    listeners.append(s)
print("ready", flush=True)
conns = []
deadline = time.monotonic() + float(sys.argv[2])
while time.monotonic() < deadline:
    readable, _, _ = select.select(listeners + conns, [], [], 0.2)
    for s in readable:
        if s in listeners:
            conns.append(s.accept()[0])
            continue
        data = s.recv(4096)
        if data:
            s.sendall(data)
        else:
            conns.remove(s)
            s.close()
"""

# Prints "connected", "timeout" or "error ERRNO" for one connection attempt.
CONNECT = """
import socket, sys
try:
    socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=1.0).close()
    print("connected")
except TimeoutError:
    print("timeout")
except OSError as exc:
    print(f"error {exc.errno}")
"""

# Connects once, then does one echo round trip (2 s bound) per line read from stdin.
ECHO_CLIENT = """
import socket, sys
conn = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=2.0)
print("connected", flush=True)
for line in sys.stdin:
    try:
        conn.sendall(line.encode())
        print("echo" if conn.recv(4096) == line.encode() else "garbled", flush=True)
    except TimeoutError:
        print("timeout", flush=True)
    except OSError as exc:
        print(f"error {exc.errno}", flush=True)
"""

# db's own table (not the agent's): the served connection goes into conntrack zone
# {zone} in both directions, before conntrack sees its packets.
ZONE_TABLE = """
table inet bh_test_zone {{
  chain raw_pre {{ type filter hook prerouting priority raw; tcp dport 5432 ct zone set {zone}; }}
  chain raw_out {{ type filter hook output priority raw; tcp sport 5432 ct zone set {zone}; }}
}}
"""


def case_request(case: str, command: str = "apply") -> dict[str, Any]:
    request: dict[str, Any] = json.loads((GOLDEN / f"{case}.input.json").read_text())
    request["command"] = command
    return request


def dataplane(ns: Namespace, request: dict[str, Any]) -> dict[str, Any]:
    """Run one apply_cli request inside ns and return its reply."""
    result = ns.run(
        [PYTHON, "-m", "agent.dataplane.apply_cli"], stdin=json.dumps(request), check=False
    )
    assert result.returncode == 0, f"apply_cli failed: {result.stdout} {result.stderr}"
    reply: dict[str, Any] = json.loads(result.stdout)
    return reply


def rendered(case: str) -> dict[str, Any]:
    """What the backend should have loaded for a case (rendering is pure: no namespace)."""
    request = case_request(case)
    ruleset = json_format.ParseDict(request["ruleset"], pb.Ruleset())
    return render(ruleset, baseline_from_json(json.dumps(request["baseline"])))


def counted_packets(ns: Namespace, chain: str) -> dict[str, int]:
    """Packets counted per rule comment in one of our chains."""
    listing = ns.run(["nft", "-j", "list", "chain", "inet", "bulkhead", chain]).stdout
    packets: dict[str, int] = {}
    for item in json.loads(listing)["nftables"]:
        rule = item.get("rule", {})
        for expr in rule.get("expr", []):
            if "counter" in expr and "comment" in rule:
                packets[rule["comment"]] = (
                    packets.get(rule["comment"], 0) + expr["counter"]["packets"]
                )
    return packets


def connect(ns: Namespace, host: str, port: int) -> str:
    return ns.python(CONNECT, host, str(port), timeout=30).strip()


@pytest.fixture
def single() -> Iterator[Namespace]:
    with namespace("nft") as ns:
        yield ns


@pytest.fixture
def pair() -> Iterator[tuple[Namespace, Namespace]]:
    """Namespaces web (198.18.0.1, 2001:db8::1) and db (.2, ::2) joined by a veth pair."""
    with namespace("web") as web, namespace("db") as db:
        link(web, db, [f"{WEB[4]}/24", f"{WEB[6]}/64"], [f"{DB[4]}/24", f"{DB[6]}/64"])
        yield web, db


@pytest.fixture
def served(pair: tuple[Namespace, Namespace]) -> Iterator[tuple[Namespace, Namespace]]:
    """The pair, with an echo server on SERVED_PORTS in db."""
    web, db = pair
    ports = ",".join(map(str, SERVED_PORTS))
    server = db.popen([PYTHON, "-c", ECHO_SERVER, ports, str(SERVER_LIFETIME)])
    try:
        assert server.stdout is not None
        assert server.stdout.readline().strip() == "ready"
        yield web, db
    finally:
        server.kill()
        server.wait(timeout=10)


@pytest.mark.parametrize("case", CASES)
def test_applied_table_reads_back_as_rendered(single: Namespace, case: str) -> None:
    assert dataplane(single, case_request(case)) == {"ok": True}
    # Listed piecewise: nft 1.0.6 prints the orphaned table's `persist` flag as broken JSON.
    items = json.loads(
        single.run(["nft", "-j", "list", "sets", "table", "inet", "bulkhead"]).stdout
    )["nftables"]
    for chain in ("input", "output", "policy_in", "policy_out"):
        listing = single.run(["nft", "-j", "list", "chain", "inet", "bulkhead", chain]).stdout
        items += json.loads(listing)["nftables"]
    document = rendered(case)
    wanted = [c["add"] for c in document["nftables"] if "add" in c]

    def set_view(spec: dict[str, Any]) -> tuple[Any, ...]:
        elements = sorted(json.dumps(e, sort_keys=True) for e in spec.get("elem", []))
        return spec["name"], spec["type"], spec.get("flags", []), elements

    assert sorted(set_view(i["set"]) for i in items if "set" in i) == sorted(
        set_view(w["set"]) for w in wanted if "set" in w
    )
    chain_keys = ("name", "type", "hook", "prio", "policy")
    assert sorted(
        tuple(i["chain"].get(k) for k in chain_keys) for i in items if "chain" in i
    ) == sorted(tuple(w["chain"].get(k) for k in chain_keys) for w in wanted if "chain" in w)
    assert [(i["rule"]["chain"], i["rule"].get("comment")) for i in items if "rule" in i] == sorted(
        ((w["rule"]["chain"], w["rule"].get("comment")) for w in wanted if "rule" in w),
        key=lambda pair: ["input", "output", "policy_in", "policy_out"].index(pair[0]),
    )
    text = single.run(["nft", "-s", "list", "table", "inet", "bulkhead"]).stdout
    golden = GOLDEN / f"{case}.nft"
    if os.environ.get("BULKHEAD_UPDATE_GOLDEN") == "1":
        golden.write_text(text)
    assert text == golden.read_text(), f"nft listing differs from {golden}"


def test_foreign_table_is_left_byte_identical(single: Namespace) -> None:
    single.run(
        ["nft", "-f", "-"],
        stdin="table inet other {\n chain c {\n  type filter hook input priority 10;\n"
        '  tcp dport 9999 counter drop comment "not ours"\n }\n}\n',
    )

    def other() -> str:
        return single.run(["nft", "list", "table", "inet", "other"]).stdout

    before = other()
    assert "not ours" in before
    assert dataplane(single, case_request("web_db")) == {"ok": True}
    assert other() == before
    assert dataplane(single, case_request("networks_ports")) == {"ok": True}
    assert other() == before
    assert dataplane(single, {"command": "is_present"}) == {"present": True}
    assert dataplane(single, {"command": "remove"}) == {"ok": True}
    assert other() == before
    assert dataplane(single, {"command": "is_present"}) == {"present": False}
    assert dataplane(single, {"command": "remove"}) == {"ok": True}  # absent: no error
    tables = single.run(["nft", "list", "tables"]).stdout
    assert tables.split() == ["table", "inet", "other"]


def test_a_failing_batch_leaves_the_previous_policy_whole(single: Namespace) -> None:
    assert dataplane(single, case_request("web_db")) == {"ok": True}
    before = single.run(["nft", "-s", "list", "table", "inet", "bulkhead"]).stdout
    document = rendered("networks_ports")
    document["nftables"].append(
        {"add": {"rule": {**TABLE, "chain": "no_such_chain", "expr": [{"accept": None}]}}}
    )
    code = (
        "import json, sys\n"
        "from agent.dataplane.libnftables import LibNftables, NftError\n"
        "try:\n"
        "    LibNftables().json_cmd(json.load(sys.stdin))\n"
        "    print('applied')\n"
        "except NftError as exc:\n"
        "    print(exc)\n"
    )
    message = single.run([PYTHON, "-c", code], stdin=json.dumps(document)).stdout
    assert "Error" in message
    assert "no_such_chain" in message or "No such file or directory" in message
    assert single.run(["nft", "-s", "list", "table", "inet", "bulkhead"]).stdout == before


def test_one_context_serves_several_threads(single: Namespace) -> None:
    documents = [rendered("web_db"), rendered("networks_ports")]
    code = (
        "import json, sys\n"
        "from concurrent.futures import ThreadPoolExecutor\n"
        "from agent.dataplane.libnftables import LibNftables\n"
        "documents = json.load(sys.stdin)\n"
        "listing = {'nftables': [{'list': {'tables': None}}]}\n"
        "with LibNftables() as nft, ThreadPoolExecutor(4) as pool:\n"
        "    jobs = [documents[i % 2] if i % 3 else listing for i in range(24)]\n"
        "    results = list(pool.map(nft.json_cmd, jobs))\n"
        "print(sum('nftables' in r for r in results))\n"
    )
    out = single.run([PYTHON, "-c", code], stdin=json.dumps(documents)).stdout
    assert out.strip() == "8"  # every listing answered; every apply returned no error
    assert dataplane(single, {"command": "is_present"}) == {"present": True}


@pytest.mark.parametrize("family", [4, 6])
def test_ingress_policy_allows_its_port_and_drops_others(
    served: tuple[Namespace, Namespace], family: int
) -> None:
    web, db = served
    assert connect(web, DB[family], 6000) == "connected"  # reachable without a policy
    assert dataplane(db, case_request("web_db")) == {"ok": True}
    assert connect(web, DB[family], 5432) == "connected"
    assert connect(web, DB[family], 6000) == "timeout"


@pytest.mark.parametrize("family", [4, 6])
def test_egress_policy_allows_its_port_and_blocks_others(
    served: tuple[Namespace, Namespace], family: int
) -> None:
    web, _ = served
    assert connect(web, DB[family], 7000) == "connected"
    assert dataplane(web, case_request("web_db")) == {"ok": True}
    assert connect(web, DB[family], 5432) == "connected"
    assert connect(web, DB[family], 7000) == "timeout"


@pytest.mark.parametrize("family", [4, 6])
def test_neighbour_discovery_works_with_both_ends_enforcing(
    served: tuple[Namespace, Namespace], family: int
) -> None:
    web, db = served
    for ns in (web, db):
        assert dataplane(ns, case_request("web_db")) == {"ok": True}
        ns.run(["ip", "neigh", "flush", "all"])
    # Address resolution (ARP, or ICMPv6 ND through our rules) happens under the policy.
    assert connect(web, DB[family], 5432) == "connected"
    assert connect(web, DB[family], 6000) == "timeout"


@pytest.mark.parametrize("family", [4, 6])
def test_visibility_mode_lets_denied_ports_through(
    served: tuple[Namespace, Namespace], family: int
) -> None:
    web, db = served
    assert dataplane(db, case_request("visibility")) == {"ok": True}
    # 6000 has an explicit deny rule, 7000 no rule at all: both only counted.
    assert connect(web, DB[family], 6000) == "connected"
    assert connect(web, DB[family], 7000) == "connected"
    assert counted_packets(db, "policy_in")["would-deny r-d3ad00 no-web-6000"] >= 1
    assert counted_packets(db, "input")["would-deny"] >= 1


@pytest.mark.parametrize("zone", [0, 5])
@pytest.mark.parametrize("family", [4, 6])
def test_cut_closes_a_connection_the_new_policy_no_longer_allows(
    served: tuple[Namespace, Namespace], family: int, zone: int
) -> None:
    """In conntrack zone 0, and in another zone: an entry is named by tuple and zone."""
    web, db = served
    if zone:
        db.run(["nft", "-f", "-"], stdin=ZONE_TABLE.format(zone=zone))
    assert dataplane(db, case_request("web_db")) == {"ok": True}
    client = web.popen([PYTHON, "-c", ECHO_CLIENT, DB[family], "5432"])
    assert client.stdin is not None
    assert client.stdout is not None

    def round_trip() -> str:
        assert client.stdin is not None
        assert client.stdout is not None
        client.stdin.write("ping\n")
        client.stdin.flush()
        return client.stdout.readline().strip()

    try:
        assert client.stdout.readline().strip() == "connected"
        assert round_trip() == "echo"
        no_policy = case_request("empty_enforce")
        assert dataplane(db, no_policy) == {"ok": True}
        assert round_trip() == "echo"  # established still passes: why the cut exists
        no_policy["command"] = "cut"
        no_policy["local_addresses"] = list(DB.values())
        reply = dataplane(db, no_policy)
        assert reply["cut"] >= 1
        assert round_trip() in ("timeout", "error 110")
    finally:
        client.kill()
        client.wait(timeout=10)


def test_cut_keeps_connections_that_are_still_allowed(served: tuple[Namespace, Namespace]) -> None:
    web, db = served
    assert dataplane(db, case_request("web_db")) == {"ok": True}
    client = web.popen([PYTHON, "-c", ECHO_CLIENT, DB[4], "5432"])
    assert client.stdin is not None
    assert client.stdout is not None
    try:
        assert client.stdout.readline().strip() == "connected"
        request = case_request("web_db", command="cut")
        request["local_addresses"] = list(DB.values())
        assert dataplane(db, request) == {"cut": 0}
        client.stdin.write("ping\n")
        client.stdin.flush()
        assert client.stdout.readline().strip() == "echo"
    finally:
        client.kill()
        client.wait(timeout=10)


def test_hundred_thousand_peers_apply_in_one_transaction(single: Namespace) -> None:
    request = case_request("web_db")
    base = 0xC6120000  # 198.18.0.0
    request["ruleset"]["sets"][1]["hosts"] = [
        f"{(base + i) >> 24}.{(base + i) >> 16 & 255}.{(base + i) >> 8 & 255}.{(base + i) & 255}"
        for i in range(1, 100_001)
    ]
    assert dataplane(single, request) == {"ok": True}
    listing = single.run(["nft", "-j", "list", "set", "inet", "bulkhead", "web_v4"]).stdout
    (set_item,) = [i["set"] for i in json.loads(listing)["nftables"] if "set" in i]
    assert len(set_item["elem"]) == 100_000
