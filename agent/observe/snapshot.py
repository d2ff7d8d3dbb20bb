"""The sockets of this network namespace, each with its process and direction.

`SocketSnapshotter.snapshot()` combines the socket tables (sockets.py), the socket ->
process map (owners.py) and the process descriptions (processes.py). It is made to be
called periodically: what did not change since the previous call is not read, parsed or
built again, so with nothing changed a snapshot costs little more than the kernel's
printing of the tables.

Direction: a TCP LISTEN or unconnected UDP socket is LISTEN (so is a TCP socket that is
only bound); a connected socket whose local port is one some local socket listens on
(TCP) or is bound unconnected on (UDP), at the same or the wildcard address, is INBOUND;
any other connected socket is OUTBOUND.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Final

from agent.observe.model import Connection, Direction, ProcessInfo
from agent.observe.owners import PROC, RESCAN_INTERVAL, SocketOwners
from agent.observe.processes import ProcessCache
from agent.observe.sockets import LISTEN, UNCONN, SocketRecord, SocketTableReader

# protocol ("tcp" | "udp"), local_ip, local_port, peer_ip, peer_port: as conntrack reports
# a flow, seen from this host.
FlowKey = tuple[str, str, int, str, int]
# (protocol, port) -> the local addresses a socket listens on (TCP) / is bound on (UDP).
Listeners = dict[tuple[str, int], frozenset[str]]

WILDCARD_V4: Final = "0.0.0.0"
WILDCARD_V6: Final = "::"  # also takes IPv4, which the tables show as IPv4-mapped


def _serves(record: SocketRecord) -> bool:
    return record.state in (LISTEN, UNCONN)


def listening_ports(records: Iterable[SocketRecord]) -> Listeners:
    """Where local sockets wait for peers: (protocol, port) -> local addresses."""
    ports: dict[tuple[str, int], set[str]] = {}
    for record in records:
        if _serves(record):
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


class SocketSnapshotter:
    """Snapshots of this network namespace's TCP and UDP sockets, made incrementally."""

    def __init__(
        self,
        proc: str = PROC,
        *,
        rescan_interval: float = RESCAN_INTERVAL,
        processes: ProcessCache | None = None,
    ) -> None:
        self._tables = SocketTableReader(f"{proc}/net")
        self._owners = SocketOwners(proc, rescan_interval=rescan_interval)
        self._processes = processes or ProcessCache(proc)
        self._read_records: list[SocketRecord] = []
        self._inodes: frozenset[int] = frozenset()
        self._live: frozenset[int] = frozenset()
        # Sockets whose owner changed since the last snapshot (a lookup refreshes too).
        self._owner_changes: set[int] = set()
        # What the last snapshot was made of, and made.
        self._built_from: list[SocketRecord] | None = None
        self._listeners: Listeners = {}
        self._built: dict[int, tuple[SocketRecord, Connection]] = {}
        self._connections: list[Connection] = []

    def snapshot(self) -> list[Connection]:
        """Every TCP and UDP socket of this network namespace that a file holds."""
        records = self._read()
        same = records is self._built_from
        listeners = self._listeners if same else listening_ports(records)
        changes, self._owner_changes = self._owner_changes, set()
        if same and not changes:
            return list(self._connections)
        everything = listeners != self._listeners  # every direction may have moved
        built, now, connections = self._built, {}, []
        processes: dict[int, ProcessInfo | None] = {}
        for record in records:
            inode = record.inode
            entry = built.get(inode)
            if entry is None or entry[0] is not record or everything or inode in changes:
                connection = self._connection(record, listeners, processes)
            else:
                connection = entry[1]
            now[inode] = (record, connection)
            connections.append(connection)
        self._built_from, self._listeners = records, listeners
        self._built, self._connections = now, connections
        return list(connections)

    def attribute(self, flows: Iterable[FlowKey]) -> dict[FlowKey, ProcessInfo | None]:
        """The process behind each flow, reading the tables once for all of them.

        A flow's own socket decides; when it has none (any more), the socket serving its
        local port does: the listener of an inbound TCP connection, the unconnected UDP
        socket that answered. None when neither exists or no process holds it."""
        wanted = set(flows)
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
        """The tables now, the owners of their sockets brought up to date. The list of the
        previous read is given back when nothing changed, so `is` tells."""
        records = self._tables.read()
        if records == self._read_records:  # compares by identity first: records are re-used
            records = self._read_records
        else:
            self._read_records = records
            self._inodes = frozenset(record.inode for record in records)
        self._owner_changes |= self._owners.refresh(self._inodes)
        live = self._owners.live_pids
        if live != self._live:
            self._live = live
            self._processes.retain(live)
        return records

    def _process(self, inode: int, processes: dict[int, ProcessInfo | None]) -> ProcessInfo | None:
        pid = self._owners.owner(inode)
        if pid is None:
            return None
        if pid not in processes:
            processes[pid] = self._processes.get(pid)
        return processes[pid]

    def _connection(
        self,
        record: SocketRecord,
        listeners: Listeners,
        processes: dict[int, ProcessInfo | None],
    ) -> Connection:
        return Connection(
            protocol=record.protocol,
            state=record.state,
            local_ip=record.local_ip,
            local_port=record.local_port,
            peer_ip=record.peer_ip,
            peer_port=record.peer_port,
            direction=direction(record, listeners),
            inode=record.inode,
            uid=record.uid,
            process=self._process(record.inode, processes),
        )


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
