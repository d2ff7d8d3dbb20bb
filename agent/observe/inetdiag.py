"""The inet_diag messages of the kernel's sock_diag netlink: the dump request for one
socket table, and the decoding of the dump's datagrams into socket records.

Layouts, from <linux/inet_diag.h>; all in host byte order but the sockid's ports and
addresses (network order):

  struct inet_diag_req_v2 { u8 family, protocol, ext, pad; u32 states; sockid id; }
  struct inet_diag_sockid { be16 sport, dport; be32 src[4], dst[4]; u32 if, cookie[2]; }
  struct inet_diag_msg    { u8 family, state, timer, retrans; sockid id;
                            u32 expires, rqueue, wqueue, uid, inode; }  then attributes

Each message follows its nlmsghdr. Of a message only the state, ports, addresses, uid
and inode make the record; the rest (timers, queues, cookie, attributes) moves while the
socket stays the same. Decoding a datagram gives those bytes as a key per socket, which
a reader keeps to find the record it made for the same key before (sockdiag.py).

Decoding works on runs: the kernel writes most sockets of a table with the same
attributes, so a run of equal-length messages is found in one strided pass over the
datagram's words and unpacked with one Struct.iter_unpack, in C. Records are built
column by column for the same reason: a cold read builds one per socket.
"""

from __future__ import annotations

import array
import operator
import socket
import struct
import sys
from dataclasses import dataclass
from itertools import compress, count, repeat
from typing import Final

from agent.netlink import (
    NLM_F_DUMP,
    NLM_F_REQUEST,
    NLMSG_DONE,
    NLMSG_ERROR,
    NLMSG_HEADER,
    NLMSG_NOOP,
)
from agent.observe.sockets import (
    TCP_STATES,
    UDP_STATES,
    SocketRecord,
    SocketTable,
    packed_address_text,
)

SOCK_DIAG_BY_FAMILY: Final = 20
TCP_TIME_WAIT: Final = 6
TCP_NEW_SYN_RECV: Final = 12
# Every state but TIME_WAIT (a timewait socket has no inode, so the /proc reader skips
# it: the kernel can leave them out), NEW_SYN_RECV (likewise; the kernel adds it back
# for SYN_RECV anyway) and BOUND_INACTIVE (13: bound-only sockets, which /proc/net does
# not list). A UDP socket is in 1 (connected) or 7 (unconnected).
STATES_MASK: Final = sum(
    1 << state for state in range(1, TCP_NEW_SYN_RECV) if state != TCP_TIME_WAIT
)
FAMILIES: Final = {False: socket.AF_INET, True: socket.AF_INET6}
PROTOCOLS: Final = {"tcp": socket.IPPROTO_TCP, "udp": socket.IPPROTO_UDP}

# nlmsghdr, then inet_diag_req_v2 with an all-zero sockid: every socket.
_REQUEST: Final = struct.Struct("=IHHII BBBxI 48x")
MESSAGE_SIZE: Final = NLMSG_HEADER.size + 72  # nlmsghdr + inet_diag_msg
# From the start of a message (nlmsghdr included): state; sockid ports and addresses;
# uid and inode, as 8 bytes.
_KEY_FORMAT: Final = "=17xB2x36s24x8s"
Key = tuple[int, bytes, bytes]
_ERROR_CODE: Final = struct.Struct("=i")
_RUN_STRUCTS_LIMIT: Final = 256
_PORT_WORDS: Final = 18  # 16-bit words in a key's sockid part: the ports repeat so often
_ADDRESSES: Final = {False: (slice(4, 8), slice(20, 24)), True: (slice(4, 20), slice(20, 36))}
_WILDCARDS: Final = ("0.0.0.0", "::")
_ADDRESS_CACHE_LIMIT: Final = 65_536  # distinct addresses kept; a busy server meets many peers
_LITTLE_ENDIAN: Final = sys.byteorder == "little"
_new_record: Final = tuple.__new__  # as in sockets.py: three times a NamedTuple's __new__


def _state_names(names: dict[bytes, str]) -> tuple[str, ...]:
    """State name by the kernel's number, named as sockets.py names the hex it reads."""
    return tuple(names.get(b"%02X" % code, f"UNKNOWN_{code:02X}") for code in range(256))


_STATE_NAMES: Final = {"tcp": _state_names(TCP_STATES), "udp": _state_names(UDP_STATES)}


def dump_request(table: SocketTable, sequence: int) -> bytes:
    """The netlink request for a dump of every socket of one table."""
    return _REQUEST.pack(
        _REQUEST.size,
        SOCK_DIAG_BY_FAMILY,
        NLM_F_REQUEST | NLM_F_DUMP,
        sequence,
        0,
        FAMILIES[table.ipv6],
        PROTOCOLS[table.protocol],
        0,
        STATES_MASK,
    )


@dataclass
class DatagramResult:
    """What one datagram of a dump held besides its sockets."""

    done: bool = False  # the dump's last datagram
    error: int = 0  # errno the kernel ended the dump with
    malformed: int = 0  # messages skipped: too short, or framing broken (rest dropped)


_run_structs: dict[int, struct.Struct] = {}


def _run_struct(size: int) -> struct.Struct:
    """The key Struct of one message `size` bytes long, padding included."""
    unpacker = _run_structs.get(size)
    if unpacker is None:
        if len(_run_structs) >= _RUN_STRUCTS_LIMIT:  # only garbage makes so many sizes
            _run_structs.clear()
        unpacker = _run_structs[size] = struct.Struct(f"{_KEY_FORMAT}{size - MESSAGE_SIZE}x")
    return unpacker


def decode_datagram(data: bytes, sequence: int, keys: list[Key]) -> DatagramResult:
    """Append to `keys` the key of each socket message of one dump datagram.

    A datagram of another dump (`sequence` differs: left over from one abandoned) is
    ignored. Never raises: what cannot be decoded is counted in `malformed`."""
    result = DatagramResult()
    size = len(data)
    if size < NLMSG_HEADER.size:
        result.malformed = 1
        return result
    if NLMSG_HEADER.unpack_from(data)[3] != sequence:
        return result
    if size % 4:  # the word view needs whole words; bounds below use the true size
        data += bytes(-size % 4)
    view = memoryview(data)
    words = view.cast("I")
    index, end = 0, len(words)
    while index < end:
        offset = index * 4
        length = words[index]
        if length < NLMSG_HEADER.size or offset + length > size:
            result.malformed += 1  # the framing is broken: nothing after it can be trusted
            return result
        step = (length + 3) // 4
        kind_flags = words[index + 1]
        kind = kind_flags & 0xFFFF
        if kind != SOCK_DIAG_BY_FAMILY:
            _control(data, offset, length, kind, result)
            index += step
            continue
        if length < MESSAGE_SIZE:
            result.malformed += 1
            index += step
            continue
        # How many messages from here have this length and type: each stride lands on
        # the next header for as long as they do.
        lengths = words[index::step]
        run = next(compress(count(), map(length.__ne__, lengths)), len(lengths))
        kinds = words[index + 1 : index + run * step : step]
        run = next(compress(count(), map(kind_flags.__ne__, kinds)), run)
        if offset + (run - 1) * step * 4 + length > size:
            run -= 1  # the last one is cut short: the next round counts it
        if not run:
            result.malformed += 1
            return result
        keys += _run_struct(step * 4).iter_unpack(view[offset : offset + run * step * 4])
        index += run * step
    return result


def _control(data: bytes, offset: int, length: int, kind: int, result: DatagramResult) -> None:
    """A message other than a socket's: the end of the dump, an error, or something else."""
    if kind in (NLMSG_DONE, NLMSG_ERROR):
        code = 0
        if length >= NLMSG_HEADER.size + _ERROR_CODE.size:
            code = _ERROR_CODE.unpack_from(data, offset + NLMSG_HEADER.size)[0]
        if kind == NLMSG_DONE or code:  # an error with code 0 is an acknowledgement
            result.done = True
            result.error = -code if code < 0 else 0
    elif kind != NLMSG_NOOP:
        result.malformed += 1


class RecordBuilder:
    """Turns keys into records, remembering the text of every address it decoded."""

    def __init__(self) -> None:
        self._addresses: dict[bytes, str] = {}

    def records(self, table: SocketTable, keys: list[Key]) -> list[SocketRecord | None]:
        """The record of each key; None for a socket no file holds (inode 0: a request
        socket, one not accepted yet).

        Column by column, and without a tuple per socket but the record: a cold read
        builds one per socket, and each tuple would weigh on the garbage collector."""
        if not keys:
            return []
        states, idents, owners = zip(*keys, strict=True)
        owner_words = memoryview(b"".join(owners)).cast("I").tolist()
        uids, inodes = owner_words[0::2], owner_words[1::2]
        ports = array.array("H", b"".join(idents))
        if _LITTLE_ENDIAN:  # the ports are in network order
            ports.byteswap()
        local_ports, peer_ports = ports[0::_PORT_WORDS].tolist(), ports[1::_PORT_WORDS].tolist()
        local, peer = _ADDRESSES[table.ipv6]
        local_ips = self._texts(list(map(operator.getitem, idents, repeat(local))))
        peer_ips = self._texts(list(map(operator.getitem, idents, repeat(peer))))
        for index in compress(count(), map(operator.not_, peer_ports)):
            if peer_ips[index] in _WILDCARDS:  # not connected
                peer_ips[index] = ""
        rows = zip(
            repeat(table.protocol),
            local_ips,
            local_ports,
            peer_ips,
            peer_ports,
            map(_STATE_NAMES[table.protocol].__getitem__, states),
            uids,
            inodes,
        )
        records: list[SocketRecord | None] = [_new_record(SocketRecord, row) for row in rows]
        if 0 in inodes:
            for index in compress(count(), map(operator.not_, inodes)):
                records[index] = None
        return records

    def _texts(self, addresses: list[bytes]) -> list[str]:
        """The text of each packed address, from the cache where it can."""
        known = self._addresses
        # Each new address once: most sockets share their host's few local addresses.
        new = set(addresses).difference(known)
        if new:
            if len(known) + len(new) > _ADDRESS_CACHE_LIMIT:
                known.clear()
                new = set(addresses)
            for packed in new:
                known[packed] = packed_address_text(packed)
        return list(map(known.__getitem__, addresses))
