"""Packets the dataplane logged to an NFLOG group: what default-deny dropped (or would drop).

Both dataplanes log such packets to one nfnetlink_log group with a prefix that says why
(`NFLOG --nflog-group` in iptables, `log group ... prefix` in nftables). The listener
binds that group in the calling process's network namespace, asks for the first bytes
of each packet (enough for the IP and TCP/UDP headers) and decodes them itself:
pyroute2 has no nfnetlink_log support.

The kernel ignores the old per-family PF_BIND/PF_UNBIND commands since Linux 3.17 and
the NFLOG target never needed them, so only the group is bound.
"""

from __future__ import annotations

import itertools
import socket
import struct
from dataclasses import dataclass

from agent import netlink
from agent.netlink import MalformedMessage

DEFAULT_GROUP = 1001  # the group both dataplanes log to
DEFAULT_COPY_RANGE = 96  # IPv6 header (40) + a few extension bytes + TCP header (20..60)
DEFAULT_FLUSH_CENTISECONDS = 10  # the kernel batches packets at most this long (1/100 s)
DEFAULT_QUEUE_THRESHOLD = 32  # ... or until this many are waiting
MAX_DATAGRAMS_PER_READ = 256

NFNL_SUBSYS_ULOG = 4
NFULNL_MSG_PACKET = 0
NFULNL_MSG_CONFIG = 1
NFULA_CFG_CMD = 1
NFULA_CFG_MODE = 2
NFULA_CFG_TIMEOUT = 4
NFULA_CFG_QTHRESH = 5
NFULNL_CFG_CMD_BIND = 1
NFULNL_COPY_PACKET = 2
NFULA_PAYLOAD = 9
NFULA_PREFIX = 10

_PACKET_TYPE = (NFNL_SUBSYS_ULOG << 8) | NFULNL_MSG_PACKET
_CONFIG_TYPE = (NFNL_SUBSYS_ULOG << 8) | NFULNL_MSG_CONFIG
_CONFIG_MODE = struct.Struct("!IBx")  # copy range, copy mode, padding
_BE32 = struct.Struct("!I")
_PORTS = struct.Struct("!HH")
_BE16 = struct.Struct("!H")

PROTOCOL_NAMES = {1: "icmp", 6: "tcp", 17: "udp", 58: "icmpv6"}
_PORTED = frozenset({6, 17})
# IPv6 extension headers that may come before the transport header.
_IPV6_HOP_BY_HOP, _IPV6_ROUTING, _IPV6_FRAGMENT, _IPV6_AH, _IPV6_DEST_OPTS = 0, 43, 44, 51, 60
_IPV6_EXTENSIONS = frozenset(
    {_IPV6_HOP_BY_HOP, _IPV6_ROUTING, _IPV6_FRAGMENT, _IPV6_AH, _IPV6_DEST_OPTS}
)
_MAX_IPV6_EXTENSIONS = 8


@dataclass(frozen=True, slots=True)
class PacketEvent:
    """One logged packet. Direction is the caller's to tell, from the prefix or addresses."""

    prefix: str  # as the rule gave it, without the kernel's trailing NUL
    family: int  # 4 or 6
    protocol: str  # "tcp", "udp", "icmp", "icmpv6", or the IP protocol number
    src: str
    dst: str
    sport: int  # 0 when the protocol has no ports or the header was not captured
    dport: int
    timestamp: float  # unix seconds, when the listener read it


class NflogListener(netlink.EventListener[PacketEvent]):
    """A bound NFLOG group; read it when fileno() is readable (asyncio add_reader)."""

    max_datagrams_per_read = MAX_DATAGRAMS_PER_READ

    def __init__(
        self,
        group: int = DEFAULT_GROUP,
        *,
        copy_range: int = DEFAULT_COPY_RANGE,
        flush_centiseconds: int = DEFAULT_FLUSH_CENTISECONDS,
        queue_threshold: int = DEFAULT_QUEUE_THRESHOLD,
        rcvbuf: int = netlink.DEFAULT_RCVBUF,
    ) -> None:
        for field, value, top in (
            ("group", group, 0xFFFF),
            ("copy_range", copy_range, 0xFFFF),
            ("flush_centiseconds", flush_centiseconds, 0xFFFFFFFF),
            ("queue_threshold", queue_threshold, 0xFFFFFFFF),
        ):
            if not 0 <= value <= top:
                raise ValueError(f"{field}: {value} is outside 0..{top}")
        self.group = group
        self._sequence = itertools.count(1)
        super().__init__(netlink.open_socket(rcvbuf=rcvbuf))
        try:
            self._pending = self._configure(copy_range, flush_centiseconds, queue_threshold)
        except BaseException:
            self._sock.close()
            raise

    def _configure(self, copy_range: int, flush: int, threshold: int) -> list[bytes]:
        bind = netlink.attribute(NFULA_CFG_CMD, bytes([NFULNL_CFG_CMD_BIND]))
        early = self._config(bind, f"binding NFLOG group {self.group} (is another logger on it?)")
        settings = (
            netlink.attribute(NFULA_CFG_MODE, _CONFIG_MODE.pack(copy_range, NFULNL_COPY_PACKET))
            + netlink.attribute(NFULA_CFG_TIMEOUT, _BE32.pack(flush))
            + netlink.attribute(NFULA_CFG_QTHRESH, _BE32.pack(threshold))
        )
        return early + self._config(settings, f"configuring NFLOG group {self.group}")

    def _config(self, attributes: bytes, what: str) -> list[bytes]:
        message = netlink.nfnl_message(
            _CONFIG_TYPE,
            flags=netlink.NLM_F_REQUEST | netlink.NLM_F_ACK,
            sequence=next(self._sequence),
            family=socket.AF_UNSPEC,
            res_id=self.group,  # the group, in network byte order
            attributes=attributes,
        )
        return netlink.request(self._sock, message, what)

    def decode(self, data: bytes, timestamp: float) -> tuple[list[PacketEvent], int]:
        return decode_packets(data, timestamp)


def decode_packets(data: bytes, timestamp: float) -> tuple[list[PacketEvent], int]:
    """The packet events in one nfnetlink_log datagram, and how many messages were skipped."""
    events: list[PacketEvent] = []
    malformed = 0
    try:
        for msg_type, _flags, start, end in netlink.messages(data):
            if msg_type != _PACKET_TYPE:
                continue  # acks, NLMSG_DONE closing a batch, other subsystems
            try:
                events.append(_decode_packet(data, start, end, timestamp))
            except MalformedMessage:
                malformed += 1
    except MalformedMessage:
        malformed += 1  # broken framing: the rest of the datagram is lost
    return events, malformed


def _decode_packet(data: bytes, start: int, end: int, timestamp: float) -> PacketEvent:
    found = netlink.nfnl_attributes(data, start, end)
    payload = found.get(NFULA_PAYLOAD)
    if payload is None:
        raise MalformedMessage("packet message without payload")
    # The kernel NUL-terminates the prefix; tolerate one that is not.
    prefix = found.get(NFULA_PREFIX, b"").partition(b"\0")[0].decode("utf-8", "replace")
    version = payload[0] >> 4 if payload else 0
    if version == 4:
        return _decode_ipv4(payload, prefix, timestamp)
    if version == 6:
        return _decode_ipv6(payload, prefix, timestamp)
    raise MalformedMessage(f"IP version {version}")


def _decode_ipv4(packet: bytes, prefix: str, timestamp: float) -> PacketEvent:
    header_length = (packet[0] & 0x0F) * 4
    if header_length < 20 or len(packet) < header_length:
        raise MalformedMessage(f"IPv4 header of {header_length} bytes in {len(packet)}")
    protocol = packet[9]
    sport = dport = 0
    first_fragment = _BE16.unpack_from(packet, 6)[0] & 0x1FFF == 0
    if first_fragment and protocol in _PORTED and len(packet) >= header_length + 4:
        sport, dport = _PORTS.unpack_from(packet, header_length)
    return PacketEvent(
        prefix=prefix,
        family=4,
        protocol=PROTOCOL_NAMES.get(protocol) or str(protocol),
        src=socket.inet_ntop(socket.AF_INET, packet[12:16]),
        dst=socket.inet_ntop(socket.AF_INET, packet[16:20]),
        sport=sport,
        dport=dport,
        timestamp=timestamp,
    )


def _decode_ipv6(packet: bytes, prefix: str, timestamp: float) -> PacketEvent:
    if len(packet) < 40:
        raise MalformedMessage(f"IPv6 header in {len(packet)} bytes")
    protocol, offset = _ipv6_transport(packet)
    sport = dport = 0
    if protocol in _PORTED and 0 < offset <= len(packet) - 4:
        sport, dport = _PORTS.unpack_from(packet, offset)
    return PacketEvent(
        prefix=prefix,
        family=6,
        protocol=PROTOCOL_NAMES.get(protocol) or str(protocol),
        src=socket.inet_ntop(socket.AF_INET6, packet[8:24]),
        dst=socket.inet_ntop(socket.AF_INET6, packet[24:40]),
        sport=sport,
        dport=dport,
        timestamp=timestamp,
    )


def _ipv6_transport(packet: bytes) -> tuple[int, int]:
    """The protocol after the extension headers and where its header starts.

    The offset is 0 when the transport header is not in the packet (a later fragment,
    or extension headers longer than what was captured).
    """
    protocol, offset = packet[6], 40
    for _ in range(_MAX_IPV6_EXTENSIONS):
        if protocol not in _IPV6_EXTENSIONS:
            return protocol, offset
        if len(packet) < offset + 8:
            return protocol, 0
        next_header, length_field = packet[offset], packet[offset + 1]
        if protocol == _IPV6_FRAGMENT:
            if _BE16.unpack_from(packet, offset + 2)[0] & 0xFFF8:
                return next_header, 0  # not the first fragment: no transport header here
            offset += 8
        elif protocol == _IPV6_AH:
            offset += (length_field + 2) * 4
        else:
            offset += (length_field + 1) * 8
        protocol = next_header
    return protocol, 0
