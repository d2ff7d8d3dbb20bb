"""The agent's observation loop: sockets, new-connection events and logged drops become
flow records in a bounded FlowTable, ready to be reported.

Three sources, because each misses something:
* conntrack new-connection events see every connection, however short, as it starts;
  the process is looked up at once, while its socket still exists;
* a periodic socket snapshot catches what the events missed (connections older than
  the agent, hosts where conntrack events are off) and names long-lived processes;
* NFLOG packets from the dataplane's default-deny rules are the denied and would-be-
  denied flows. In visibility mode such a connection also succeeds and raises a
  conntrack event; it is counted once, as would-deny, which is why connection events
  wait VERDICT_WAIT_S (the kernel sends log batches every 100 ms) before being counted.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from contextlib import suppress
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from agent.dataplane.model import DENY_PREFIX, NFLOG_GROUP, WOULD_DENY_PREFIX
from agent.observe.flows import DEFAULT_CAPACITY, FlowRecord, FlowTable
from agent.observe.model import Connection, Direction, ProcessInfo, Verdict
from agent.observe.snapshot import FlowKey, SocketSnapshotter

log = logging.getLogger(__name__)

SNAPSHOT_INTERVAL_S = 5.0
VERDICT_WAIT_S = 0.5
TICK_S = 0.2
MIN_GAP_S = 0.005  # between two attributions of fresh events
IDLE_PER_BUSY = 9  # ... and at least 9x the last one's work: at most ~10% of a core
SEEN_MAX = 100_000  # connections remembered as counted (so a snapshot does not recount)
RECENT_DENIALS_S = 5.0
MAX_PENDING_EVENTS = 50_000
_T = TypeVar("_T")
CONNECTED_TCP_STATES = frozenset({"ESTABLISHED", "SYN_SENT", "SYN_RECV", "CLOSE_WAIT"})


@dataclass(frozen=True, slots=True)
class Observed:
    """One connection or packet, seen from this host."""

    key: FlowKey  # protocol, local ip, local port, peer ip, peer port
    direction: Direction
    at: float


class EventSource(Protocol):
    """A netlink listener (ctevents.ConntrackListener, nflog.NflogListener)."""

    def fileno(self) -> int: ...

    def read_events(self) -> list[Any]: ...

    def close(self) -> None: ...


class Observer:
    def __init__(
        self,
        local_addresses: Callable[[], Iterable[str]],
        *,
        capacity: int = DEFAULT_CAPACITY,
        snapshotter: SocketSnapshotter | None = None,
        clock: Callable[[], float] = time.time,
        ignore: Iterable[tuple[str, int]] = (),
    ) -> None:
        self.table = FlowTable(capacity)
        # Peers (address, port) whose flows are the agent's own business: its controller.
        self._ignore = frozenset((str(ipaddress.ip_address(a)), p) for a, p in ignore)
        self._local_addresses = local_addresses
        self._snapshotter = snapshotter or SocketSnapshotter()
        self._clock = clock
        self._seen: OrderedDict[FlowKey, float] = OrderedDict()
        self._recent_denials: dict[FlowKey, float] = {}
        self._waiting: list[tuple[Observed, ProcessInfo | None]] = []
        # Events read but not attributed yet (drained every tick, off the event loop).
        self._started: list[Observed] = []
        self._dropped: list[tuple[Observed, Verdict]] = []
        self._events_waiting = asyncio.Event()  # set when an event joins those lists
        self.events_lost = 0
        self._listeners: list[EventSource] = []
        self.connections_seen = 0
        self.denied_packets = 0
        # Local addresses the controller refuses (another agent holds them, outside this
        # agent's allowed ranges, ...): their flows are not reported, since the controller
        # refuses a whole report holding a flow on an address the agent does not hold.
        self._refused_local: frozenset[str] = frozenset()
        self.flows_on_refused = 0  # flows left out for that (figures, tests)

    # -- sources ------------------------------------------------------------------

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Subscribe to conntrack events and the NFLOG group, as far as this host allows."""
        # Imported here: they open netlink sockets, which unit tests of the rest do not need.
        from agent.netlink import NetlinkError
        from agent.observe.ctevents import ConntrackListener
        from agent.observe.nflog import NflogListener

        try:
            conntrack = ConntrackListener()
            loop.add_reader(conntrack.fileno(), self._on_conntrack, conntrack)
            self._listeners.append(conntrack)
        except (OSError, NetlinkError) as exc:
            log.warning("no conntrack events (%s): short connections may go unseen", exc)
        try:
            nflog = NflogListener(NFLOG_GROUP)
            loop.add_reader(nflog.fileno(), self._on_nflog, nflog)
            self._listeners.append(nflog)
        except (OSError, NetlinkError) as exc:
            # E.g. another logger holds the group: observation without drops beats no agent.
            log.warning("cannot read NFLOG group %d (%s): denied flows unseen", NFLOG_GROUP, exc)

    def lost_events(self) -> int:
        """Events lost: kernel socket overruns plus floods beyond the pending bound."""
        overruns = sum(int(getattr(listener, "overruns", 0)) for listener in self._listeners)
        return self.events_lost + overruns

    def close(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        for listener in self._listeners:
            if loop is not None:
                loop.remove_reader(listener.fileno())
            listener.close()
        self._listeners.clear()

    async def run(self, snapshot_interval: float = SNAPSHOT_INTERVAL_S) -> None:
        """Attribute and count what the events brought, take periodic snapshots, until
        cancelled. The socket tables are read off the event loop, once per tick for all
        events of that tick: per event batch they cost the loop most of a core at
        1,000 connections/s (bench/agent_load_bench.py)."""
        next_snapshot = 0.0
        while True:
            now = time.monotonic()
            busy = 0.0
            try:
                await self._attribute_pending()
                busy = time.monotonic() - now
                if now >= next_snapshot:
                    next_snapshot = now + snapshot_interval
                    taken_at = self._clock()
                    connections = await asyncio.to_thread(self._snapshotter.snapshot)
                    self.count_snapshot(connections, taken_at)
            except OSError:
                log.exception("reading the socket tables failed")
            self.count_waiting()
            await self._pause(busy)

    async def _pause(self, busy: float) -> None:
        """Wait for the next tick, or less when events wait to be attributed: a short
        outbound connection's socket, the only thing that names its process, is gone
        within milliseconds. Never sooner than IDLE_PER_BUSY times the last attribution's
        work (BUSY seconds), so attribution under a flood of events takes a bounded share
        of a core (the periodic snapshot is not counted: it must not delay the next one)."""
        await asyncio.sleep(min(TICK_S, max(MIN_GAP_S, busy * IDLE_PER_BUSY)))
        if self._started or self._dropped:
            return
        self._events_waiting.clear()
        with suppress(TimeoutError):
            await asyncio.wait_for(self._events_waiting.wait(), TICK_S)

    async def _attribute_pending(self) -> None:
        started, self._started = self._started, []
        dropped, self._dropped = self._dropped, []
        if not started and not dropped:
            return
        keys = [o.key for o in started] + [o.key for o, _ in dropped]
        processes = await asyncio.to_thread(self._snapshotter.attribute, keys)
        self.connections_started(started, processes)
        self.packets_dropped(dropped, processes)

    def _on_conntrack(self, listener: EventSource) -> None:
        events = listener.read_events()
        local = self._local_set()
        for event in events:
            seen = _orient(local, event)
            if seen is not None:
                self._queue(self._started, seen)

    def _on_nflog(self, listener: EventSource) -> None:
        events = listener.read_events()
        local = self._local_set()
        for event in events:
            if event.prefix.startswith(WOULD_DENY_PREFIX):
                verdict = Verdict.WOULD_DENY
            elif event.prefix.startswith(DENY_PREFIX):
                verdict = Verdict.DENIED
            else:
                continue
            seen = _orient(local, event)
            if seen is not None:
                self._queue(self._dropped, (seen, verdict))

    def _queue(self, pending: list[_T], item: _T) -> None:
        # Bounded: a flood faster than the ticks drain costs counts, not memory.
        if len(pending) >= MAX_PENDING_EVENTS:
            self.events_lost += 1
            return
        pending.append(item)
        self._events_waiting.set()

    # -- counting (public for tests: the sources above only feed these) ---------------

    def connections_started(
        self, observed: list[Observed], processes: Mapping[FlowKey, ProcessInfo | None]
    ) -> None:
        """New connections with their processes; counted after VERDICT_WAIT_S."""
        self._waiting.extend((o, processes.get(o.key)) for o in observed)

    def packets_dropped(
        self,
        packets: list[tuple[Observed, Verdict]],
        processes: Mapping[FlowKey, ProcessInfo | None],
    ) -> None:
        """Packets default-deny dropped (or would have): counted as packets."""
        for observed, verdict in packets:
            self.denied_packets += 1
            self._recent_denials[observed.key] = observed.at
            self._add(observed, verdict, processes.get(observed.key))

    def count_waiting(self, now: float | None = None) -> None:
        now = self._clock() if now is None else now
        due = [(o, p) for o, p in self._waiting if now - o.at >= VERDICT_WAIT_S]
        self._waiting = [(o, p) for o, p in self._waiting if now - o.at < VERDICT_WAIT_S]
        for observed, process in due:
            if observed.key in self._recent_denials:
                self._remember(observed.key, now)  # already counted as (would-)denied
                continue
            self._remember(observed.key, now)
            self.connections_seen += 1
            self._add(observed, Verdict.ALLOWED, process)
        cutoff = now - RECENT_DENIALS_S
        self._recent_denials = {k: t for k, t in self._recent_denials.items() if t >= cutoff}

    def count_snapshot(
        self, connections: Iterable[Connection], taken_at: float | None = None
    ) -> None:
        """Connections the events did not count (yet): counted once each. TAKEN_AT: the
        clock just before the tables were read; given, what was remembered before it and
        is not among CONNECTIONS is gone, and forgotten."""
        now = self._clock()
        local = self._local_set()
        waiting = {o.key for o, _ in self._waiting}
        live: set[FlowKey] = set()
        for connection in connections:
            if connection.direction is Direction.LISTEN or not _connected(connection):
                continue
            if connection.peer_ip in local or _loopback(connection.peer_ip):
                continue
            key = (
                connection.protocol,
                connection.local_ip,
                connection.local_port,
                connection.peer_ip,
                connection.peer_port,
            )
            live.add(key)
            if key in self._seen or key in waiting or key in self._recent_denials:
                if key in self._seen:
                    self._seen.move_to_end(key)
                continue
            observed = Observed(key, connection.direction, now)
            self._count_connection(observed, connection.process, now)
        if taken_at is not None:
            self._forget_gone(live, taken_at)

    @property
    def remembered(self) -> int:
        """Connections remembered as counted (tests and figures)."""
        return len(self._seen)

    def connection_table(self) -> list[Connection]:
        """The live socket-to-process table of this host."""
        return self._snapshotter.snapshot()

    def refuse_local(self, addresses: Iterable[str]) -> int:
        """Leave flows on ADDRESSES (local addresses the controller refuses) out from now
        on, instead of those refused before; returns how many pending flows were dropped."""
        self._refused_local = frozenset(str(ipaddress.ip_address(a)) for a in addresses)
        if not self._refused_local:
            return 0
        # The table offers no removal by key: take everything and put back, in its order,
        # what stays (never more than it held, so nothing is counted as dropped for room).
        pending = self.table.take(len(self.table))
        kept = [record for record in pending if record.local_ip not in self._refused_local]
        for record in kept:
            self.table.add(record)
        self.flows_on_refused += len(pending) - len(kept)
        return len(pending) - len(kept)

    # -- internals ----------------------------------------------------------------

    def _count_connection(
        self, observed: Observed, process: ProcessInfo | None, now: float
    ) -> None:
        if observed.key in self._seen:
            self._seen.move_to_end(observed.key)
            return
        self._remember(observed.key, now)
        self.connections_seen += 1
        self._add(observed, Verdict.ALLOWED, process)

    def _remember(self, key: FlowKey, now: float) -> None:
        self._seen[key] = now
        self._seen.move_to_end(key)
        while len(self._seen) > SEEN_MAX:
            self._seen.popitem(last=False)

    def _forget_gone(self, live: set[FlowKey], taken_at: float) -> None:
        # A connection is remembered only so that a snapshot does not count it again; once
        # the tables read after it was remembered lack it, no later snapshot can hold it.
        # Kept until SEEN_MAX instead, 1,000 short connections a second held ~330 bytes
        # each, up to ~33 MB (docs/benchmarks.md).
        gone = [key for key, at in self._seen.items() if at < taken_at and key not in live]
        for key in gone:
            del self._seen[key]

    def _add(self, observed: Observed, verdict: Verdict, process: ProcessInfo | None) -> None:
        protocol, local_ip, local_port, peer_ip, peer_port = observed.key
        if (peer_ip, peer_port) in self._ignore:
            return
        if local_ip in self._refused_local:
            self.flows_on_refused += 1
            return
        inbound = observed.direction is Direction.INBOUND
        self.table.add(
            FlowRecord(
                direction=observed.direction,
                local_ip=local_ip,
                peer_ip=peer_ip,
                port=local_port if inbound else peer_port,
                protocol=protocol,
                verdict=verdict,
                process=process,
                count=1,
                first_seen=observed.at,
                last_seen=observed.at,
            )
        )

    def _local_set(self) -> set[str]:
        return {str(ipaddress.ip_address(a)) for a in self._local_addresses()}


def _orient(local: set[str], event: Any) -> Observed | None:
    """An event (protocol, src, sport, dst, dport, timestamp) as this host sees it, or None
    if it is not between this host and another (loopback, or a protocol flows skip)."""
    protocol = "icmp" if event.protocol == "icmpv6" else event.protocol
    if protocol not in ("tcp", "udp", "icmp") or _loopback(event.src) or _loopback(event.dst):
        return None
    src, dst = event.src, event.dst
    if src in local and dst not in local:
        key = (protocol, src, event.sport, dst, event.dport)
        return Observed(key, Direction.OUTBOUND, event.timestamp)
    if dst in local and src not in local:
        key = (protocol, dst, event.dport, src, event.sport)
        return Observed(key, Direction.INBOUND, event.timestamp)
    return None


def _connected(connection: Connection) -> bool:
    if connection.protocol == "tcp":
        return connection.state in CONNECTED_TCP_STATES
    return bool(connection.peer_ip)


def _loopback(address: str) -> bool:
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return True
