"""Decoding of NFLOG packet messages and conntrack new-connection events.

Messages are built here from the documented layouts (<linux/netlink.h>,
<linux/netfilter/nfnetlink_log.h>, <linux/netfilter/nfnetlink_conntrack.h>), not with the
module's own helpers, so a layout mistake on one side does not hide on the other.
"""

from __future__ import annotations

import errno
import socket
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent import netlink
from agent.observe.ctevents import ConnEvent, decode_conn_events
from agent.observe.nflog import NflogListener, PacketEvent, decode_packets

NLA_F_NESTED = 0x8000
NLMSG_ERROR, NLMSG_DONE, NLM_F_MULTI = 2, 3, 0x2
NFLOG_PACKET = (4 << 8) | 0  # NFNL_SUBSYS_ULOG, NFULNL_MSG_PACKET
CT_NEW = (1 << 8) | 0  # NFNL_SUBSYS_CTNETLINK, IPCTNL_MSG_CT_NEW
CT_DELETE = (1 << 8) | 2
NFULA_PACKET_HDR, NFULA_PAYLOAD, NFULA_PREFIX = 1, 9, 10
NOW = 1700000000.5


def nla(kind: int, value: bytes) -> bytes:
    length = 4 + len(value)
    return struct.pack("=HH", length, kind) + value + b"\0" * (-length % 4)


def nlmsg(msg_type: int, body: bytes, *, family: int = socket.AF_INET, flags: int = 0) -> bytes:
    payload = struct.pack("!BBH", family, 0, 1001) + body
    header = struct.pack("=IHHII", 16 + len(payload), msg_type, flags, 0, 0)
    return header + payload + b"\0" * (-len(payload) % 4)


def ipv4(protocol: int, src: str, dst: str, l4: bytes, *, fragment: int = 0) -> bytes:
    header = struct.pack(
        "!BBHHHBBH4s4s",
        0x45,
        0,
        20 + len(l4),
        1,
        fragment,
        64,
        protocol,
        0,
        socket.inet_pton(socket.AF_INET, src),
        socket.inet_pton(socket.AF_INET, dst),
    )
    return header + l4


def ipv6(next_header: int, src: str, dst: str, rest: bytes) -> bytes:
    return (
        struct.pack("!IHBB", 6 << 28, len(rest), next_header, 64)
        + socket.inet_pton(socket.AF_INET6, src)
        + socket.inet_pton(socket.AF_INET6, dst)
        + rest
    )


def tcp(sport: int, dport: int) -> bytes:
    return struct.pack("!HHIIBBHHH", sport, dport, 1, 0, 5 << 4, 0x02, 64240, 0, 0)


def udp(sport: int, dport: int) -> bytes:
    return struct.pack("!HHHH", sport, dport, 8, 0)


def nflog_packet(payload: bytes, prefix: bytes = b"bh-deny-in \0", family: int = 2) -> bytes:
    hw_header = nla(NFULA_PACKET_HDR, struct.pack("!HBx", 0x0800, 1))
    return nlmsg(
        NFLOG_PACKET,
        hw_header + nla(NFULA_PREFIX, prefix) + nla(NFULA_PAYLOAD, payload),
        family=family,
    )


V4_SYN = nflog_packet(ipv4(6, "198.18.0.1", "198.18.0.2", tcp(40000, 5432)))


# --- NFLOG -----------------------------------------------------------------------------


def test_ipv4_tcp_packet() -> None:
    assert decode_packets(V4_SYN, NOW) == (
        [PacketEvent("bh-deny-in ", 4, "tcp", "198.18.0.1", "198.18.0.2", 40000, 5432, NOW)],
        0,
    )


@pytest.mark.parametrize("prefix", [b"bulkhead-deny\0", b"bulkhead-deny", b"bulkhead-deny\0\0\0"])
def test_prefix_with_or_without_trailing_nul(prefix: bytes) -> None:
    packet = nflog_packet(ipv4(17, "198.18.0.1", "198.18.0.2", udp(53, 5353)), prefix)
    events, malformed = decode_packets(packet, NOW)
    assert malformed == 0
    assert [(e.prefix, e.protocol, e.sport, e.dport) for e in events] == [
        ("bulkhead-deny", "udp", 53, 5353)
    ]


def test_packet_without_prefix_has_an_empty_one() -> None:
    body = nla(NFULA_PAYLOAD, ipv4(6, "198.18.0.1", "198.18.0.2", tcp(1, 2)))
    events, _ = decode_packets(nlmsg(NFLOG_PACKET, body), NOW)
    assert [e.prefix for e in events] == [""]


def test_ipv6_udp_after_hop_by_hop_and_destination_options() -> None:
    hop_by_hop = bytes([60, 0]) + b"\x01\x04\0\0\0\0"  # next: dest opts, 8 bytes
    dest_opts = bytes([17, 1]) + b"\x01\x0c" + b"\0" * 12  # next: udp, 16 bytes
    payload = ipv6(0, "2001:db8::1", "2001:db8::2", hop_by_hop + dest_opts + udp(5000, 53))
    events, malformed = decode_packets(nflog_packet(payload, family=10), NOW)
    assert (events, malformed) == (
        [PacketEvent("bh-deny-in ", 6, "udp", "2001:db8::1", "2001:db8::2", 5000, 53, NOW)],
        0,
    )


def test_ipv6_later_fragment_has_no_ports() -> None:
    fragment = struct.pack("!BBHI", 6, 0, 185 << 3, 7)  # offset 185*8: not the first
    payload = ipv6(44, "2001:db8::1", "2001:db8::2", fragment + b"\x12\x34\x56\x78")
    [event], _ = decode_packets(nflog_packet(payload, family=10), NOW)
    assert (event.protocol, event.sport, event.dport) == ("tcp", 0, 0)


def test_ipv6_first_fragment_has_ports() -> None:
    fragment = struct.pack("!BBHI", 6, 0, 1, 7)  # offset 0, more fragments
    payload = ipv6(44, "2001:db8::1", "2001:db8::2", fragment + tcp(40001, 443))
    [event], _ = decode_packets(nflog_packet(payload, family=10), NOW)
    assert (event.protocol, event.sport, event.dport) == ("tcp", 40001, 443)


def test_ipv4_later_fragment_has_no_ports() -> None:
    payload = ipv4(17, "198.18.0.1", "198.18.0.2", b"\x12\x34\x56\x78", fragment=100)
    [event], _ = decode_packets(nflog_packet(payload), NOW)
    assert (event.protocol, event.sport, event.dport) == ("udp", 0, 0)


@pytest.mark.parametrize(
    ("payload", "protocol"),
    [
        (ipv4(1, "198.18.0.1", "198.18.0.2", b"\x08\0\0\0\0\0\0\0"), "icmp"),
        (ipv4(47, "198.18.0.1", "198.18.0.2", b"\0" * 8), "47"),
        (ipv6(58, "2001:db8::1", "2001:db8::2", b"\x80\0\0\0\0\0\0\0"), "icmpv6"),
        (ipv6(59, "2001:db8::1", "2001:db8::2", b""), "59"),
    ],
)
def test_protocols_without_ports(payload: bytes, protocol: str) -> None:
    [event], malformed = decode_packets(nflog_packet(payload), NOW)
    assert (event.protocol, event.sport, event.dport, malformed) == (protocol, 0, 0, 0)


def test_transport_header_cut_off_by_copy_range_leaves_ports_zero() -> None:
    payload = ipv4(6, "198.18.0.1", "198.18.0.2", tcp(40000, 5432))[:22]
    [event], malformed = decode_packets(nflog_packet(payload), NOW)
    assert (event.dport, event.dst, malformed) == (0, "198.18.0.2", 0)


def test_batch_with_done_and_ack_messages() -> None:
    second = nflog_packet(ipv6(6, "2001:db8::1", "2001:db8::2", tcp(40002, 22)), family=10)
    ack = nlmsg(NLMSG_ERROR, b"\0" * 16)
    done = nlmsg(NLMSG_DONE, b"", flags=NLM_F_MULTI)
    events, malformed = decode_packets(ack + V4_SYN + second + done, NOW)
    assert [(e.family, e.dport) for e in events] == [(4, 5432), (6, 22)]
    assert malformed == 0


@pytest.mark.parametrize(
    "payload",
    [
        b"",
        b"\x50" + b"\0" * 39,  # IP version 5
        b"\x45" + b"\0" * 10,  # IPv4 header cut short
        b"\x44" + b"\0" * 39,  # IPv4 header length 16
        b"\x60" + b"\0" * 20,  # IPv6 header cut short
    ],
)
def test_undecodable_payload_is_skipped_and_counted(payload: bytes) -> None:
    assert decode_packets(nflog_packet(payload) + V4_SYN, NOW) == (
        decode_packets(V4_SYN, NOW)[0],
        1,
    )


def test_packet_message_without_payload_is_counted() -> None:
    message = nlmsg(NFLOG_PACKET, nla(NFULA_PREFIX, b"x\0"))
    assert decode_packets(message, NOW) == ([], 1)


def test_attribute_overrunning_its_message_is_counted() -> None:
    broken = nlmsg(NFLOG_PACKET, struct.pack("=HH", 200, NFULA_PAYLOAD) + b"\x45" * 20)
    assert decode_packets(broken + V4_SYN, NOW) == (decode_packets(V4_SYN, NOW)[0], 1)


@pytest.mark.parametrize("cut", range(1, len(V4_SYN)))
def test_truncated_datagram_never_raises(cut: int) -> None:
    events, malformed = decode_packets(V4_SYN[:cut], NOW)
    assert events == []
    assert malformed == 1


@given(st.binary(max_size=300))
def test_garbage_never_raises(data: bytes) -> None:
    events, malformed = decode_packets(data, NOW)
    assert malformed >= 0
    assert all(e.family in (4, 6) for e in events)


def test_listener_refuses_a_bad_group_before_opening_anything() -> None:
    with pytest.raises(ValueError, match=r"group: 70000 is outside 0\.\.65535"):
        NflogListener(70000)
    with pytest.raises(ValueError, match="copy_range"):
        NflogListener(copy_range=-1)


# --- draining ----------------------------------------------------------------------------


class FakeSocket:
    """Hands out queued datagrams and errors as a non-blocking socket would."""

    def __init__(self, queued: list[bytes | OSError]) -> None:
        self.queued = queued

    def recv(self, bufsize: int, /) -> bytes:
        if not self.queued:
            raise BlockingIOError(errno.EAGAIN, "empty")
        item = self.queued.pop(0)
        if isinstance(item, OSError):
            raise item
        return item


def test_drain_counts_overruns_and_keeps_reading() -> None:
    enobufs = OSError(errno.ENOBUFS, "No buffer space available")
    fake = FakeSocket([b"a", enobufs, b"b", enobufs, b"c"])
    assert netlink.drain(fake, 10) == ([b"a", b"b", b"c"], 2)


def test_drain_stops_at_its_bound() -> None:
    fake = FakeSocket([b"x"] * 5)
    assert netlink.drain(fake, 3) == ([b"x"] * 3, 0)
    assert len(fake.queued) == 2


def test_drain_passes_other_errors_on() -> None:
    with pytest.raises(OSError, match="denied"):
        netlink.drain(FakeSocket([OSError(errno.EACCES, "denied")]), 3)


# --- conntrack events -----------------------------------------------------------------


def ct_tuple(src: str, dst: str, protocol: int, ports: tuple[int, int] | None) -> bytes:
    family = socket.AF_INET6 if ":" in src else socket.AF_INET
    kinds = (3, 4) if family == socket.AF_INET6 else (1, 2)  # CTA_IP_V6_* / CTA_IP_V4_*
    ip = nla(kinds[0], socket.inet_pton(family, src)) + nla(kinds[1], socket.inet_pton(family, dst))
    proto = nla(1, bytes([protocol]))  # CTA_PROTO_NUM
    if ports is not None:
        proto += nla(2, struct.pack("!H", ports[0])) + nla(3, struct.pack("!H", ports[1]))
    return nla(1 | NLA_F_NESTED, ip) + nla(2 | NLA_F_NESTED, proto)


def ct_new(
    src: str, dst: str, protocol: int = 6, ports: tuple[int, int] | None = (40000, 8080)
) -> bytes:
    family = socket.AF_INET6 if ":" in src else socket.AF_INET
    orig = nla(1 | NLA_F_NESTED, ct_tuple(src, dst, protocol, ports))
    reply_ports = None if ports is None else (ports[1], ports[0])
    reply = nla(2 | NLA_F_NESTED, ct_tuple(dst, src, protocol, reply_ports))
    status = nla(3, struct.pack("!I", 8))
    return nlmsg(CT_NEW, orig + reply + status, family=family)


def test_ipv4_new_connection_is_the_original_tuple() -> None:
    assert decode_conn_events(ct_new("198.18.0.1", "198.18.0.2"), NOW) == (
        [ConnEvent("tcp", "198.18.0.1", "198.18.0.2", 40000, 8080, 4, NOW)],
        0,
    )


def test_ipv6_udp_and_icmp_events_in_one_datagram() -> None:
    data = ct_new("2001:db8::1", "2001:db8::2", 17, (5353, 53)) + ct_new(
        "198.18.0.1", "198.18.0.2", 1, None
    )
    events, malformed = decode_conn_events(data, NOW)
    assert malformed == 0
    assert events == [
        ConnEvent("udp", "2001:db8::1", "2001:db8::2", 5353, 53, 6, NOW),
        ConnEvent("icmp", "198.18.0.1", "198.18.0.2", 0, 0, 4, NOW),
    ]


def test_other_conntrack_messages_are_ignored() -> None:
    destroy = ct_new("198.18.0.1", "198.18.0.2")
    destroy = destroy[:4] + struct.pack("=H", CT_DELETE) + destroy[6:]
    assert decode_conn_events(destroy, NOW) == ([], 0)


@pytest.mark.parametrize(
    "body",
    [
        b"",  # no original tuple
        nla(1 | NLA_F_NESTED, nla(1 | NLA_F_NESTED, b"")),  # tuple without protocol
        nla(
            1 | NLA_F_NESTED,
            nla(1 | NLA_F_NESTED, nla(1, b"\xc6\x12\0")) + nla(2 | NLA_F_NESTED, nla(1, b"\x06")),
        ),  # a three-byte address and no destination
        nla(
            1 | NLA_F_NESTED,
            nla(1 | NLA_F_NESTED, nla(1, b"\xc6\x12\0") + nla(2, b"\xc6\x12\0\x02"))
            + nla(2 | NLA_F_NESTED, nla(1, b"\x06")),
        ),  # a three-byte source address
        nla(
            1 | NLA_F_NESTED,
            nla(1 | NLA_F_NESTED, nla(1, b"\xc6\x12\0\x01") + nla(2, b"\xc6\x12\0\x02"))
            + nla(2 | NLA_F_NESTED, nla(1, b"\x06") + nla(2, b"\x01")),
        ),  # a one-byte port
    ],
)
def test_undecodable_conntrack_event_is_skipped_and_counted(body: bytes) -> None:
    good = ct_new("198.18.0.1", "198.18.0.2")
    events, malformed = decode_conn_events(nlmsg(CT_NEW, body) + good, NOW)
    assert (len(events), malformed) == (1, 1)


@pytest.mark.parametrize("cut", range(1, len(ct_new("198.18.0.1", "198.18.0.2"))))
def test_truncated_conntrack_datagram_never_raises(cut: int) -> None:
    events, malformed = decode_conn_events(ct_new("198.18.0.1", "198.18.0.2")[:cut], NOW)
    assert (events, malformed) == ([], 1)


@given(st.binary(max_size=300))
def test_conntrack_garbage_never_raises(data: bytes) -> None:
    events, malformed = decode_conn_events(data, NOW)
    assert malformed >= 0
    assert all(e.family in (4, 6) for e in events)


@given(st.integers(0, len(V4_SYN) - 1), st.integers(0, 255))
def test_corrupted_packet_message_never_raises(position: int, value: int) -> None:
    corrupted = bytearray(V4_SYN)
    corrupted[position] = value
    events, malformed = decode_packets(bytes(corrupted), NOW)
    assert len(events) <= 1
    assert malformed <= 2  # a shortened message, then the bytes after it


@given(st.integers(0, len(ct_new("198.18.0.1", "198.18.0.2")) - 1), st.integers(0, 255))
def test_corrupted_conntrack_message_never_raises(position: int, value: int) -> None:
    corrupted = bytearray(ct_new("198.18.0.1", "198.18.0.2"))
    corrupted[position] = value
    events, malformed = decode_conn_events(bytes(corrupted), NOW)
    assert len(events) <= 1
    assert malformed <= 2  # a shortened message, then the bytes after it
