"""Conntrack entries in ctnetlink messages: decoding tuples and entries, encoding deletes.

Layouts from <linux/netfilter/nfnetlink_conntrack.h>. A message is an nfgenmsg (whose
family is the entry's: AF_INET or AF_INET6), then attributes; a tuple is nested
attributes: CTA_TUPLE_IP {source, destination} and CTA_TUPLE_PROTO {number, then ports
or the ICMP type, code and id}. Ports, ids and zones are big endian.

A conntrack zone keeps entries apart that have the same tuple: an entry is named by its
tuple *and* its zone. CTA_ZONE is the zone of both directions; CTA_TUPLE_ZONE, inside a
tuple, the zone of that direction only (`ct original zone set`). The kernel sends
either only when it is not the default zone 0.
"""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass

from agent import netlink
from agent.netlink import MalformedMessage

NFNL_SUBSYS_CTNETLINK = 1
IPCTNL_MSG_CT_NEW = 0
IPCTNL_MSG_CT_GET = 1
IPCTNL_MSG_CT_DELETE = 2
CTA_TUPLE_ORIG = 1
CTA_ZONE = 18
CTA_TUPLE_IP, CTA_TUPLE_PROTO, CTA_TUPLE_ZONE = 1, 2, 3
CTA_IP_V4_SRC, CTA_IP_V4_DST, CTA_IP_V6_SRC, CTA_IP_V6_DST = 1, 2, 3, 4
CTA_PROTO_NUM, CTA_PROTO_SRC_PORT, CTA_PROTO_DST_PORT = 1, 2, 3
# Type, code and id of ICMP (4, 5, 6) and of ICMPv6 (7, 8, 9): they name such an entry.
CTA_PROTO_ICMP = {socket.IPPROTO_ICMP: (5, 6, 4), socket.IPPROTO_ICMPV6: (8, 9, 7)}

NEW_TYPE = (NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_NEW
GET_TYPE = (NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_GET
DELETE_TYPE = (NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_DELETE

# Per family: the address family, and the attributes of source and destination.
_FAMILIES = {
    4: (socket.AF_INET, CTA_IP_V4_SRC, CTA_IP_V4_DST),
    6: (socket.AF_INET6, CTA_IP_V6_SRC, CTA_IP_V6_DST),
}
_BE16 = struct.Struct("!H")
# Addresses as text, one string per address and family: a host's conntrack events name the
# same few addresses over and over, and each connection the observer remembers holds two.
# Emptied when full (a host talking to more peers than this just decodes as before).
ADDRESS_TEXTS_MAX = 1024
_address_texts: dict[int, dict[bytes, str]] = {socket.AF_INET: {}, socket.AF_INET6: {}}


@dataclass(frozen=True, slots=True)
class Tuple:
    """One direction of a tracked connection, as conntrack keys it."""

    family: int  # 4 or 6
    protocol: int  # the IP protocol number
    src: str
    dst: str
    sport: int = 0  # 0 when the protocol has no ports
    dport: int = 0
    icmp: tuple[int, int, int] | None = None  # type, code, id of an ICMP(v6) tuple
    zone: int | None = None  # CTA_TUPLE_ZONE: a zone of this direction only


@dataclass(frozen=True, slots=True)
class Entry:
    """A conntrack entry, as much of it as names it (in a delete) and judges it."""

    orig: Tuple  # the direction of the packet that opened the connection
    zone: int = 0  # CTA_ZONE; 0 is the default zone


def address_text(af: int, raw: bytes) -> str:
    """RAW (an address of family AF) as text, the same string for the same address;
    ValueError if RAW is not the family's size."""
    texts = _address_texts[af]
    text = texts.get(raw)
    if text is None:
        text = socket.inet_ntop(af, raw)
        if len(texts) >= ADDRESS_TEXTS_MAX:
            texts.clear()
        texts[raw] = text
    return text


def decode_tuple(data: bytes) -> Tuple:
    """The tuple in the payload of a CTA_TUPLE_* attribute; MalformedMessage if broken."""
    tuple_ = netlink.attributes(data, 0, len(data))
    ip = tuple_.get(CTA_TUPLE_IP)
    proto = tuple_.get(CTA_TUPLE_PROTO)
    if ip is None or proto is None:
        raise MalformedMessage("tuple without addresses or protocol")
    addresses = netlink.attributes(ip, 0, len(ip))
    ports = netlink.attributes(proto, 0, len(proto))
    family = 4 if CTA_IP_V4_SRC in addresses else 6
    af, src, dst = _FAMILIES[family]
    number = ports.get(CTA_PROTO_NUM)
    if not number or src not in addresses or dst not in addresses:
        raise MalformedMessage("tuple without protocol number or an address")
    protocol = number[0]
    sport = ports.get(CTA_PROTO_SRC_PORT)
    dport = ports.get(CTA_PROTO_DST_PORT)
    zone = tuple_.get(CTA_TUPLE_ZONE)
    try:
        return Tuple(
            family=family,
            protocol=protocol,
            src=address_text(af, addresses[src]),
            dst=address_text(af, addresses[dst]),
            sport=_BE16.unpack(sport)[0] if sport else 0,
            dport=_BE16.unpack(dport)[0] if dport else 0,
            icmp=_icmp(protocol, ports),
            zone=_BE16.unpack(zone)[0] if zone else None,
        )
    except (ValueError, struct.error) as exc:  # an address or port of the wrong size
        raise MalformedMessage(str(exc)) from exc


def _icmp(protocol: int, ports: dict[int, bytes]) -> tuple[int, int, int] | None:
    kinds = CTA_PROTO_ICMP.get(protocol)
    if kinds is None:
        return None
    type_, code, id_ = (ports.get(kind) for kind in kinds)
    if type_ is None or code is None or id_ is None:  # never from the kernel
        return None
    return type_[0], code[0], _BE16.unpack(id_)[0]


def decode_entry(data: bytes, start: int, end: int) -> Entry:
    """The entry in one message of a dump (the payload from START to END)."""
    found = netlink.nfnl_attributes(data, start, end)
    orig = found.get(CTA_TUPLE_ORIG)
    if orig is None:
        raise MalformedMessage("no original tuple")
    zone = found.get(CTA_ZONE)
    try:
        return Entry(decode_tuple(orig), _BE16.unpack(zone)[0] if zone else 0)
    except struct.error as exc:
        raise MalformedMessage(f"zone: {exc}") from exc


def encode_tuple(kind: int, tuple_: Tuple) -> bytes:
    """TUPLE_ as the nested attribute KIND (CTA_TUPLE_ORIG, CTA_TUPLE_REPLY)."""
    af, src, dst = _FAMILIES[tuple_.family]
    ip = netlink.nested(
        CTA_TUPLE_IP,
        netlink.attribute(src, socket.inet_pton(af, tuple_.src)),
        netlink.attribute(dst, socket.inet_pton(af, tuple_.dst)),
    )
    parts = [netlink.attribute(CTA_PROTO_NUM, bytes([tuple_.protocol]))]
    kinds = CTA_PROTO_ICMP.get(tuple_.protocol)
    if kinds is not None:
        if tuple_.icmp is not None:
            type_, code, id_ = tuple_.icmp
            parts += (  # in the kernel's order
                netlink.attribute(kinds[2], _BE16.pack(id_)),
                netlink.attribute(kinds[0], bytes([type_])),
                netlink.attribute(kinds[1], bytes([code])),
            )
    else:
        # Ports even when 0: TCP, UDP, SCTP, DCCP and GRE need both; the kernel ignores
        # them for a protocol it tracks without ports.
        parts += (
            netlink.attribute(CTA_PROTO_SRC_PORT, _BE16.pack(tuple_.sport)),
            netlink.attribute(CTA_PROTO_DST_PORT, _BE16.pack(tuple_.dport)),
        )
    children = [ip, netlink.nested(CTA_TUPLE_PROTO, *parts)]
    if tuple_.zone is not None:
        children.append(netlink.attribute(CTA_TUPLE_ZONE, _BE16.pack(tuple_.zone)))
    return netlink.nested(kind, *children)


def dump_request(sequence: int) -> bytes:
    """A dump of every entry of this network namespace, of both families at once."""
    return netlink.nfnl_message(
        GET_TYPE,
        flags=netlink.NLM_F_REQUEST | netlink.NLM_F_DUMP,
        sequence=sequence,
        family=socket.AF_UNSPEC,
        res_id=0,
        attributes=b"",
    )


def delete_request(entry: Entry, sequence: int) -> bytes:
    """The deletion of ENTRY, acknowledged. Without its zone the kernel would look the
    tuple up in zone 0 and answer ENOENT for an entry of another zone."""
    attributes = encode_tuple(CTA_TUPLE_ORIG, entry.orig)
    if entry.zone:
        attributes += netlink.attribute(CTA_ZONE, _BE16.pack(entry.zone))
    family = _FAMILIES[entry.orig.family][0]
    return netlink.nfnl_message(
        DELETE_TYPE,
        flags=netlink.NLM_F_REQUEST | netlink.NLM_F_ACK,
        sequence=sequence,
        family=family,
        res_id=0,
        attributes=attributes,
    )
