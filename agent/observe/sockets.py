"""The kernel's TCP and UDP socket tables of the current network namespace, from /proc/net.

Each of /proc/net/{tcp,tcp6,udp,udp6} is one header line, then one line per socket:

  sl  local_address rem_address   st tx_queue:rx_queue tr:tm->when retrnsmt   uid  timeout inode
   0: 0100007F:0CEA 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1234 …

Addresses are the raw 32-bit words of the address in hex, each printed in host byte order
(so 127.0.0.1 reads 0100007F on a little-endian machine); ports are hex in normal order.

The reader is meant to be called again and again: a line it saw in the previous read gives
back the very same record without parsing, and a line whose counters (queues, timers,
window) moved but whose socket did not gives back the record of that socket.
"""

from __future__ import annotations

import socket
import sys
from dataclasses import dataclass
from typing import Final, NamedTuple

PROC_NET: Final = "/proc/net"

TCP_STATES: Final = {
    b"01": "ESTABLISHED",
    b"02": "SYN_SENT",
    b"03": "SYN_RECV",
    b"04": "FIN_WAIT1",
    b"05": "FIN_WAIT2",
    b"06": "TIME_WAIT",
    b"07": "CLOSE",
    b"08": "CLOSE_WAIT",
    b"09": "LAST_ACK",
    b"0A": "LISTEN",
    b"0B": "CLOSING",
    b"0C": "NEW_SYN_RECV",
    b"0D": "BOUND_INACTIVE",
}
# A UDP socket is "established" once connect()ed; otherwise the kernel shows TCP_CLOSE.
UDP_STATES: Final = {b"01": "ESTABLISHED", b"07": "UNCONN"}

# Which state names mean "not connected to a peer" (the socket serves a local port).
LISTEN: Final = "LISTEN"
UNCONN: Final = "UNCONN"

_FIELDS_BEFORE_REST: Final = (
    10  # sl, local, remote, st, queues, timer, retrnsmt, uid, timeout, inode
)
_ADDRESS_CACHE_LIMIT: Final = 65_536  # distinct address texts kept; a busy server meets many peers
_V4_MAPPED_PREFIX: Final = b"\0" * 10 + b"\xff\xff"


class SocketRecord(NamedTuple):
    """One socket of a table. The first five fields are the flow key of a connection."""

    protocol: str  # "tcp" | "udp"
    local_ip: str
    local_port: int
    peer_ip: str  # "" when not connected
    peer_port: int  # 0 when not connected
    state: str  # TCP_STATES / UDP_STATES name
    uid: int
    inode: int


@dataclass(frozen=True, slots=True)
class SocketTable:
    """One /proc/net file and how to read its lines."""

    name: str
    protocol: str
    ipv6: bool
    # Width of the "sl" column with its ": ": TCP prints "%4d: ", UDP "%5d: ". The reader
    # drops it before using a line as a cache key, since TCP numbers rows as it walks
    # them and a socket's row number moves whenever an earlier socket comes or goes.
    row_prefix: int

    @property
    def states(self) -> dict[bytes, str]:
        return TCP_STATES if self.protocol == "tcp" else UDP_STATES


TABLES: Final = (
    SocketTable("tcp", "tcp", ipv6=False, row_prefix=6),
    SocketTable("tcp6", "tcp", ipv6=True, row_prefix=6),
    SocketTable("udp", "udp", ipv6=False, row_prefix=7),
    SocketTable("udp6", "udp", ipv6=True, row_prefix=7),
)

_LITTLE_ENDIAN: Final = sys.byteorder == "little"


def _host_words_to_bytes(raw: bytes) -> bytes:
    """Address bytes from the /proc/net hex, which prints each 32-bit word in host order."""
    if not _LITTLE_ENDIAN:
        return raw
    return b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))


def address_text(hex_address: bytes) -> str:
    """The usual text of a /proc/net hex address: IPv4 dotted, IPv6 compressed; an
    IPv4-mapped IPv6 address (::ffff:a.b.c.d) as its IPv4 text."""
    try:
        packed = _host_words_to_bytes(bytes.fromhex(hex_address.decode("ascii")))
    except (UnicodeDecodeError, ValueError) as exc:
        raise ValueError(f"address {hex_address!r} is not hexadecimal") from exc
    if len(packed) == 4:
        return socket.inet_ntop(socket.AF_INET, packed)
    if len(packed) != 16:
        raise ValueError(f"address {hex_address!r} is neither 8 nor 32 hex digits")
    if packed.startswith(_V4_MAPPED_PREFIX):
        return socket.inet_ntop(socket.AF_INET, packed[12:])
    return socket.inet_ntop(socket.AF_INET6, packed)


class _LineParser:
    """Turns table lines into records, remembering the text of every address it decoded."""

    def __init__(self) -> None:
        self._addresses: dict[bytes, str] = {}

    def fields(self, table: SocketTable, line: bytes) -> list[bytes]:
        fields = line.split(None, _FIELDS_BEFORE_REST)
        if len(fields) < _FIELDS_BEFORE_REST or not fields[0].endswith(b":"):
            raise ValueError(f"/proc/net/{table.name}: not a socket line: {line!r}")
        return fields

    def record(self, table: SocketTable, fields: list[bytes]) -> SocketRecord | None:
        """The record of a split line; None for a socket no file holds (inode 0)."""
        try:
            inode = int(fields[9])
            if inode == 0:  # TIME_WAIT, or closed and lingering: no process has it
                return None
            local_ip, local_port = self._endpoint(fields[1])
            peer_ip, peer_port = self._endpoint(fields[2])
            uid = int(fields[7])
        except ValueError as exc:
            raise ValueError(
                f"/proc/net/{table.name}: {exc} in line {b' '.join(fields)!r}"
            ) from exc
        state = table.states.get(fields[3])
        if state is None:
            state = f"UNKNOWN_{fields[3].decode('ascii', 'replace')}"
        if peer_port == 0 and peer_ip in ("0.0.0.0", "::"):
            peer_ip = ""
        return SocketRecord(
            table.protocol, local_ip, local_port, peer_ip, peer_port, state, uid, inode
        )

    def _endpoint(self, text: bytes) -> tuple[str, int]:
        hex_address, colon, hex_port = text.partition(b":")
        if not colon:
            raise ValueError(f"endpoint {text!r} is not ADDRESS:PORT")
        address = self._addresses.get(hex_address)
        if address is None:
            if len(self._addresses) >= _ADDRESS_CACHE_LIMIT:
                self._addresses.clear()
            address = self._addresses[hex_address] = address_text(hex_address)
        return address, int(hex_port, 16)


def parse_table(table: SocketTable, text: bytes) -> list[SocketRecord]:
    """The records of one table's contents (header line first), skipping inode 0."""
    parser = _LineParser()
    records = []
    for line in text.split(b"\n")[1:]:
        if line.strip():
            record = parser.record(table, parser.fields(table, line))
            if record is not None:
                records.append(record)
    return records


def read_table(path: str) -> bytes | None:
    """A table's bytes; None if it does not exist (IPv6 disabled, or no UDP support)."""
    try:
        with open(path, "rb", buffering=0) as file:
            return file.readall()
    except FileNotFoundError:
        return None


# The key of a socket whatever its counters: local, remote, state, inode (as printed).
_SocketKey = tuple[bytes, bytes, bytes, bytes]
# What a line was last seen to be: its record (None for inode 0) and its socket key.
_Seen = tuple[SocketRecord | None, _SocketKey]


class SocketTableReader:
    """Reads all four tables, re-using the records of sockets seen in the previous read."""

    def __init__(self, proc_net: str = PROC_NET) -> None:
        self._dir = proc_net
        self._parser = _LineParser()
        self._by_line: list[dict[bytes, _Seen]] = [{} for _ in TABLES]
        self._by_socket: list[dict[_SocketKey, SocketRecord | None]] = [{} for _ in TABLES]

    def read(self) -> list[SocketRecord]:
        """Every socket of the current network namespace that a file holds (inode != 0),
        in table order: tcp, tcp6, udp, udp6."""
        records: list[SocketRecord] = []
        for index, table in enumerate(TABLES):
            text = read_table(f"{self._dir}/{table.name}")
            if text is not None:
                self._read_lines(index, table, text, records)
        return records

    def _read_lines(
        self, index: int, table: SocketTable, text: bytes, records: list[SocketRecord]
    ) -> None:
        # The hot path of a steady-state snapshot: one slice and one dict lookup per line.
        seen = self._by_line[index]
        by_socket = self._by_socket[index]
        now: dict[bytes, _Seen] = {}
        cut = table.row_prefix
        lines = text.split(b"\n")
        for line in lines[1:]:
            key = line[cut:]
            entry = seen.get(key)
            if entry is None:
                if not line.strip():
                    continue
                entry = self._parse(table, line, by_socket)
            now[key] = entry
            if entry[0] is not None:
                records.append(entry[0])
        self._by_line[index] = now
        if len(by_socket) > 2 * len(now) + 1024:
            # Sockets that are gone still sit here; keep those of the lines just read.
            self._by_socket[index] = {socket_key: record for record, socket_key in now.values()}

    def _parse(
        self,
        table: SocketTable,
        line: bytes,
        by_socket: dict[_SocketKey, SocketRecord | None],
    ) -> _Seen:
        fields = self._parser.fields(table, line)
        socket_key = (fields[1], fields[2], fields[3], fields[9])
        if socket_key in by_socket:  # only the counters moved
            return by_socket[socket_key], socket_key
        record = by_socket[socket_key] = self._parser.record(table, fields)
        return record, socket_key
