"""The agent's own netlink dumps against pyroute2's, on the real kernel, in namespaces
this module creates: pyroute2 is the reference the agent no longer imports.

Addresses: a veth pair with IPv4 and IPv6 addresses, point-to-point addresses whose
IFA_ADDRESS is the far end, an address held twice, and addresses on the loopback
device. Conntrack: TCP, UDP and ICMP
entries of both families in the server namespace, and UDP entries in zone 5 (set by
the test's own table in the raw hooks).
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

from tests.integration.nslab import PYTHON, Namespace, lab_unavailable_reason, link, namespace

_REASON = lab_unavailable_reason()
pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(_REASON is not None, reason=f"namespace lab unavailable: {_REASON}"),
]

CLIENT = {4: "198.18.0.1", 6: "2001:db8::1"}
SERVER = {4: "198.18.0.2", 6: "2001:db8::2"}
TCP_PORT, UDP_PORT, ZONED_PORT, ZONE = 7000, 6000, 5353, 5
SERVER_LIFETIME = 60  # seconds; the test kills it sooner

# Each interface address as both read it: index, prefix length, IFA_ADDRESS, IFA_LOCAL
# (canonical text), sorted; then what discover_addresses() reports, and what the rule it
# keeps (IFA_LOCAL first; no loopback, no link-local) makes of pyroute2's dump.
ADDRESSES = """
import ipaddress, json
from pyroute2 import IPRoute
from agent.addresses import discover_addresses, dump_addresses
def text(value):
    return None if value is None else str(ipaddress.ip_address(value))
ours = [[a.index, a.prefixlen, text(a.address), text(a.local)] for a in dump_addresses()]
with IPRoute() as ipr:
    messages = list(ipr.get_addr())
theirs = [
    [m["index"], m["prefixlen"], text(m.get_attr("IFA_ADDRESS")), text(m.get_attr("IFA_LOCAL"))]
    for m in messages
]
own = {ipaddress.ip_address(m.get_attr("IFA_LOCAL") or m.get_attr("IFA_ADDRESS")) for m in messages}
expected = sorted(
    (a for a in own if not (a.is_loopback or a.is_link_local)), key=lambda a: (a.version, str(a))
)
print(json.dumps({
    "ours": sorted(ours, key=str), "theirs": sorted(theirs, key=str),
    "discovered": discover_addresses(), "expected": [str(a) for a in expected],
}))
"""

# Every entry of the namespace's conntrack table as both read it, sorted.
CONNTRACK = """
import ipaddress, json, socket
from pyroute2 import Conntrack
from agent import netlink
from agent.dataplane.conntrack import dump_entries
def text(value):
    return str(ipaddress.ip_address(value))
with netlink.open_socket(rcvbuf=0) as sock:
    ours = [
        [e.orig.family, e.orig.protocol, text(e.orig.src), text(e.orig.dst), e.orig.sport,
         e.orig.dport, list(e.orig.icmp) if e.orig.icmp else None, e.zone]
        for e in dump_entries(sock)
    ]
table = Conntrack(nfgen_family=socket.AF_UNSPEC)
try:
    theirs = []
    for e in table.dump_entries():
        t = e.tuple_orig
        icmp = [t.icmp_type, t.icmp_code, t.icmp_id] if t.icmp_type is not None else None
        theirs.append([
            4 if t.family == socket.AF_INET else 6, t.proto, text(t.saddr), text(t.daddr),
            t.sport or 0, t.dport or 0, icmp, e.zone or 0,
        ])
finally:
    table.close()
print(json.dumps({"ours": sorted(ours, key=str), "theirs": sorted(theirs, key=str)}))
"""

# The server's table: conntrack tracks the namespace (`ct state`), and UDP to and from
# ZONED_PORT goes into zone ZONE in both directions, before conntrack sees it.
ZONE_TABLE = f"""
table inet bh_test_zone {{
  chain raw_pre {{
    type filter hook prerouting priority raw; udp dport {ZONED_PORT} ct zone set {ZONE};
  }}
  chain raw_out {{
    type filter hook output priority raw; udp sport {ZONED_PORT} ct zone set {ZONE};
  }}
  chain input {{ type filter hook input priority filter; ct state established accept; }}
}}
"""

# Listens on TCP_PORT and answers UDP on UDP_PORT and ZONED_PORT (both families).
SERVER_CODE = f"""
import select, socket, time
tcp = socket.socket(socket.AF_INET6)
tcp.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
tcp.bind(("::", {TCP_PORT}))
tcp.listen(8)
udp = []
for port in ({UDP_PORT}, {ZONED_PORT}):
    s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    s.bind(("::", port))
    udp.append(s)
print("ready", flush=True)
accepted = []
deadline = time.monotonic() + {SERVER_LIFETIME}
while time.monotonic() < deadline:
    for s in select.select([tcp, *udp], [], [], 0.2)[0]:
        if s is tcp:
            accepted.append(tcp.accept()[0])
        else:
            data, peer = s.recvfrom(512)
            s.sendto(data, peer)
"""

# From the client: an ICMP echo request, a TCP connection (kept open), a UDP exchange on
# UDP_PORT and on ZONED_PORT, per family; prints "ready", holds the connections until
# stdin closes. Raw ICMP sockets: there is no ping command here.
CLIENT_CODE = f"""
import socket, struct, sys
servers = {SERVER!r}
def checksum(data):
    total = sum(struct.unpack("!%dH" % (len(data) // 2), data))
    total = (total >> 16) + (total & 0xFFFF)
    return ~(total + (total >> 16)) & 0xFFFF
echo = struct.pack("!BBHHH", 8, 0, 0, 77, 1) + b"bulkhead"
echo = echo[:2] + struct.pack("!H", checksum(echo)) + echo[4:]
with socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP) as icmp:
    icmp.sendto(echo, (servers[4], 0))
with socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6) as icmp:
    icmp.sendto(struct.pack("!BBHHH", 128, 0, 0, 77, 1) + b"bulkhead", (servers[6], 0))
held = []
for family, address in servers.items():
    held.append(socket.create_connection((address, {TCP_PORT}), timeout=5))
    af = socket.AF_INET if family == 4 else socket.AF_INET6
    for port in ({UDP_PORT}, {ZONED_PORT}):
        s = socket.socket(af, socket.SOCK_DGRAM)
        s.settimeout(5)
        s.sendto(b"ping", (address, port))
        assert s.recv(512) == b"ping"
        held.append(s)
print("ready", flush=True)
sys.stdin.read()
"""


@pytest.fixture
def linked() -> Iterator[tuple[Namespace, Namespace]]:
    with namespace("nlc") as client, namespace("nls") as server:
        link(
            client,
            server,
            [f"{CLIENT[4]}/24", f"{CLIENT[6]}/64"],
            [f"{SERVER[4]}/24", f"{SERVER[6]}/64"],
        )
        yield client, server


def test_address_dump_matches_pyroute2(linked: tuple[Namespace, Namespace]) -> None:
    client, _server = linked
    # Point-to-point addresses (IFA_ADDRESS is the peer), and one address held twice.
    add = ["ip", "address", "add"]
    client.run([*add, "198.18.1.1", "peer", "198.18.1.2/32", "dev", "veth0"])
    client.run([*add, "2001:db8:1::1", "peer", "2001:db8:1::2/128", "dev", "veth0", "nodad"])
    client.run([*add, f"{CLIENT[4]}/32", "dev", "lo"])
    client.run([*add, "2001:db8:2::1/128", "dev", "lo", "nodad"])

    seen = json.loads(client.python(ADDRESSES))

    assert seen["ours"] == seen["theirs"]
    assert seen["discovered"] == seen["expected"]
    # Sorted by version, then as text (not by value): as the agent always reported them.
    assert seen["discovered"] == [
        "198.18.0.1", "198.18.1.1", "2001:db8:1::1", "2001:db8:2::1", "2001:db8::1",
    ]  # fmt: skip


def test_conntrack_dump_matches_pyroute2(linked: tuple[Namespace, Namespace]) -> None:
    client, server = linked
    server.run(["nft", "-f", "-"], stdin=ZONE_TABLE)
    listener = server.popen([PYTHON, "-c", SERVER_CODE])
    talker = None
    try:
        assert listener.stdout is not None
        assert listener.stdout.readline().strip() == "ready"
        talker = client.popen([PYTHON, "-c", CLIENT_CODE])
        assert talker.stdout is not None
        assert talker.stdout.readline().strip() == "ready", talker.communicate(timeout=10)[1]

        seen = json.loads(server.python(CONNTRACK))
    finally:
        for process in (talker, listener):
            if process is not None:
                process.kill()
                process.wait(timeout=10)

    assert seen["ours"] == seen["theirs"]
    kinds = {(entry[0], entry[1], entry[5] if entry[1] in (6, 17) else None, entry[7])
             for entry in seen["ours"]}  # fmt: skip
    for family in (4, 6):
        assert (family, 6, TCP_PORT, 0) in kinds
        assert (family, 17, UDP_PORT, 0) in kinds
        assert (family, 17, ZONED_PORT, ZONE) in kinds
    assert (4, 1, None, 0) in kinds
    assert (6, 58, None, 0) in kinds


# In the server namespace: a ConntrackMirror read once (its one dump) before the client's
# traffic, then again after it; compared with a dump each time, then again after every
# entry is deleted. Prints one JSON line per step; waits for a line on stdin between.
MIRROR = """
import json, sys
from agent import netlink
from agent.dataplane.conntrack import dump_entries
from agent.dataplane.conntrack_mirror import ConntrackMirror
from agent.netlink import ctnetlink
def dumped():
    with netlink.open_socket(rcvbuf=0) as sock:
        return set(dump_entries(sock))
def report(step, seen):
    truth = dumped()
    print(json.dumps({"step": step, "same": seen == truth, "entries": len(truth),
                      "zones": sorted({e.zone for e in truth}), "dumps": mirror.dumps}), flush=True)
mirror = ConntrackMirror()
report("before", mirror.entries())
sys.stdin.readline()
report("traffic", mirror.entries())
with netlink.open_socket(rcvbuf=0) as sock:
    for number, entry in enumerate(dumped(), start=1):
        netlink.request(sock, ctnetlink.delete_request(entry, number), "delete")
report("deleted", mirror.entries())
mirror.close()
"""


def test_the_conntrack_mirror_follows_the_kernel_from_events_after_one_dump(
    linked: tuple[Namespace, Namespace],
) -> None:
    client, server = linked
    server.run(["nft", "-f", "-"], stdin=ZONE_TABLE)
    listener = server.popen([PYTHON, "-c", SERVER_CODE])
    mirror = server.popen([PYTHON, "-c", MIRROR])
    talker = None
    try:
        assert listener.stdout is not None
        assert mirror.stdin is not None
        assert mirror.stdout is not None
        assert listener.stdout.readline().strip() == "ready"
        before = json.loads(mirror.stdout.readline())
        talker = client.popen([PYTHON, "-c", CLIENT_CODE])
        assert talker.stdout is not None
        assert talker.stdout.readline().strip() == "ready", talker.communicate(timeout=10)[1]
        mirror.stdin.write("go\n")
        mirror.stdin.flush()
        traffic = json.loads(mirror.stdout.readline())
        deleted = json.loads(mirror.stdout.readline())
    finally:
        for process in (talker, mirror, listener):
            if process is not None:
                process.kill()
                process.wait(timeout=10)

    assert before == {"step": "before", "same": True, "entries": 0, "zones": [], "dumps": 1}
    # TCP, two UDP and ICMP per family: new entries reach the copy as events, no dump.
    assert traffic["same"], traffic
    assert traffic["entries"] >= 8
    assert traffic["zones"] == [0, ZONE]
    assert traffic["dumps"] == 1
    # Deleted entries leave it as destroy events.
    assert deleted == {"step": "deleted", "same": True, "entries": 0, "zones": [], "dumps": 1}
