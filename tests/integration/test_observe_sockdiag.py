"""The sock_diag reader on the real kernel: in a namespace of its own, TCP and UDP
sockets over IPv4, IPv6 and IPv4-mapped IPv6, read through sock_diag and through
/proc/net by the same process (both show the reader's network namespace)."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator

import pytest

from tests.integration.nslab import Namespace, lab_unavailable_reason, namespace

_REASON = lab_unavailable_reason()
pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(_REASON is not None, reason=f"namespace lab unavailable: {_REASON}"),
]

# Opens the sockets, reads them both ways, prints what it read.
READ_BOTH_WAYS = """
import json, socket
from socket import AF_INET, AF_INET6, IPPROTO_IPV6, IPV6_V6ONLY, SOCK_DGRAM
from agent.observe.sockdiag import SockDiagReader
from agent.observe.sockets import SocketTableReader

held = []

def tcp_pair(family, listen_at, dial, v6only=None):
    listener = socket.socket(family)
    if v6only is not None:
        listener.setsockopt(IPPROTO_IPV6, IPV6_V6ONLY, v6only)
    listener.bind((listen_at, 0))
    listener.listen(4)
    client = socket.create_connection((dial, listener.getsockname()[1]), timeout=5)
    accepted, _ = listener.accept()
    held.extend([listener, client, accepted])
    return client, accepted

tcp_pair(AF_INET, "127.0.0.1", "127.0.0.1")
tcp_pair(AF_INET6, "::1", "::1")
_, mapped = tcp_pair(AF_INET6, "::", "127.0.0.1", v6only=0)  # accepted from ::ffff:127.0.0.1
closer, closed = tcp_pair(AF_INET, "127.0.0.1", "127.0.0.1")
closer.close()  # first: it lingers in TIME_WAIT, which no file holds
closed.close()
bound = socket.socket()
bound.bind(("127.0.0.1", 0))  # bound, never listening: in no table
held.append(bound)
servers = {}
for family, host in ((AF_INET, "127.0.0.1"), (AF_INET6, "::1")):
    server = socket.socket(family, SOCK_DGRAM)
    server.bind((host, 0))
    client = socket.socket(family, SOCK_DGRAM)
    client.connect(server.getsockname())
    servers[family] = server
    held.extend([server, client])
dual = socket.socket(AF_INET6, SOCK_DGRAM)
dual.setsockopt(IPPROTO_IPV6, IPV6_V6ONLY, 0)
dual.connect(("::ffff:127.0.0.1", servers[AF_INET].getsockname()[1]))
held.append(dual)

reader = SockDiagReader()
first = reader.read()
again = reader.read()
print(json.dumps({
    "source": reader.source,
    "malformed": reader.malformed,
    "sock_diag": sorted(first),
    "proc_net": sorted(SocketTableReader().read()),
    "fresh_again": len(reader.fresh),
    "same_again": len(again) == len(first) and all(map(lambda a, b: a is b, again, first)),
    "mapped": [list(mapped.getsockname()[:2]), list(mapped.getpeername()[:2])],
    "dual": list(dual.getsockname()[:2]),
}))
"""


@pytest.fixture
def ns() -> Iterator[Namespace]:
    with namespace("sockdiag") as created:
        yield created


def test_sock_diag_reads_the_records_proc_net_reads(ns: Namespace) -> None:
    result = json.loads(ns.python(READ_BOTH_WAYS))

    assert result["source"] == "sock_diag"
    assert result["malformed"] == 0
    diag = [tuple(record) for record in result["sock_diag"]]
    assert diag == [tuple(record) for record in result["proc_net"]]
    # 4 listeners and 3 connected pairs (the closed pair's sockets are held by no file,
    # the bound-only socket is in no table); UDP: 2 servers, 3 connected.
    assert len(diag) == 4 + 6 + 5
    uid = os.geteuid()
    (local, local_port), (peer, peer_port) = result["mapped"]
    assert (local, peer) == ("::ffff:127.0.0.1", "::ffff:127.0.0.1")
    assert ("tcp", "127.0.0.1", local_port, "127.0.0.1", peer_port, "ESTABLISHED", uid) in [
        record[:7] for record in diag
    ]
    dual_port = result["dual"][1]
    [dual] = [record for record in diag if record[:3] == ("udp", "127.0.0.1", dual_port)]
    assert dual[5] == "ESTABLISHED"
    assert {record[5] for record in diag if record[0] == "udp" and not record[3]} == {"UNCONN"}
    assert result["fresh_again"] == 0
    assert result["same_again"]
