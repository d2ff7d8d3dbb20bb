"""The TCP and UDP sockets of this network namespace, from the kernel's sock_diag netlink.

The same records as sockets.py's /proc/net reader, in half the time: one inet_diag dump
per table (inetdiag.py), whose binary messages cost the kernel less to write than the
text of /proc/net, and us less to decode. As that reader does, it is meant to be called
again and again: a socket whose key (state, ports, addresses, uid, inode) was in the
previous read gives back the very same record without decoding.

When the netlink socket cannot be opened (a kernel without sock_diag, a sandbox that
forbids it) or a dump fails (a kernel without udp_diag), the reader falls back to
/proc/net for good, and says so in the log.
"""

from __future__ import annotations

import logging
import socket
import time
from dataclasses import dataclass, field
from itertools import repeat
from operator import attrgetter
from typing import Final, Protocol, cast

from agent.netlink import NetlinkError
from agent.observe.inetdiag import Key, RecordBuilder, decode_datagram, dump_request
from agent.observe.sockets import PROC_NET, TABLES, SocketRecord, SocketTable, SocketTableReader

log = logging.getLogger(__name__)

NETLINK_SOCK_DIAG: Final = 4
DUMP_TIMEOUT: Final = 5.0  # seconds a dump may take
RECV_SIZE: Final = 1 << 16  # above the kernel's largest dump datagram (32 KiB)
SOURCE_SOCK_DIAG: Final = "sock_diag"
SOURCE_PROC_NET: Final = "/proc/net"
_INODE: Final = attrgetter("inode")


class SocketSource(Protocol):
    """A reader of this namespace's socket tables: SocketTableReader, SockDiagReader."""

    fresh: list[SocketRecord]

    def read(self) -> list[SocketRecord]: ...


class DiagSocket(Protocol):
    """What the reader needs of its netlink socket; a fake in tests."""

    def send(self, data: bytes, /) -> int: ...

    def recv(self, bufsize: int, /) -> bytes: ...

    def close(self) -> None: ...


def open_sock_diag(timeout: float = DUMP_TIMEOUT) -> socket.socket:
    """A NETLINK_SOCK_DIAG socket of the current network namespace; `timeout` per recv."""
    sock = socket.socket(
        socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_SOCK_DIAG
    )
    try:
        sock.bind((0, 0))
        sock.settimeout(timeout)
    except BaseException:
        sock.close()
        raise
    return sock


class _Unseen:
    """What the previous read's map gives for a key it does not hold."""


_UNSEEN: Final = _Unseen()


@dataclass
class _Dump:
    """What the previous read of one table made."""

    table: SocketTable
    by_key: dict[Key, SocketRecord | None] = field(default_factory=dict)
    records: list[SocketRecord] = field(default_factory=list)


class SockDiagReader:
    """Reads all four tables through sock_diag; the interface of SocketTableReader.

    After each read, `fresh` holds the records that were not in the previous read (new
    sockets, and changed ones: state, peer); every other record of the read is the very
    object the previous read gave. `proc_net` is where to fall back to."""

    def __init__(
        self,
        proc_net: str = PROC_NET,
        *,
        connection: DiagSocket | None = None,
        timeout: float = DUMP_TIMEOUT,
    ) -> None:
        self.fresh: list[SocketRecord] = []
        self.malformed = 0  # messages skipped because they could not be decoded
        self._proc_net = proc_net
        self._timeout = timeout
        self._dumps = [_Dump(table) for table in TABLES]
        self._sequence = 0
        self._builder = RecordBuilder()
        self._fallback: SocketTableReader | None = None
        self._connection = connection
        if connection is None:
            try:
                self._connection = open_sock_diag(timeout)
            except OSError as exc:
                self._fall_back(f"cannot open a NETLINK_SOCK_DIAG socket: {exc}")

    @property
    def source(self) -> str:
        """Where the records come from: SOURCE_SOCK_DIAG, or SOURCE_PROC_NET after a
        fall-back."""
        return SOURCE_SOCK_DIAG if self._fallback is None else SOURCE_PROC_NET

    def close(self) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None

    def read(self) -> list[SocketRecord]:
        """Every socket of the current network namespace that a file holds (inode != 0),
        table by table: tcp, tcp6, udp, udp6."""
        if self._fallback is None:
            try:
                return self._read_dumps()
            except (OSError, NetlinkError) as exc:
                self._fall_back(f"a sock_diag dump failed: {exc}")
        assert self._fallback is not None
        records = self._fallback.read()
        self.fresh = self._fallback.fresh
        return records

    def _fall_back(self, reason: str) -> None:
        log.warning("%s; reading the socket tables from %s instead", reason, self._proc_net)
        self.close()
        self._fallback = SocketTableReader(self._proc_net)

    def _read_dumps(self) -> list[SocketRecord]:
        # Every dump first: a failing one leaves the previous read's records as they were.
        keys = [self._receive(dump.table) for dump in self._dumps]
        records: list[SocketRecord] = []
        fresh: list[SocketRecord] = []
        for dump, dump_keys in zip(self._dumps, keys, strict=True):
            dump.records = self._records(dump, dump_keys, fresh)
            records += dump.records
        self.fresh = fresh
        return records

    def _receive(self, table: SocketTable) -> list[Key]:
        """The key of every socket message of one table's dump."""
        connection = self._connection
        assert connection is not None
        self._sequence = self._sequence % 0xFFFF_FFFF + 1
        sequence = self._sequence
        connection.send(dump_request(table, sequence))
        deadline = time.monotonic() + self._timeout
        keys: list[Key] = []
        while True:
            result = decode_datagram(connection.recv(RECV_SIZE), sequence, keys)
            self.malformed += result.malformed
            if result.error:
                raise NetlinkError(f"sock_diag dump of {table.name}", result.error)
            if result.done:
                return keys
            if time.monotonic() > deadline:
                raise NetlinkError(f"sock_diag dump of {table.name}: no end", 0)

    def _records(
        self, dump: _Dump, keys: list[Key], fresh: list[SocketRecord]
    ) -> list[SocketRecord]:
        if not dump.by_key:  # a first read: every record is new (no index lists needed)
            made = self._builder.records(dump.table, keys)
            dump.by_key = dict(zip(keys, made, strict=True))
            records = list(filter(None, made))
            fresh += records
            return records
        # The hot path: with few sockets changed, a lookup per socket, in C.
        found: list[SocketRecord | _Unseen | None] = list(
            map(dump.by_key.get, keys, repeat(_UNSEEN))
        )
        if _UNSEEN in found:
            values = self._make_unseen(dump, keys, found, fresh)
            dump.by_key = dict(zip(keys, values, strict=True))
        else:
            values = cast(list[SocketRecord | None], found)
            if len(keys) != len(dump.by_key):  # some sockets went: forget them
                dump.by_key = dict(zip(keys, values, strict=True))
        return list(filter(None, values))

    def _make_unseen(
        self,
        dump: _Dump,
        keys: list[Key],
        found: list[SocketRecord | _Unseen | None],
        fresh: list[SocketRecord],
    ) -> list[SocketRecord | None]:
        """`found` with the record of each key the previous read did not have."""
        missing = [i for i, value in enumerate(found) if value is _UNSEEN]
        made = self._builder.records(dump.table, [keys[i] for i in missing])
        if dump.records:
            # Different bytes can print the same (a wildcard peer): fresh is about
            # records, so a record equal to one of the previous read is that one.
            previous = dict(zip(map(_INODE, dump.records), dump.records, strict=True))
            for position, record in enumerate(made):
                if record is not None:
                    before = previous.get(record.inode)
                    if before == record:
                        made[position] = before
                    else:
                        fresh.append(record)
        else:
            fresh += filter(None, made)
        if len(missing) == len(found):
            return made
        values = cast(list[SocketRecord | None], found)
        for index, record in zip(missing, made, strict=True):
            values[index] = record
        return values
