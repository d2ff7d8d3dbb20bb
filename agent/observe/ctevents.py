"""New connections as conntrack reports them, so that one living under a second is seen.

Polling the socket tables misses short connections; conntrack announces each new
connection on the NFNLGRP_CONNTRACK_NEW multicast group of ctnetlink the moment its
first packet is accepted. Only the original tuple (who opened it, to which port) is kept.

The messages are decoded here rather than through pyroute2's NFCTSocket: its generic
attribute machinery is an order of magnitude slower per event, and its socket wants to
own the reading loop, while the agent's asyncio loop reads a plain file descriptor.

Conntrack only tracks a network namespace once some rule there uses it (`ct state`),
and the kernel sends events only while net.netfilter.nf_conntrack_events allows (1, or
the default 2: "when someone listens", for connections created after the listener).
"""

from __future__ import annotations

from dataclasses import dataclass

from agent import netlink
from agent.netlink import MalformedMessage
from agent.netlink.ctnetlink import CTA_TUPLE_ORIG, NEW_TYPE, decode_tuple

NFNLGRP_CONNTRACK_NEW = 1
MAX_DATAGRAMS_PER_READ = 1024

PROTOCOL_NAMES = {1: "icmp", 6: "tcp", 17: "udp", 58: "icmpv6"}


@dataclass(frozen=True, slots=True)
class ConnEvent:
    """A connection conntrack just started tracking, as its first packet saw it."""

    protocol: str  # "tcp", "udp", "icmp", "icmpv6", or the IP protocol number
    src: str  # the side that opened it
    dst: str
    sport: int  # 0 when the protocol has no ports
    dport: int
    family: int  # 4 or 6
    timestamp: float  # unix seconds, when the listener read it


class ConntrackListener(netlink.EventListener[ConnEvent]):
    """Subscribed to new-connection events; read it when fileno() is readable."""

    max_datagrams_per_read = MAX_DATAGRAMS_PER_READ

    def __init__(self, *, rcvbuf: int = netlink.DEFAULT_RCVBUF) -> None:
        groups = 1 << (NFNLGRP_CONNTRACK_NEW - 1)
        super().__init__(netlink.open_socket(groups=groups, rcvbuf=rcvbuf))

    def decode(self, data: bytes, timestamp: float) -> tuple[list[ConnEvent], int]:
        return decode_conn_events(data, timestamp)


def decode_conn_events(data: bytes, timestamp: float) -> tuple[list[ConnEvent], int]:
    """The new-connection events in one ctnetlink datagram, and how many were skipped."""
    events: list[ConnEvent] = []
    malformed = 0
    try:
        for msg_type, _flags, start, end in netlink.messages(data):
            if msg_type != NEW_TYPE:
                continue
            try:
                events.append(_decode_new(data, start, end, timestamp))
            except MalformedMessage:
                malformed += 1
    except MalformedMessage:
        malformed += 1  # broken framing: the rest of the datagram is lost
    return events, malformed


def _decode_new(data: bytes, start: int, end: int, timestamp: float) -> ConnEvent:
    if end - start < netlink.NFGEN_HEADER.size:
        raise MalformedMessage("no nfgenmsg header")
    # The original tuple comes first: the rest of the message is never looked at.
    orig = netlink.find_attribute(data, start + netlink.NFGEN_HEADER.size, end, CTA_TUPLE_ORIG)
    if orig is None:
        raise MalformedMessage("no original tuple")
    tuple_ = decode_tuple(orig)
    return ConnEvent(
        protocol=PROTOCOL_NAMES.get(tuple_.protocol) or str(tuple_.protocol),
        src=tuple_.src,
        dst=tuple_.dst,
        sport=tuple_.sport,
        dport=tuple_.dport,
        family=tuple_.family,
        timestamp=timestamp,
    )
