"""The agent's own netlink plumbing, shared by its kernel event listeners and dumps.

pyroute2 would do all of this, but importing any of it imports the whole package (about
9 MB of a long-running agent's memory), for a few message types. Here: a non-blocking
netlink socket, building messages and (nested) attributes, a request waiting for its
acknowledgement, a dump read to its end, draining event datagrams, and splitting
datagrams into messages and attributes. Layouts are those of <linux/netlink.h> and
<linux/netfilter/nfnetlink.h>: netlink headers are in host byte order, the nfgenmsg
res_id field and most netfilter attribute values in network byte order.

Modules of the package decode and encode one family's messages: ``ctnetlink``
(conntrack entries), ``rtnetlink`` (interface addresses).
"""

from __future__ import annotations

import errno
import os
import select
import socket
import struct
import time
from collections.abc import Iterator
from types import TracebackType
from typing import Generic, Protocol, Self, TypeVar

_Event = TypeVar("_Event")

NETLINK_ROUTE = 0
NETLINK_NETFILTER = 12
SOL_NETLINK = 270
SO_RCVBUFFORCE = 33  # needs CAP_NET_ADMIN; SO_RCVBUF is capped by net.core.rmem_max

NLMSG_HEADER = struct.Struct("=IHHII")  # length, type, flags, sequence, port id
NFGEN_HEADER = struct.Struct("!BBH")  # family, version, res_id (big endian)
NLA_HEADER = struct.Struct("=HH")  # length, type
NLMSG_ERROR_CODE = struct.Struct("=i")

NLMSG_NOOP = 1
NLMSG_ERROR = 2
NLMSG_DONE = 3
NLM_F_REQUEST = 0x1
NLM_F_ACK = 0x4
NLM_F_DUMP = 0x300  # NLM_F_ROOT | NLM_F_MATCH
NLA_F_NESTED = 0x8000
NLA_TYPE_MASK = 0x3FFF  # without NLA_F_NESTED / NLA_F_NET_BYTEORDER
NFNETLINK_V0 = 0

# The payload of one message: starts after the nlmsghdr, ends at its nlmsg_len.
HEADERS_SIZE = NLMSG_HEADER.size + NFGEN_HEADER.size
RECV_SIZE = 1 << 16
DEFAULT_RCVBUF = 4 << 20
ACK_TIMEOUT = 5.0
DUMP_TIMEOUT = 10.0  # a dump is answered as fast as we read it: this only bounds a hang


class NetlinkError(Exception):
    """The kernel refused a netlink request, or did not answer it."""

    def __init__(self, what: str, code: int) -> None:
        reason = os.strerror(code) if code else "no answer"
        super().__init__(f"{what}: {reason}")
        self.code = code


class Receiver(Protocol):
    """What drain() reads from: a socket, or a fake in tests."""

    def recv(self, bufsize: int, /) -> bytes: ...


class MalformedMessage(ValueError):
    """A datagram whose netlink framing is broken; the rest of it cannot be trusted."""


def open_socket(
    groups: int = 0, rcvbuf: int = DEFAULT_RCVBUF, protocol: int = NETLINK_NETFILTER
) -> socket.socket:
    """A non-blocking netlink socket of PROTOCOL joined to the multicast GROUPS bitmask.

    RCVBUF 0 keeps the kernel's default receive buffer (enough for requests and dumps)."""
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, protocol)
    try:
        if rcvbuf:
            _grow_receive_buffer(sock, rcvbuf)
        sock.bind((0, groups))
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def _grow_receive_buffer(sock: socket.socket, size: int) -> None:
    # A flood overruns the default ~200 KiB at once; a bigger buffer rides out bursts.
    # Best effort: without CAP_NET_ADMIN the kernel caps SO_RCVBUF at rmem_max.
    for option in (SO_RCVBUFFORCE, socket.SO_RCVBUF):
        try:
            sock.setsockopt(socket.SOL_SOCKET, option, size)
        except OSError:
            continue
        return


def attribute(kind: int, value: bytes) -> bytes:
    """One netlink attribute, padded to the 4-byte alignment."""
    length = NLA_HEADER.size + len(value)
    return NLA_HEADER.pack(length, kind) + value + b"\0" * (-length % 4)


def nested(kind: int, *children: bytes) -> bytes:
    """One attribute holding the (already padded) attributes CHILDREN."""
    return attribute(kind | NLA_F_NESTED, b"".join(children))


def message(msg_type: int, *, flags: int, sequence: int, payload: bytes) -> bytes:
    """One netlink message: nlmsghdr, then PAYLOAD (a family header and its attributes).

    The port id is 0: the kernel fills in the sender's."""
    header = NLMSG_HEADER.pack(NLMSG_HEADER.size + len(payload), msg_type, flags, sequence, 0)
    return header + payload


def nfnl_message(
    msg_type: int, *, flags: int, sequence: int, family: int, res_id: int, attributes: bytes
) -> bytes:
    """One nfnetlink message: nlmsghdr, nfgenmsg, then the (already padded) attributes."""
    payload = NFGEN_HEADER.pack(family, NFNETLINK_V0, res_id) + attributes
    return message(msg_type, flags=flags, sequence=sequence, payload=payload)


def request(
    sock: socket.socket, message: bytes, what: str, timeout: float = ACK_TIMEOUT
) -> list[bytes]:
    """Send a message sent with NLM_F_ACK and wait for its acknowledgement.

    Raises NetlinkError naming WHAT if the kernel refuses it. Returns the other
    datagrams that arrived meanwhile (events already flowing), in order.
    """
    sequence = NLMSG_HEADER.unpack_from(message)[3]
    sock.send(message)
    early: list[bytes] = []
    deadline = time.monotonic() + timeout
    while True:
        data = _receive(sock, deadline, what)
        code = _ack_code(data, sequence)
        if code is None:
            early.append(data)
        elif code:
            raise NetlinkError(what, -code)
        else:
            return early


def dump(
    sock: socket.socket, message: bytes, what: str, timeout: float = DUMP_TIMEOUT
) -> Iterator[tuple[bytes, int, int, int]]:
    """Send a dump request (NLM_F_DUMP) and yield each message of the answer, to its end.

    Yields (datagram, type, payload start, payload end). Raises NetlinkError naming
    WHAT if the kernel refuses the dump or ends it with an error, MalformedMessage if
    the framing of an answer is broken. Messages of another sequence (an answer to an
    abandoned request) are skipped. NLM_F_DUMP_INTR (the table changed during the
    dump) is not an error: what was read is still every entry that stayed, and callers
    read again soon.
    """
    sequence = NLMSG_HEADER.unpack_from(message)[3]
    sock.send(message)
    deadline = time.monotonic() + timeout
    while True:
        data = _receive(sock, deadline, what)
        for msg_type, _flags, start, end in messages(data):
            if NLMSG_HEADER.unpack_from(data, start - NLMSG_HEADER.size)[3] != sequence:
                continue
            if msg_type in (NLMSG_DONE, NLMSG_ERROR):
                # Both carry an int: 0 for a complete dump, else the negative errno.
                code = NLMSG_ERROR_CODE.unpack_from(data, start)[0] if end - start >= 4 else 0
                if code:
                    raise NetlinkError(what, -code)
                return
            yield data, msg_type, start, end


def _receive(sock: socket.socket, deadline: float, what: str) -> bytes:
    """The next datagram on the non-blocking SOCK; NetlinkError naming WHAT at DEADLINE."""
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0 or not select.select([sock], [], [], remaining)[0]:
            raise NetlinkError(what, 0)
        try:
            return sock.recv(RECV_SIZE)
        except BlockingIOError:
            continue
        except OSError as exc:
            # An overrun flags the socket once; a dump's and an ack's messages still come.
            if exc.errno == errno.ENOBUFS:
                continue
            raise


def _ack_code(data: bytes, sequence: int) -> int | None:
    """The error code of the acknowledgement of SEQUENCE in DATA, None if it is not one."""
    try:
        for msg_type, _flags, start, end in messages(data):
            if msg_type != NLMSG_ERROR or end - start < NLMSG_ERROR_CODE.size + NLMSG_HEADER.size:
                continue
            code: int = NLMSG_ERROR_CODE.unpack_from(data, start)[0]
            if NLMSG_HEADER.unpack_from(data, start + NLMSG_ERROR_CODE.size)[3] == sequence:
                return code
    except MalformedMessage:
        return None
    return None


def drain(sock: Receiver, max_datagrams: int) -> tuple[list[bytes], int]:
    """Up to MAX_DATAGRAMS queued datagrams without blocking, and how many overruns.

    An overrun (ENOBUFS) means the kernel dropped messages because the receive buffer
    was full; the socket stays usable and the messages still queued follow.
    """
    datagrams: list[bytes] = []
    overruns = 0
    # Bounded so that a flood cannot keep one call (and its event loop) busy forever.
    for _ in range(max_datagrams * 2):
        if len(datagrams) >= max_datagrams:
            break
        try:
            datagrams.append(sock.recv(RECV_SIZE))
        except (BlockingIOError, InterruptedError):
            break
        except OSError as exc:
            if exc.errno != errno.ENOBUFS:
                raise
            overruns += 1
    return datagrams, overruns


def messages(data: bytes) -> Iterator[tuple[int, int, int, int]]:
    """(type, flags, payload start, payload end) of each message in one datagram.

    Raises MalformedMessage where the framing breaks; messages before it are yielded.
    """
    offset = 0
    size = len(data)
    while offset < size:
        if size - offset < NLMSG_HEADER.size:
            raise MalformedMessage(f"{size - offset} bytes left, too short for a netlink header")
        length, msg_type, flags, _seq, _pid = NLMSG_HEADER.unpack_from(data, offset)
        if length < NLMSG_HEADER.size or offset + length > size:
            raise MalformedMessage(f"netlink length {length} at {offset} of {size} bytes")
        yield msg_type, flags, offset + NLMSG_HEADER.size, offset + length
        offset += (length + 3) & ~3


def attributes(data: bytes, start: int, end: int) -> dict[int, bytes]:
    """The attributes between START and END, by type (flag bits removed).

    Raises MalformedMessage if one overruns END.
    """
    found: dict[int, bytes] = {}
    unpack = NLA_HEADER.unpack_from
    offset = start
    while end - offset >= NLA_HEADER.size:
        length, kind = unpack(data, offset)
        if length < NLA_HEADER.size or offset + length > end:
            raise MalformedMessage(f"attribute length {length} at {offset}, message ends at {end}")
        found[kind & NLA_TYPE_MASK] = data[offset + NLA_HEADER.size : offset + length]
        offset += (length + 3) & ~3
    return found


def nfnl_attributes(data: bytes, start: int, end: int) -> dict[int, bytes]:
    """The attributes of the nfnetlink message whose payload is START to END, by type.

    Raises MalformedMessage if it has no nfgenmsg or an attribute overruns END.
    """
    if end - start < NFGEN_HEADER.size:
        raise MalformedMessage("no nfgenmsg header")
    return attributes(data, start + NFGEN_HEADER.size, end)


def find_attribute(data: bytes, start: int, end: int, kind: int) -> bytes | None:
    """The first attribute of type KIND between START and END, None if there is none.

    Cheaper than attributes() when only one early attribute matters. Raises
    MalformedMessage if an attribute before it overruns END.
    """
    unpack = NLA_HEADER.unpack_from
    offset = start
    while end - offset >= NLA_HEADER.size:
        length, found = unpack(data, offset)
        if length < NLA_HEADER.size or offset + length > end:
            raise MalformedMessage(f"attribute length {length} at {offset}, message ends at {end}")
        if found & NLA_TYPE_MASK == kind:
            return data[offset + NLA_HEADER.size : offset + length]
        offset += (length + 3) & ~3
    return None


class EventListener(Generic[_Event]):
    """A netlink socket subscribed to events: fileno() for the event loop's reader,
    read_events() to drain and decode what is there, without blocking (bounded)."""

    max_datagrams_per_read = 256

    def __init__(self, sock: socket.socket) -> None:
        self.overruns = 0  # times the kernel dropped messages because we read too slowly
        self.malformed = 0  # messages skipped because they could not be decoded
        self._sock = sock
        self._pending: list[bytes] = []  # datagrams read while setting the socket up

    def decode(self, data: bytes, timestamp: float) -> tuple[list[_Event], int]:
        """The events in one datagram, and how many messages were skipped."""
        raise NotImplementedError

    def fileno(self) -> int:
        return self._sock.fileno()

    def read_events(self) -> list[_Event]:
        datagrams, overruns = drain(self._sock, self.max_datagrams_per_read)
        if self._pending:
            datagrams, self._pending = self._pending + datagrams, []
        self.overruns += overruns
        now = time.time()
        events: list[_Event] = []
        for data in datagrams:
            decoded, malformed = self.decode(data, now)
            events.extend(decoded)
            self.malformed += malformed
        return events

    def close(self) -> None:
        """Closing the socket also unsubscribes it in the kernel."""
        self._sock.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()
