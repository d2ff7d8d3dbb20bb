"""The socket snapshot on the real kernel: in a namespace of its own, a server that calls
itself bh-db-server, a client connected to it, and a snapshot taken inside (the socket
tables of /proc/net are those of the reader's namespace)."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from typing import Any

import psutil  # type: ignore[import-untyped]
import pytest

from agent.observe.processes import systemd_unit, user_name
from tests.integration.nslab import PYTHON, Namespace, lab_unavailable_reason, namespace

_REASON = lab_unavailable_reason()
pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(_REASON is not None, reason=f"namespace lab unavailable: {_REASON}"),
]

LIFETIME = "60"  # seconds a helper process lives at most; the test ends it sooner
READY_TIMEOUT = 10.0

# Names itself (prctl PR_SET_NAME), listens dual-stack on TCP and unconnected on UDP,
# prints "PID TCP_PORT UDP_PORT", accepts one connection, prints "accepted".
SERVER = """
import ctypes, os, select, socket, sys
ctypes.CDLL(None).prctl(15, b"bh-db-server", 0, 0, 0)
listener = socket.socket(socket.AF_INET6)
listener.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
listener.bind(("::", 0))
listener.listen(4)
udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
udp.bind(("127.0.0.1", 0))
print(os.getpid(), listener.getsockname()[1], udp.getsockname()[1], flush=True)
listener.settimeout(float(sys.argv[1]))
connection, _ = listener.accept()
print("accepted", flush=True)
select.select([sys.stdin], [], [], float(sys.argv[1]))
"""

# Names itself, connects over IPv4 to argv[2], prints "PID LOCAL_PORT", stays.
CLIENT = """
import ctypes, os, select, socket, sys
ctypes.CDLL(None).prctl(15, b"bh-db-client", 0, 0, 0)
connection = socket.create_connection(("127.0.0.1", int(sys.argv[2])), timeout=5)
print(os.getpid(), connection.getsockname()[1], flush=True)
select.select([sys.stdin], [], [], float(sys.argv[1]))
"""

# Takes a snapshot (twice: the second is the incremental one) and looks one flow up.
SNAPSHOT = """
import dataclasses, json, sys
from agent.observe.snapshot import SocketSnapshotter

def plain(record):
    if record is None:
        return None
    return json.loads(json.dumps(dataclasses.asdict(record), default=lambda enum: enum.value))

snapshotter = SocketSnapshotter()
first = snapshotter.snapshot()
again = snapshotter.snapshot()
print(json.dumps({
    "connections": [plain(c) | {"service_port": c.service_port} for c in again],
    "same_again": first == again,
    "lookup": plain(snapshotter.lookup(*json.loads(sys.argv[1]))),
}))
"""


def _first_line(process: subprocess.Popen[str]) -> list[str]:
    assert process.stdout is not None
    line = process.stdout.readline()  # a helper prints at once, or ends within LIFETIME
    assert line, f"helper ended early: {process.stderr.read() if process.stderr else ''}"
    return line.split()


@pytest.fixture
def ns() -> Iterator[Namespace]:
    with namespace("obs") as created:
        yield created


@pytest.fixture
def helpers() -> Iterator[list[subprocess.Popen[str]]]:
    """Processes a test starts; killed and reaped at its end."""
    started: list[subprocess.Popen[str]] = []
    yield started
    for process in started:
        process.kill()
        process.wait(timeout=READY_TIMEOUT)
        for stream in (process.stdin, process.stdout, process.stderr):
            if stream is not None:
                stream.close()


def _by(connections: list[dict[str, Any]], **fields: Any) -> dict[str, Any]:
    [match] = [c for c in connections if all(c[k] == v for k, v in fields.items())]
    return match


def test_snapshot_names_the_listener_its_connection_and_the_client(
    ns: Namespace, helpers: list[subprocess.Popen[str]]
) -> None:
    server = ns.popen([PYTHON, "-c", SERVER, LIFETIME])
    helpers.append(server)
    server_pid, port, udp_port = map(int, _first_line(server))
    client = ns.popen([PYTHON, "-c", CLIENT, LIFETIME, str(port)])
    helpers.append(client)
    client_pid, client_port = map(int, _first_line(client))
    assert _first_line(server) == ["accepted"]

    flow = ["tcp", "127.0.0.1", client_port, "127.0.0.1", port]
    result = json.loads(ns.python(SNAPSHOT, json.dumps(flow)))
    connections = result["connections"]

    assert result["same_again"]
    assert len(connections) == 4  # nothing else holds a socket in this namespace
    listener = _by(connections, protocol="tcp", direction="listen")
    assert (listener["state"], listener["local_ip"], listener["local_port"]) == (
        "LISTEN",
        "::",
        port,
    )
    assert (listener["peer_ip"], listener["peer_port"]) == ("", 0)
    accepted = _by(connections, protocol="tcp", local_port=port, peer_port=client_port)
    # IPv4 into a dual-stack listener: the kernel's ::ffff:127.0.0.1, shown as IPv4.
    assert (accepted["direction"], accepted["local_ip"]) == ("inbound", "127.0.0.1")
    assert accepted["state"] == "ESTABLISHED"
    outgoing = _by(connections, protocol="tcp", local_port=client_port)
    assert (outgoing["direction"], outgoing["service_port"]) == ("outbound", port)
    assert (outgoing["peer_ip"], outgoing["peer_port"]) == ("127.0.0.1", port)
    udp = _by(connections, protocol="udp")
    assert (udp["direction"], udp["state"], udp["service_port"]) == ("listen", "UNCONN", udp_port)

    for connection in (listener, accepted, udp):
        assert connection["process"]["pid"] == server_pid
        assert connection["process"]["name"] == "bh-db-server"
    assert outgoing["process"]["pid"] == client_pid
    assert outgoing["process"]["name"] == "bh-db-client"
    for pid, connection in ((server_pid, listener), (client_pid, outgoing)):
        process = connection["process"]
        assert process["exe"] == os.path.realpath(PYTHON)
        assert process["cmdline"][:2] == [PYTHON, "-c"]
        assert process["user"] == user_name(os.geteuid())
        assert process["start_time"] == psutil.Process(pid).create_time()
        with open(f"/proc/{pid}/cgroup") as cgroup:
            assert process["unit"] == systemd_unit(cgroup.read())
        assert connection["uid"] == os.geteuid()
    assert result["lookup"] == outgoing["process"]
