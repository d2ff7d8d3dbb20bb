"""The iptables backend against the real kernel, inside namespaces this module creates.

Namespaces are named ``bh-ti-<tag>-<random>`` and removed on exit even after a failure.
The test process stays in the root namespace: the backend runs in a namespace through
``python -m agent.dataplane.apply_cli`` (with ``"backend": "iptables"``) under
``ip netns exec``, and the tables are read back with iptables-legacy-save and ipset.
Our chains have a copy in both the filter and the security table of each family.
"""

from __future__ import annotations

import ipaddress
import itertools
import json
import os
import re
import secrets
import shlex
import shutil
import signal
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import pytest
from google.protobuf import json_format

from agent.dataplane.baseline import baseline_from_json
from agent.dataplane.iptables import IptablesPlan, render_iptables
from agent.dataplane.iptables.plan import TABLES, Table
from bulkhead.v1 import ruleset_pb2 as pb
from tests.integration.nslab import PYTHON, Namespace, link
from tests.integration.test_nft_backend import CONNECT, ECHO_CLIENT, ECHO_SERVER

TOOLS = (
    "ip",
    "ipset",
    "iptables-legacy-save",
    "iptables-legacy-restore",
    "ip6tables-legacy-save",
    "ip6tables-legacy-restore",
)


def _unavailable() -> str | None:
    if os.geteuid() != 0:
        return "needs root to create network namespaces"
    missing = [tool for tool in TOOLS if shutil.which(tool) is None]
    return f"needs {', '.join(missing)}" if missing else None


_REASON = _unavailable()
pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(_REASON is not None, reason=f"iptables lab unavailable: {_REASON}"),
]

INPUTS = Path(__file__).resolve().parents[1] / "golden" / "nftables"
CASES = sorted(path.name.removesuffix(".input.json") for path in INPUTS.glob("*.input.json"))
WEB = {4: "198.18.0.1", 6: "2001:db8::1"}
DB = {4: "198.18.0.2", 6: "2001:db8::2"}
SERVED_PORTS = (5432, 6000, 7000)
SERVER_LIFETIME = 120  # seconds; the fixture kills it sooner
SAVE = {4: "iptables-legacy-save", 6: "ip6tables-legacy-save"}
LEGACY = {4: "iptables-legacy", 6: "ip6tables-legacy"}
BLOCKED = ("timeout", "error 1")  # dropped in INPUT: timeout; in OUTPUT: timeout or EPERM


@contextmanager
def namespace(tag: str) -> Iterator[Namespace]:
    """A fresh namespace with loopback up; removed (with what runs inside) on exit."""
    name = f"bh-ti-{tag}-{secrets.token_hex(3)}"
    subprocess.run(["ip", "netns", "add", name], check=True, timeout=30)
    try:
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True, timeout=30)
        sysctls = [f"net.ipv6.conf.{conf}.accept_dad=0" for conf in ("all", "default")]
        Namespace(name).run(["sysctl", "-q", "-w", *sysctls])
        yield Namespace(name)
    finally:
        pids = subprocess.run(
            ["ip", "netns", "pids", name], check=False, capture_output=True, text=True, timeout=30
        ).stdout.split()
        for pid in pids:  # only processes a test started in its own namespace
            with suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGKILL)
        subprocess.run(["ip", "netns", "del", name], check=True, timeout=30)


def case_request(case: str, command: str = "apply") -> dict[str, Any]:
    request: dict[str, Any] = json.loads((INPUTS / f"{case}.input.json").read_text())
    request["command"] = command
    return request


def plan_for(request: dict[str, Any]) -> IptablesPlan:
    ruleset = json_format.ParseDict(request["ruleset"], pb.Ruleset())
    return render_iptables(ruleset, baseline_from_json(json.dumps(request["baseline"])))


def dataplane(ns: Namespace, request: dict[str, Any], *, ok: bool = True) -> dict[str, Any]:
    """Run one apply_cli request with the iptables backend inside ns; return its reply."""
    result = ns.run(
        [PYTHON, "-m", "agent.dataplane.apply_cli"],
        stdin=json.dumps({**request, "backend": "iptables"}),
        check=False,
    )
    assert (result.returncode == 0) is ok, f"apply_cli: {result.stdout} {result.stderr}"
    reply: dict[str, Any] = json.loads(result.stdout)
    return reply


def saved(ns: Namespace, family: int, table: Table = "filter", *extra: str) -> str:
    """One table as iptables-save prints it, without its timestamped comments."""
    text = ns.run([SAVE[family], "-t", table, *extra]).stdout
    return "".join(line + "\n" for line in text.splitlines() if not line.startswith("#"))


def saved_tables(ns: Namespace) -> str:
    """Both tables of both families, as `saved` prints them."""
    return "".join(saved(ns, family, table) for family in (4, 6) for table in TABLES)


def our_rules(ns: Namespace, family: int, table: Table) -> list[str]:
    lines = saved(ns, family, table).splitlines()
    return [line for line in lines if line.startswith("-A BULKHEAD-")]


def chain_rules(ns: Namespace, family: int, chain: str, table: Table = "filter") -> list[str]:
    lines = saved(ns, family, table).splitlines()
    return [line for line in lines if line.startswith(f"-A {chain} ")]


def everything_else(ns: Namespace) -> str:
    """Every table of both families and every set, less Bulkhead's own lines."""
    text = "".join(ns.run([SAVE[family]]).stdout for family in (4, 6))
    text += ns.run(["ipset", "save"]).stdout
    return "".join(
        line + "\n"
        for line in text.splitlines()
        if not line.startswith("#")
        and "BULKHEAD-" not in line
        and " bh4-" not in line
        and " bh6-" not in line
    )


def ipset_members(ns: Namespace) -> dict[str, set[str]]:
    """Members of every set, as normalised networks."""
    members: dict[str, set[str]] = {}
    for line in ns.run(["ipset", "save"]).stdout.splitlines():
        verb, name, *rest = line.split()
        if verb == "create":
            members[name] = set()
        elif verb == "add":
            members[name].add(str(ipaddress.ip_network(rest[0])))
    return members


def planned_members(plan: IptablesPlan) -> dict[str, set[str]]:
    return {ipset.name: set(ipset.members) for ipset in plan.ipsets}


def counted_packets(ns: Namespace, family: int, chain: str, table: Table) -> dict[str, int]:
    """Packets counted per rule comment in one of our chains."""
    packets: dict[str, int] = {}
    for line in saved(ns, family, table, "-c").splitlines():
        counter, _, rule = line.partition(" ")
        if not rule.startswith(f"-A {chain} ") or "--comment" not in rule:
            continue
        words = shlex.split(rule)
        comment = words[words.index("--comment") + 1]
        count = int(counter.strip("[]").split(":")[0])
        packets[comment] = packets.get(comment, 0) + count
    return packets


def connect(ns: Namespace, host: str, port: int) -> str:
    return ns.python(CONNECT, host, str(port), timeout=30).strip()


@pytest.fixture
def single() -> Iterator[Namespace]:
    with namespace("one") as ns:
        yield ns


@pytest.fixture
def served() -> Iterator[tuple[Namespace, Namespace]]:
    """Namespaces web and db joined by a veth pair, each serving SERVED_PORTS."""
    with namespace("web") as web, namespace("db") as db:
        link(web, db, [f"{WEB[4]}/24", f"{WEB[6]}/64"], [f"{DB[4]}/24", f"{DB[6]}/64"])
        ports = ",".join(map(str, SERVED_PORTS))
        servers = [
            ns.popen([PYTHON, "-c", ECHO_SERVER, ports, str(SERVER_LIFETIME)]) for ns in (web, db)
        ]
        try:
            for server in servers:
                assert server.stdout is not None
                assert server.stdout.readline().strip() == "ready"
            yield web, db
        finally:
            for server in servers:
                server.kill()
                server.wait(timeout=10)


@pytest.mark.parametrize("case", CASES)
def test_applied_rules_and_sets_read_back_as_rendered(single: Namespace, case: str) -> None:
    request = case_request(case)
    plan = plan_for(request)
    assert dataplane(single, request) == {"ok": True}  # on a namespace with no security table
    for family in (4, 6):
        for table in TABLES:
            assert our_rules(single, family, table) == list(plan.family(family).table(table))
            assert chain_rules(single, family, "INPUT", table) == ["-A INPUT -j BULKHEAD-INPUT"]
            assert chain_rules(single, family, "OUTPUT", table) == ["-A OUTPUT -j BULKHEAD-OUTPUT"]
    assert ipset_members(single) == planned_members(plan)
    assert dataplane(single, {"command": "is_present"}) == {"present": True}


def test_foreign_chains_rules_and_sets_are_left_byte_identical(single: Namespace) -> None:
    single.run(["ipset", "create", "user-allow", "hash:ip"])
    single.run(["ipset", "add", "user-allow", "198.18.9.9"])
    single.run(
        ["iptables-legacy-restore"],
        stdin="*nat\n:DOCKER - [0:0]\n-A DOCKER -i docker0 -j RETURN\nCOMMIT\n"
        "*filter\n:DOCKER - [0:0]\n"
        '-A INPUT -p tcp -m tcp --dport 9999 -m comment --comment "user\'s rule" -j DROP\n'
        "-A INPUT -m set --match-set user-allow src -j ACCEPT\n"
        "-A FORWARD -o docker0 -j DOCKER\n"
        "-A DOCKER -d 172.17.0.2/32 ! -i docker0 -o docker0 -p tcp -m tcp --dport 80 -j ACCEPT\n"
        "COMMIT\n"
        "*mangle\n:MARKING - [0:0]\n"
        "-A PREROUTING -i veth0 -j MARK --set-xmark 0x1/0xffffffff\n"
        '-A INPUT -p tcp -m tcp --dport 9998 -m comment --comment "user\'s mark" -j MARKING\n'
        "-A MARKING -j MARK --set-xmark 0x2/0xffffffff\n"
        "COMMIT\n"
        "*security\n:LABELLING - [0:0]\n"
        '-A INPUT -p tcp -m tcp --dport 9997 -m comment --comment "user\'s label" -j LABELLING\n'
        "-A LABELLING -j RETURN\n"
        "COMMIT\n",
    )
    single.run(
        ["ip6tables-legacy-restore"],
        stdin="*filter\n-A OUTPUT -p udp -m udp --dport 9999 -j DROP\nCOMMIT\n"
        "*mangle\n-A OUTPUT -p udp -m udp --dport 9998 -j MARK --set-xmark 0x3/0xffffffff\n"
        "COMMIT\n"
        "*security\n-A OUTPUT -p udp -m udp --dport 9997 -j RETURN\nCOMMIT\n",
    )
    before = everything_else(single)
    assert "--dport 9999" in before
    assert "MARKING" in before
    assert "LABELLING" in before
    assert "--dport 9998 -j MARK" in before
    assert "user-allow" in before
    full_before = saved_tables(single)

    for case in ("web_db", "networks_ports", "networks_ports", "visibility"):
        assert dataplane(single, case_request(case)) == {"ok": True}
        assert everything_else(single) == before
        for family, table in itertools.product((4, 6), TABLES):
            assert chain_rules(single, family, "INPUT", table)[0] == "-A INPUT -j BULKHEAD-INPUT"
            assert saved(single, family, table).count("-j BULKHEAD-INPUT") == 1
    assert set(ipset_members(single)) == {"user-allow", "bh4-db", "bh6-db", "bh4-web", "bh6-web"}

    assert dataplane(single, {"command": "remove"}) == {"ok": True}
    assert saved_tables(single) == full_before
    assert everything_else(single) == before
    assert list(ipset_members(single)) == ["user-allow"]
    assert dataplane(single, {"command": "is_present"}) == {"present": False}
    assert dataplane(single, {"command": "remove"}) == {"ok": True}  # absent: no error


@pytest.mark.parametrize("table", TABLES)
def test_a_jump_pushed_down_is_moved_back_to_the_top_never_duplicated(
    single: Namespace, table: Table
) -> None:
    assert dataplane(single, case_request("web_db")) == {"ok": True}
    pushing = ["-t", table, "-I", "INPUT", "1", "-p", "udp", "--dport", "9", "-j", "RETURN"]
    for family in (4, 6):
        single.run([LEGACY[family], *pushing])
    assert dataplane(single, {"command": "is_present"}) == {"present": False}
    assert dataplane(single, case_request("web_db")) == {"ok": True}
    for family in (4, 6):
        assert chain_rules(single, family, "INPUT", table) == [
            "-A INPUT -j BULKHEAD-INPUT",
            "-A INPUT -p udp -m udp --dport 9 -j RETURN",
        ]
    assert dataplane(single, {"command": "is_present"}) == {"present": True}


def test_address_change_changes_set_members_not_rules(single: Namespace) -> None:
    request = case_request("web_db")
    assert dataplane(single, request) == {"ok": True}
    rules = saved_tables(single)
    request["ruleset"]["sets"][1]["hosts"] = ["198.18.0.3", "2001:db8::3"]
    assert dataplane(single, request) == {"ok": True}
    assert saved_tables(single) == rules
    members = ipset_members(single)
    assert members["bh4-web"] == {"198.18.0.3/32"}
    assert members["bh6-web"] == {"2001:db8::3/128"}
    assert members == planned_members(plan_for(request))


def test_a_failing_set_swap_reports_ipset_and_keeps_the_rules_and_sets(single: Namespace) -> None:
    assert dataplane(single, case_request("empty_enforce")) == {"ok": True}
    before = saved_tables(single)
    single.run(["ipset", "create", "bh4-web", "hash:ip"])  # not a hash:net: cannot be swapped
    sets_before = single.run(["ipset", "list"]).stdout
    reply = dataplane(single, case_request("web_db"), ok=False)
    assert reply["error"].startswith("DataplaneError: ipset: ")
    assert "cannot be swapped" in reply["error"]
    assert "(in `swap bh4-web-new bh4-web`)" in reply["error"]
    assert saved_tables(single) == before
    # bh4-db and bh6-db were swapped before it: swapped back, and what the apply made is gone.
    assert single.run(["ipset", "list"]).stdout == sets_before


# Applies a request read from stdin with the real tools, adding one rule (argv[1]) to the
# IPv6 apply's script, both to its --test and to its commit, and to nothing after them.
INJECTING_APPLY = r"""
import json, sys
from google.protobuf import json_format
from agent.dataplane.baseline import baseline_from_json
from agent.dataplane.iptables import IptablesBackend, SubprocessRunner
from bulkhead.v1 import ruleset_pb2

class InjectingRunner(SubprocessRunner):
    def __init__(self, rule):
        super().__init__()
        self.rule, self.left = rule, 2

    def run(self, argv, stdin=None):
        if argv[0] == "ip6tables-legacy-restore" and self.left and stdin:
            self.left -= 1
            head, _, tail = stdin.rpartition("COMMIT\n")  # the security section's
            stdin = head + self.rule + "\nCOMMIT\n" + tail
        return super().run(argv, stdin)

request = json.load(sys.stdin)
ruleset = json_format.ParseDict(request["ruleset"], ruleset_pb2.Ruleset())
baseline = baseline_from_json(json.dumps(request["baseline"]))
try:
    IptablesBackend(InjectingRunner(sys.argv[1])).apply(ruleset, baseline)
except Exception as exc:
    print(json.dumps({"error": f"{type(exc).__name__}: {exc}"}))
else:
    print(json.dumps({"ok": True}))
"""


def kernel_state(ns: Namespace) -> str:
    """Every table of both families and `ipset list` (set objects, their random initval
    and references included), less iptables-save's timestamped comments."""
    text = "".join(ns.run([SAVE[family]]).stdout for family in (4, 6))
    text += ns.run(["ipset", "list"]).stdout
    return "".join(line + "\n" for line in text.splitlines() if not line.startswith("#"))


@pytest.mark.parametrize(
    ("rule", "refusal"),
    [
        # iptables-restore --test accepts it; the kernel's REJECT check refuses it at commit,
        # after IPv4 and IPv6's filter table are committed and the sets swapped.
        (
            "-A BULKHEAD-INPUT -p udp -j REJECT --reject-with tcp-reset",
            r"ip6tables-restore: line \d+ failed; the previous rules and sets are back$",
        ),
        # --test itself refuses it: nothing is swapped or committed at all.
        (
            "-A BULKHEAD-INPUT -m set --match-set bh6-missing src -j RETURN",
            r"ip6tables-restore v1\.8\.\d+ \(legacy\): Set bh6-missing doesn't exist",
        ),
    ],
)
def test_a_refused_ipv6_script_leaves_both_families_and_the_sets_as_they_were(
    single: Namespace, rule: str, refusal: str
) -> None:
    assert dataplane(single, case_request("web_db")) == {"ok": True}
    before = kernel_state(single)
    request = case_request("web_db")
    # web moves (a swap to undo), api comes (sets to destroy again) with a rule of its own.
    request["ruleset"]["sets"][1]["hosts"] = ["198.18.0.3", "2001:db8::3"]
    request["ruleset"]["sets"].append({"name": "api", "hosts": ["198.18.0.9", "2001:db8::9"]})
    request["ruleset"]["rules"].append(
        {**request["ruleset"]["rules"][0], "peerSet": "api", "id": "r-a1b2c3"}
    )
    result = single.run([PYTHON, "-c", INJECTING_APPLY, rule], stdin=json.dumps(request))
    reply = json.loads(result.stdout)
    assert re.search(refusal, reply["error"]), reply
    assert kernel_state(single) == before
    assert dataplane(single, request) == {"ok": True}, "and the same apply passes untouched"
    assert ipset_members(single) == planned_members(plan_for(request))


def test_ten_thousand_peers_of_each_family_fill_one_set_each(single: Namespace) -> None:
    request = case_request("web_db")
    v4 = ipaddress.IPv4Address("198.18.0.0")
    v6 = ipaddress.IPv6Address("2001:db8:100::")
    hosts = [str(v4 + i) for i in range(1, 10_001)] + [str(v6 + i) for i in range(1, 10_001)]
    request["ruleset"]["sets"][1]["hosts"] = hosts
    assert dataplane(single, request) == {"ok": True}
    members = ipset_members(single)
    assert (len(members["bh4-web"]), len(members["bh6-web"])) == (10_000, 10_000)
    assert our_rules(single, 4, "security") == list(plan_for(case_request("web_db")).v4.security)


@pytest.mark.parametrize("family", [4, 6])
def test_ingress_policy_allows_its_port_and_blocks_others_and_the_reverse_direction(
    served: tuple[Namespace, Namespace], family: int
) -> None:
    web, db = served
    assert connect(web, DB[family], 6000) == "connected"  # reachable without a policy
    assert connect(db, WEB[family], 5432) == "connected"
    assert dataplane(db, case_request("web_db")) == {"ok": True}
    assert connect(web, DB[family], 5432) == "connected"
    assert connect(web, DB[family], 6000) == "timeout"
    assert connect(db, WEB[family], 5432) in BLOCKED  # db may not open flows to web


@pytest.mark.parametrize("family", [4, 6])
def test_egress_policy_allows_its_port_and_blocks_others(
    served: tuple[Namespace, Namespace], family: int
) -> None:
    web, _ = served
    assert connect(web, DB[family], 7000) == "connected"
    assert dataplane(web, case_request("web_db")) == {"ok": True}
    assert connect(web, DB[family], 5432) == "connected"
    assert connect(web, DB[family], 7000) in BLOCKED


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
def test_visibility_mode_lets_denied_ports_through_and_counts_them(
    served: tuple[Namespace, Namespace], family: int
) -> None:
    web, db = served
    assert dataplane(db, case_request("visibility")) == {"ok": True}
    for table in TABLES:
        assert counted_packets(db, family, "BULKHEAD-INPUT", table)["would-deny"] == 0
    # 6000 has an explicit deny rule, 7000 no rule at all: both only counted.
    assert connect(web, DB[family], 6000) == "connected"
    assert connect(web, DB[family], 7000) == "connected"
    # Each copy counts them in one rule each (filter's NFLOG, security's RETURN): the same
    # packets, since both copies see every packet.
    filter_, security = (counted_packets(db, family, "BULKHEAD-INPUT", table) for table in TABLES)
    assert filter_["would-deny r-d3ad00 no-web-6000"] >= 1
    assert filter_["would-deny"] >= 1
    assert security == filter_


@pytest.mark.parametrize("family", [4, 6])
def test_cut_closes_a_connection_the_new_policy_no_longer_allows(
    served: tuple[Namespace, Namespace], family: int
) -> None:
    web, db = served
    assert dataplane(db, case_request("web_db")) == {"ok": True}
    client = web.popen([PYTHON, "-c", ECHO_CLIENT, DB[family], "5432"])

    def round_trip() -> str:
        assert client.stdin is not None
        assert client.stdout is not None
        client.stdin.write("ping\n")
        client.stdin.flush()
        return client.stdout.readline().strip()

    try:
        assert client.stdout is not None
        assert client.stdout.readline().strip() == "connected"
        assert round_trip() == "echo"
        no_policy = case_request("empty_enforce")
        assert dataplane(db, no_policy) == {"ok": True}
        assert round_trip() == "echo"  # established still passes: why the cut exists
        no_policy["command"] = "cut"
        no_policy["local_addresses"] = list(DB.values())
        assert dataplane(db, no_policy)["cut"] >= 1
        assert round_trip() in ("timeout", "error 110")
    finally:
        client.kill()
        client.wait(timeout=10)


# Tampering with one copy, as the ordinary tools do it: each opens that copy wide.
ONE_COPY_TAMPERS = [
    ("filter", ("-I", "BULKHEAD-INPUT", "1", "-j", "ACCEPT")),
    ("filter", ("-F", "BULKHEAD-INPUT")),
    ("security", ("-I", "BULKHEAD-INPUT", "1", "-j", "ACCEPT")),
    ("security", ("-F", "BULKHEAD-INPUT")),
]


@pytest.mark.parametrize(
    ("table", "tamper"), ONE_COPY_TAMPERS, ids=lambda v: v if isinstance(v, str) else v[0]
)
def test_tampering_with_one_copy_alone_opens_nothing(
    served: tuple[Namespace, Namespace], table: Table, tamper: tuple[str, ...]
) -> None:
    # No agent runs here to repair it: the other copy alone must keep denying.
    web, db = served
    assert dataplane(db, case_request("web_db")) == {"ok": True}
    for family in (4, 6):
        db.run([LEGACY[family], "-t", table, *tamper])
    for family in (4, 6):
        assert connect(web, DB[family], 5432) == "connected"
        assert connect(web, DB[family], 6000) == "timeout"


def test_a_locally_redirected_connection_is_judged_by_its_real_destination(
    served: tuple[Namespace, Namespace],
) -> None:
    # nat's OUTPUT rewrites the destination before filter and security see the packet (as
    # kube-proxy or Docker do for the host's own traffic); web may reach db:5432 only.
    web, db = served
    for namespace in (web, db):
        assert dataplane(namespace, case_request("web_db")) == {"ok": True}
    service = "198.18.0.99"  # on the link, so routed; no host holds it
    web.run(
        [LEGACY[4], "-t", "nat", "-A", "OUTPUT", "-d", service, "-p", "tcp", "-j", "DNAT",
         "--to-destination", DB[4]]
    )  # fmt: skip
    assert connect(web, service, 5432) == "connected"
    assert connect(web, service, 6000) in BLOCKED
