"""The sockets of this network namespace, each with its process and direction.

`SocketSnapshotter.snapshot()` combines the socket tables (from sock_diag, sockdiag.py;
from /proc/net, sockets.py, where sock_diag is not to be had), the socket -> process
map (owners.py) and the process descriptions (processes.py). It is made to be
called periodically: what did not change since the previous call is not read, parsed or
built again, so with nothing changed a snapshot costs little more than the kernel's
dump of the tables.

Direction: a TCP LISTEN or unconnected UDP socket is LISTEN (so is a TCP socket that is
only bound); a connected socket whose local port is one some local socket listens on
(TCP) or is bound unconnected on (UDP), at the same or the wildcard address, is INBOUND;
any other connected socket is OUTBOUND.
"""

from __future__ import annotations

import dataclasses
import gc
import os
import threading
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from collections.abc import Set as AbstractSet
from contextlib import contextmanager
from itertools import repeat
from operator import attrgetter
from typing import Any, Final

from agent.observe.model import Connection, Direction, ProcessInfo
from agent.observe.overlap import run_beside
from agent.observe.owners import PROC, RESCAN_INTERVAL, FdScan, SocketOwners
from agent.observe.processes import ProcessCache
from agent.observe.sockdiag import SockDiagReader, SocketSource
from agent.observe.sockets import LISTEN, UNCONN, SocketRecord, SocketTableReader

# protocol ("tcp" | "udp"), local_ip, local_port, peer_ip, peer_port: as conntrack reports
# a flow, seen from this host.
FlowKey = tuple[str, str, int, str, int]
# (protocol, port) -> the local addresses a socket listens on (TCP) / is bound on (UDP).
Listeners = dict[tuple[str, int], frozenset[str]]

_INODE: Final = attrgetter("inode")
_CONNECTION_SLOTS: Final[dict[str, Any]] = {
    field.name: getattr(Connection, field.name) for field in dataclasses.fields(Connection)
}
# A __post_init__ (a check, a derived field) would be skipped by setting the slots.
_CONNECTION_INIT_DOES_MORE: Final = hasattr(Connection, "__post_init__")
_HELPER_THREAD: Final = "bh-snapshot-scan"
WILDCARD_V4: Final = "0.0.0.0"
WILDCARD_V6: Final = "::"  # also takes IPv4, which the tables show as IPv4-mapped


_SERVING: Final = frozenset((LISTEN, UNCONN))


def _serves(record: SocketRecord) -> bool:
    return record.state in _SERVING


def listening_ports(records: Iterable[SocketRecord]) -> Listeners:
    """Where local sockets wait for peers: (protocol, port) -> local addresses."""
    ports: dict[tuple[str, int], set[str]] = {}
    # Filtered first, in one comprehension: most sockets of a busy host serve nothing.
    for record in [record for record in records if record.state in _SERVING]:
        ports.setdefault((record.protocol, record.local_port), set()).add(record.local_ip)
    return {port: frozenset(addresses) for port, addresses in ports.items()}


def _matches(local_ip: str, addresses: frozenset[str]) -> bool:
    if local_ip in addresses or WILDCARD_V6 in addresses:
        return True
    return WILDCARD_V4 in addresses and ":" not in local_ip


def direction(record: SocketRecord, listeners: Listeners) -> Direction:
    if not record.peer_ip:
        return Direction.LISTEN
    addresses = listeners.get((record.protocol, record.local_port))
    if addresses is not None and _matches(record.local_ip, addresses):
        return Direction.INBOUND
    return Direction.OUTBOUND


def directions(
    protocols: Sequence[str],
    local_ips: Sequence[str],
    local_ports: Sequence[int],
    peer_ips: Sequence[str],
    listeners: Listeners,
) -> list[Direction]:
    """direction() of each row of these columns: one comprehension, _matches() inlined,
    no call per socket (a cold snapshot decides 10,000 at once)."""
    listen, inbound, outbound = Direction.LISTEN, Direction.INBOUND, Direction.OUTBOUND
    get = listeners.get
    return [
        listen
        if not peer_ip
        else inbound
        if (addresses := get((protocol, port))) is not None
        and (
            local_ip in addresses
            or WILDCARD_V6 in addresses
            or (WILDCARD_V4 in addresses and ":" not in local_ip)
        )
        else outbound
        for protocol, local_ip, port, peer_ip in zip(
            protocols, local_ips, local_ports, peer_ips, strict=True
        )
    ]


def socket_source(proc: str = PROC) -> SocketSource:
    """Where to read the sockets of this network namespace: the kernel's sock_diag for
    the real /proc (the faster), the net/ files of any other directory laid out like it."""
    if proc == PROC:
        return SockDiagReader(f"{proc}/net")
    return SocketTableReader(f"{proc}/net")


class SocketSnapshotter:
    """Snapshots of this network namespace's TCP and UDP sockets, made incrementally.

    Safe to share between threads (a snapshot in a worker thread, lookups on the event
    loop): one call runs at a time."""

    def __init__(
        self,
        proc: str = PROC,
        *,
        rescan_interval: float = RESCAN_INTERVAL,
        processes: ProcessCache | None = None,
        sockets: SocketSource | None = None,
        overlap: bool | None = None,
    ) -> None:
        self._tables = socket_source(proc) if sockets is None else sockets
        self._owners = SocketOwners(proc, rescan_interval=rescan_interval)
        self._processes = ProcessCache(proc) if processes is None else processes
        # For a full fd scan, the tables are read on a helper thread meanwhile; by default
        # only where this process may run on two cores (on one it only adds GIL hand-overs).
        self._overlap = len(os.sched_getaffinity(0)) > 1 if overlap is None else overlap
        self._lock = threading.Lock()
        # The last read of the tables.
        self._records: list[SocketRecord] = []
        self._inodes: frozenset[int] = frozenset()
        self._live: frozenset[int] = frozenset()
        # Since the last snapshot (lookups read the tables too): the fresh records, in
        # the order read, and the sockets whose owner changed.
        self._pending: list[SocketRecord] = []
        self._owner_changes: set[int] = set()
        # The last snapshot, by socket inode.
        self._built_inodes: frozenset[int] | None = None
        self._built_records: dict[int, SocketRecord] = {}
        self._connections: dict[int, Connection] = {}
        self._listeners: Listeners = {}

    def snapshot(self) -> list[Connection]:
        """Every TCP and UDP socket of this network namespace that a file holds."""
        with self._lock:
            if self._connections:
                return self._snapshot()
            with collector_paused():  # a cold one: every socket's objects made anew
                return self._snapshot()

    def _snapshot(self) -> list[Connection]:
        self._read()
        table = self._inodes
        pending, self._pending = self._pending, []
        changes, self._owner_changes = self._owner_changes, set()
        if table is self._built_inodes and not pending and not changes:
            return list(self._connections.values())
        records, connections = self._built_records, self._connections
        # A socket's latest record is the last one read for it; every socket not among
        # them still has the very record it was built from.
        latest = {record.inode: record for record in pending if record.inode in table}
        if not records:  # the first snapshot, or one after a reset: build every one
            records.update(latest)
            self._build(set(records), listening_ports(records.values()))
            self._built_inodes = table
            return list(connections.values())
        gone = records.keys() - table
        servers_moved = any(_serves(records[inode]) for inode in gone)
        rebuild = {inode for inode in changes if inode in table}
        for inode in gone:
            del records[inode], connections[inode]
        for inode, record in latest.items():
            before = records.get(inode)
            if before is not record:
                # A UDP socket that connect()s stops serving its port, for one.
                if _serves(record) or (before is not None and _serves(before)):
                    servers_moved = True
                records[inode] = record
                rebuild.add(inode)
        listeners = listening_ports(records.values()) if servers_moved else self._listeners
        if listeners != self._listeners:  # sockets on these ports may change direction
            moved = _moved_ports(self._listeners, listeners)
            rebuild.update(
                inode
                for inode, record in records.items()
                if (record.protocol, record.local_port) in moved
            )
        self._build(rebuild, listeners)
        self._built_inodes = table
        return list(connections.values())

    def _build(self, inodes: AbstractSet[int], listeners: Listeners) -> None:
        """Make the connections of these sockets anew: column by column, since a cold
        snapshot makes one per socket."""
        self._listeners = listeners
        if not inodes:
            return
        built = list(map(self._built_records.__getitem__, inodes))
        pids = self._owners.pids(map(_INODE, built))
        processes: dict[int | None, ProcessInfo | None] = {None: None}
        for pid in set(pids):
            if pid is not None:
                processes[pid] = self._processes.get(pid)
        protocols, local_ips, local_ports, peer_ips, peer_ports, states, uids, inode_column = zip(
            *built, strict=True
        )
        connections = make_connections(
            protocol=protocols,
            state=states,
            local_ip=local_ips,
            local_port=local_ports,
            peer_ip=peer_ips,
            peer_port=peer_ports,
            direction=directions(protocols, local_ips, local_ports, peer_ips, listeners),
            inode=inode_column,
            uid=uids,
            process=list(map(processes.__getitem__, pids)),
        )
        self._connections.update(zip(inode_column, connections, strict=True))

    def attribute(self, flows: Iterable[FlowKey]) -> dict[FlowKey, ProcessInfo | None]:
        """The process behind each flow, reading the tables once for all of them.

        A flow's own socket decides; when it has none (any more), the socket serving its
        local port does: the listener of an inbound TCP connection, the unconnected UDP
        socket that answered. None when neither exists or no process holds it."""
        wanted = set(flows)
        if not wanted:
            return {}
        with self._lock:
            return self._attribute(wanted)

    def _attribute(self, wanted: set[FlowKey]) -> dict[FlowKey, ProcessInfo | None]:
        records = self._read()
        exact = {key: record for record in records if (key := record[:5]) in wanted}
        servers: dict[tuple[str, str, int], SocketRecord] | None = None
        processes: dict[int, ProcessInfo | None] = {}
        result: dict[FlowKey, ProcessInfo | None] = {}
        for flow in wanted:
            record = exact.get(flow)
            if record is None:
                if servers is None:
                    servers = {
                        (r.protocol, r.local_ip, r.local_port): r for r in records if _serves(r)
                    }
                record = _server_of(flow, servers)
            result[flow] = None if record is None else self._process(record.inode, processes)
        return result

    def lookup(
        self, protocol: str, local_ip: str, local_port: int, peer_ip: str, peer_port: int
    ) -> ProcessInfo | None:
        """The process behind one flow (see attribute(), which reads the tables once for many)."""
        flow = (protocol, local_ip, local_port, peer_ip, peer_port)
        return self.attribute([flow])[flow]

    def _read(self) -> list[SocketRecord]:
        """The tables now, with the owners of their sockets brought up to date."""
        scan = None
        if self._overlap and self._owners.full_scan_due():
            scan = self._owners.start_full_scan()
            records = self._read_beside(scan)
        else:
            records = self._tables.read()
        fresh = self._tables.fresh
        # No line that was not in the previous read, and as many lines: the same sockets.
        if fresh or len(records) != len(self._records):
            self._inodes = frozenset(map(_INODE, records))
            self._pending += fresh
            if len(self._pending) > 2 * len(records) + 1024:
                # Only lookups for a long while: cheaper to build the next snapshot anew.
                self._pending = list(records)
                self._built_inodes = None
                self._built_records.clear()
                self._connections.clear()
        self._records = records
        self._owner_changes |= self._owners.refresh(self._inodes, scan=scan)
        live = self._owners.live_pids
        if live != self._live:
            self._live = live
            self._processes.retain(live)
        return records

    def _read_beside(self, scan: FdScan) -> list[SocketRecord]:
        """The tables, read on a helper thread while this one reads every fd for the full
        scan. The dump is mostly waiting in recv(), which releases the GIL, so it hides
        behind the scan. Sharing the fd scan itself between both threads was slower than
        reading it on one: its system calls are 3 µs each, and every one of them handed the
        GIL to the other thread (docs/benchmarks.md)."""
        records, _ = run_beside(self._tables.read, scan.run, name=_HELPER_THREAD)
        return records

    def _process(self, inode: int, processes: dict[int, ProcessInfo | None]) -> ProcessInfo | None:
        pid = self._owners.owner(inode)
        if pid is None:
            return None
        if pid not in processes:
            processes[pid] = self._processes.get(pid)
        return processes[pid]


@contextmanager
def collector_paused() -> Iterator[None]:
    """The cyclic garbage collector off for a while (unless it was off already).

    A cold snapshot makes some 50,000 objects, records and connections that all live on:
    the young-generation collections they set off find no garbage, and cost about 5% of
    the snapshot."""
    if not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def make_connections(**columns: Sequence[Any]) -> list[Connection]:
    """Connection(**fields) for each row of these columns (one per field, by name).

    Connection is a frozen dataclass, whose __init__ sets each field through
    object.__setattr__: 1.3 µs a connection, the largest part of building the 10,000 of a
    cold snapshot. Here the same slot descriptors set whole columns, in C: 0.5 µs."""
    if columns.keys() != _CONNECTION_SLOTS.keys():
        raise ValueError(f"columns {sorted(columns)}, not the fields of Connection")
    rows = len(columns["inode"])
    if _CONNECTION_INIT_DOES_MORE:
        return list(map(Connection, *(columns[name] for name in _CONNECTION_SLOTS)))
    connections: list[Connection] = list(map(object.__new__, repeat(Connection, rows)))
    for name, slot in _CONNECTION_SLOTS.items():
        column = columns[name]
        if len(column) != rows:
            raise ValueError(f"column {name}: {len(column)} values for {rows} connections")
        deque(map(slot.__set__, connections, column), maxlen=0)
    return connections


def _moved_ports(before: Listeners, after: Listeners) -> set[tuple[str, int]]:
    """The (protocol, port) whose listening addresses differ."""
    moved = set(before.keys() ^ after.keys())
    moved.update(port for port in before.keys() & after.keys() if before[port] != after[port])
    return moved


def _server_of(
    flow: FlowKey, servers: dict[tuple[str, str, int], SocketRecord]
) -> SocketRecord | None:
    protocol, local_ip, local_port = flow[:3]
    wildcards: Sequence[str] = (WILDCARD_V6,) if ":" in local_ip else (WILDCARD_V4, WILDCARD_V6)
    for address in (local_ip, *wildcards):
        record = servers.get((protocol, address, local_port))
        if record is not None:
            return record
    return None
