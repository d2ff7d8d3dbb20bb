"""The kernel event listeners against the real kernel, in namespaces.

A client and a server namespace joined by a veth pair; the server loads a small nft
table that logs and drops tcp/5432 to NFLOG group 1001 (as the dataplanes do) and, with
its `ct state` rule, makes conntrack track the namespace. The listener runs in the
server namespace as a child process printing one JSON line per event, for a bounded
time and number of events.
"""

from __future__ import annotations

import json
import queue
import subprocess
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.integration.nslab import PYTHON, Namespace, lab_unavailable_reason, link, namespace

pytestmark = pytest.mark.integration

CLIENT = {4: "198.18.7.1", 6: "2001:db8:7::1"}
SERVER = {4: "198.18.7.2", 6: "2001:db8:7::2"}
DENIED_PORT = 5432
OPEN_PORT = 8080
PREFIX = "bh-deny-in "
WATCH_SECONDS = 20  # the child's own bound; the test stops it as soon as it is done
WATCH_MAX_EVENTS = 500
READY_TIMEOUT = 15.0
EVENT_TIMEOUT = 10.0
ECHO_SERVER = Path(__file__).with_name("echo_server.py")

SERVER_TABLE = f"""
table inet bhtest {{
  chain input {{
    type filter hook input priority 0; policy accept;
    ct state established,related accept
    tcp dport {DENIED_PORT} log group 1001 prefix "{PREFIX}" drop
  }}
}}
"""

# argv: nflog|conntrack, seconds, max events. Prints "ready", then one JSON line per event.
WATCH = """
import json, select, sys, time
from dataclasses import asdict
kind, seconds, limit = sys.argv[1], float(sys.argv[2]), int(sys.argv[3])
if kind == "nflog":
    from agent.observe.nflog import NflogListener as Listener
else:
    from agent.observe.ctevents import ConntrackListener as Listener
listener = Listener()
print("ready", flush=True)
deadline = time.monotonic() + seconds
count = 0
while count < limit and (left := deadline - time.monotonic()) > 0:
    if select.select([listener], [], [], min(left, 0.2))[0]:
        for event in listener.read_events():
            print(json.dumps(asdict(event)), flush=True)
            count += 1
listener.close()
"""

# argv: host, port, timeout. One connection attempt, closed at once; prints its outcome.
CONNECT = """
import json, socket, sys
host, port, timeout = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
family = socket.AF_INET6 if ":" in host else socket.AF_INET
sock = socket.socket(family, socket.SOCK_STREAM)
sock.bind(("::" if family == socket.AF_INET6 else "0.0.0.0", 0))
sport = sock.getsockname()[1]
sock.settimeout(timeout)
try:
    sock.connect((host, port))
    connected = True
except OSError:
    connected = False
sock.close()
print(json.dumps({"sport": sport, "connected": connected}))
"""


# The agent's observer (conntrack events, socket tables, /proc) in the client namespace,
# argv: its addresses. Prints "ready"; at a line on stdin it waits out the verdict delay
# and prints the flows it recorded as one JSON list.
OBSERVE = """
import asyncio, json, sys
from agent.observe.observer import VERDICT_WAIT_S, Observer
async def main():
    loop = asyncio.get_running_loop()
    observer = Observer(lambda: sys.argv[1:])
    observer.start(loop)
    runner = asyncio.create_task(observer.run())
    await asyncio.sleep(1.0)  # past the first (cold) snapshot of every socket
    print("ready", flush=True)
    await asyncio.wait_for(loop.run_in_executor(None, sys.stdin.readline), 60)
    await asyncio.sleep(2 * VERDICT_WAIT_S)
    flows = [
        {"peer": r.peer_ip, "port": r.port, "count": r.count,
         "process": r.process.name if r.process else None}
        for r in observer.table.take(10_000)
    ]
    print(json.dumps(flows), flush=True)
    runner.cancel()
    observer.close(loop)
asyncio.run(main())
"""
QUICK_CLIENT_NAME = "bh-quick"
# argv: host, port, seconds. One connection, held that long, from a process named bh-quick.
QUICK_CLIENT = f"""
import ctypes, socket, sys, time
ctypes.CDLL(None).prctl(15, b"{QUICK_CLIENT_NAME}", 0, 0, 0)
with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=2):
    time.sleep(float(sys.argv[3]))
"""
CLIENT_TABLE = """
table inet bhtest {
  chain output {
    type filter hook output priority 0; policy accept;
    ct state established,related accept
  }
}
"""


@dataclass(frozen=True)
class Hosts:
    client: Namespace
    server: Namespace


@pytest.fixture(scope="module")
def hosts() -> Iterator[Hosts]:
    reason = lab_unavailable_reason()
    if reason:
        pytest.skip(reason)
    with namespace("obsc") as client, namespace("obss") as server:
        link(
            client,
            server,
            [f"{CLIENT[4]}/24", f"{CLIENT[6]}/64"],
            [f"{SERVER[4]}/24", f"{SERVER[6]}/64"],
        )
        server.run(["nft", "-f", "-"], stdin=SERVER_TABLE)
        client.run(["nft", "-f", "-"], stdin=CLIENT_TABLE)  # conntrack tracks the client too
        echo = server.popen([PYTHON, str(ECHO_SERVER), str(OPEN_PORT)])
        try:
            assert echo.stdout is not None
            assert echo.stdout.readline().strip() == "ready"
            yield Hosts(client, server)
        finally:
            _stop(echo)


class Watcher:
    """The JSON lines of a listener child, read by a thread so waits can be bounded."""

    def __init__(self, process: subprocess.Popen[str]) -> None:
        self.process = process
        self._lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self._lines.put(line.strip())
        self._lines.put(None)  # the child ended

    def next_line(self, timeout: float) -> str | None:
        with suppress(queue.Empty):
            return self._lines.get(timeout=timeout)
        return None

    def wait_for(self, match: Callable[[dict[str, Any]], bool]) -> dict[str, Any] | None:
        """The first event MATCH accepts, None if none came within EVENT_TIMEOUT."""
        seen = 0
        while seen < WATCH_MAX_EVENTS:
            line = self.next_line(EVENT_TIMEOUT)
            if line is None:
                return None
            event: dict[str, Any] = json.loads(line)
            if match(event):
                return event
            seen += 1
        return None


@contextmanager
def watching(ns: Namespace, kind: str) -> Iterator[Watcher]:
    process = ns.popen([PYTHON, "-c", WATCH, kind, str(WATCH_SECONDS), str(WATCH_MAX_EVENTS)])
    try:
        watcher = Watcher(process)
        first = watcher.next_line(READY_TIMEOUT)
        if first != "ready":
            _stop(process)
            assert process.stderr is not None
            pytest.fail(f"{kind} listener did not start: {first!r} {process.stderr.read()}")
        yield watcher
    finally:
        _stop(process)


def _stop(process: subprocess.Popen[str]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=5)


def connect(ns: Namespace, host: str, port: int, timeout: float) -> dict[str, Any]:
    result: dict[str, Any] = json.loads(ns.python(CONNECT, host, str(port), str(timeout)))
    return result


@pytest.mark.parametrize("family", [4, 6])
def test_denied_packet_is_reported_with_its_prefix(hosts: Hosts, family: int) -> None:
    with watching(hosts.server, "nflog") as watcher:
        attempt = connect(hosts.client, SERVER[family], DENIED_PORT, timeout=0.3)
        assert not attempt["connected"], "the server table should drop tcp/5432"
        event = watcher.wait_for(lambda e: e["dport"] == DENIED_PORT)
    assert event is not None, "no NFLOG event for the dropped connection attempt"
    assert event == {
        "prefix": PREFIX,
        "family": family,
        "protocol": "tcp",
        "src": CLIENT[family],
        "dst": SERVER[family],
        "sport": attempt["sport"],
        "dport": DENIED_PORT,
        "timestamp": event["timestamp"],
    }


def test_allowed_traffic_is_not_logged(hosts: Hosts) -> None:
    with watching(hosts.server, "nflog") as watcher:
        assert connect(hosts.client, SERVER[4], OPEN_PORT, timeout=2)["connected"]
        # A marker that is logged: anything before it would have been logged first.
        marker = connect(hosts.client, SERVER[4], DENIED_PORT, timeout=0.3)
        event = watcher.wait_for(lambda e: True)
    assert event is not None
    assert (event["dport"], event["sport"]) == (DENIED_PORT, marker["sport"])


@pytest.mark.parametrize("family", [4, 6])
def test_short_connection_is_reported_by_conntrack(hosts: Hosts, family: int) -> None:
    with watching(hosts.server, "conntrack") as watcher:
        # Opened and closed at once: over long before any socket-table poll would look.
        attempt = connect(hosts.client, SERVER[family], OPEN_PORT, timeout=2)
        assert attempt["connected"]
        event = watcher.wait_for(lambda e: e["dport"] == OPEN_PORT)
    assert event is not None, "no conntrack event for the short connection"
    assert event == {
        "protocol": "tcp",
        "src": CLIENT[family],
        "dst": SERVER[family],
        "sport": attempt["sport"],
        "dport": OPEN_PORT,
        "family": family,
        "timestamp": event["timestamp"],
    }


def test_short_outbound_connections_are_attributed_to_their_process(hosts: Hosts) -> None:
    """A connection over in 50 ms is gone long before a 0.2 s tick: the observer must look
    its socket up as soon as conntrack reports it, while the process still holds it."""
    connections = 5
    observer = hosts.client.popen([PYTHON, "-c", OBSERVE, CLIENT[4], CLIENT[6]])
    try:
        watcher = Watcher(observer)
        assert watcher.next_line(READY_TIMEOUT) == "ready"
        for _ in range(connections):
            hosts.client.python(QUICK_CLIENT, SERVER[4], str(OPEN_PORT), "0.05")
        assert observer.stdin is not None
        observer.stdin.write("dump\n")
        observer.stdin.flush()
        line = watcher.next_line(EVENT_TIMEOUT)
    finally:
        _stop(observer)
    assert observer.stderr is not None
    assert line is not None, f"the observer printed no flows: {observer.stderr.read()}"
    flows = [f for f in json.loads(line) if (f["peer"], f["port"]) == (SERVER[4], OPEN_PORT)]
    counts = {f["process"]: f["count"] for f in flows}
    assert sum(counts.values()) == connections, flows
    # Each connection is a race between its 50 ms and the lookup: 1 in 40 was lost with
    # both cores busy, so two losses are allowed. Before lookups followed the events
    # (once per 0.2 s tick) it was 1 of 5 in every run.
    assert counts.get(QUICK_CLIENT_NAME, 0) >= connections - 2, flows
