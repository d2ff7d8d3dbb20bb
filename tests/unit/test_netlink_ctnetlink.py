"""Conntrack messages (agent/netlink/ctnetlink.py): entries decoded from messages the
kernel sent (captured from a dump in a namespace, tests/integration/test_netlink_dumps.py
compares the same decoding with pyroute2's), deletions encoded to golden bytes."""

from __future__ import annotations

import socket

import pytest

from agent import netlink
from agent.netlink import MalformedMessage, ctnetlink
from agent.netlink.ctnetlink import Entry, Tuple

# Whole dump messages (nlmsghdr included), from a 6.18 kernel.
# UDP 198.18.0.1:46741 -> 198.18.0.2:5353 in zone 5.
UDP4_ZONE5 = bytes.fromhex(
    "ac00000000010200010000007114000002000000340001801400018008000100c612000108000200"
    "c61200021c000280050001001100000006000200b69500000600030014e900003400028014000180"
    "08000100c612000208000200c61200011c00028005000100110000000600020014e9000006000300"
    "b69500000600120000050000080003000000000a080008000000000008000c00d1e476eb08000b00"
    "00000001080007000000001d"
)
# ICMPv6 echo request 2001:db8::1 -> 2001:db8::2, id 77.
ICMP6 = bytes.fromhex(
    "e40000000001020001000000711400000a000000540001802c0001801400030020010db800000000"
    "00000000000000011400040020010db800000000000000000000000224000280050001003a000000"
    "06000700004d000005000800800000000500090000000000540002802c0001801400030020010db8"
    "0000000000000000000000021400040020010db80000000000000000000000012400028005000100"
    "3a00000006000700004d000005000800810000000500090000000000080003000000000a08000800"
    "0000000008000c00004b118108000b0000000001080007000000001d"
)
HEADER = netlink.NLMSG_HEADER.size


def decode(message: bytes) -> Entry:
    return ctnetlink.decode_entry(message, HEADER, len(message))


def orig_attribute(message: bytes) -> bytes:
    """The CTA_TUPLE_ORIG attribute of a message, header included: the first one."""
    start = HEADER + netlink.NFGEN_HEADER.size
    length = netlink.NLA_HEADER.unpack_from(message, start)[0]
    return message[start : start + length]


def test_dump_message_in_a_zone_decodes_tuple_and_zone() -> None:
    assert decode(UDP4_ZONE5) == Entry(Tuple(4, 17, "198.18.0.1", "198.18.0.2", 46741, 5353), 5)


def test_icmp_dump_message_decodes_type_code_and_id() -> None:
    assert decode(ICMP6) == Entry(Tuple(6, 58, "2001:db8::1", "2001:db8::2", icmp=(128, 0, 77)), 0)


@pytest.mark.parametrize("message", [UDP4_ZONE5, ICMP6], ids=["udp4", "icmp6"])
def test_encoded_tuple_is_the_kernels_own(message: bytes) -> None:
    assert ctnetlink.encode_tuple(ctnetlink.CTA_TUPLE_ORIG, decode(message).orig) == (
        orig_attribute(message)
    )


def test_delete_names_tuple_and_zone() -> None:
    entry = Entry(Tuple(4, 6, "198.18.0.1", "198.18.0.2", 40000, 5432), zone=5)

    assert ctnetlink.delete_request(entry, sequence=3) == bytes.fromhex(
        "50000000" "0201" "0500" "03000000" "00000000"  # nlmsghdr: CT_DELETE, REQUEST|ACK
        "02000000"  # nfgenmsg: AF_INET, version 0, res_id 0
        "34000180"  # CTA_TUPLE_ORIG, nested
        "14000180" "0800 0100 c6120001" "0800 0200 c6120002"  # CTA_TUPLE_IP: src, dst
        "1c000280" "0500 0100 06000000" "0600 0200 9c400000" "0600 0300 15380000"  # proto, ports
        "0600 1200 00050000"  # CTA_ZONE 5, big endian
    )  # fmt: skip


def test_delete_in_zone_0_names_no_zone() -> None:
    entry = Entry(Tuple(6, 17, "2001:db8::1", "2001:db8::2", 1, 2))

    message = ctnetlink.delete_request(entry, sequence=1)

    assert message[HEADER] == 10  # AF_INET6
    assert message[HEADER + netlink.NFGEN_HEADER.size :] == ctnetlink.encode_tuple(
        ctnetlink.CTA_TUPLE_ORIG, entry.orig
    )


def test_directional_zone_rides_in_the_tuple() -> None:
    tuple_ = Tuple(4, 17, "198.18.0.1", "198.18.0.2", 1, 2, zone=7)

    encoded = ctnetlink.encode_tuple(ctnetlink.CTA_TUPLE_ORIG, tuple_)

    assert encoded.endswith(bytes.fromhex("0600 0300 00070000"))  # fmt: skip
    assert ctnetlink.decode_tuple(encoded[netlink.NLA_HEADER.size :]) == tuple_


def test_dump_request_asks_for_both_families() -> None:
    assert ctnetlink.dump_request(sequence=1) == bytes.fromhex(
        "14000000 0101 0103 01000000 00000000 00000000"
    )


def test_an_address_decodes_to_one_shared_string(monkeypatch: pytest.MonkeyPatch) -> None:
    # Connections the observer remembers hold their addresses: once each, not per event.
    first, second = decode(UDP4_ZONE5), decode(UDP4_ZONE5)
    assert first.orig.src == "198.18.0.1"
    assert first.orig.src is second.orig.src
    assert first.orig.dst is second.orig.dst
    assert decode(ICMP6).orig.src is decode(ICMP6).orig.src
    with pytest.raises(ValueError, match="invalid length"):  # no IPv4 address is 16 bytes
        ctnetlink.address_text(socket.AF_INET, bytes(16))
    monkeypatch.setattr(ctnetlink, "ADDRESS_TEXTS_MAX", 3)
    texts = [ctnetlink.address_text(socket.AF_INET, bytes([198, 18, 1, n])) for n in range(10)]
    assert texts[-1] == "198.18.1.9"
    assert len(ctnetlink._address_texts[socket.AF_INET]) <= 3


def test_message_without_original_tuple_is_malformed() -> None:
    message = netlink.nfnl_message(
        ctnetlink.NEW_TYPE, flags=0, sequence=1, family=2, res_id=0,
        attributes=netlink.attribute(ctnetlink.CTA_ZONE, b"\0\5"),
    )  # fmt: skip

    with pytest.raises(MalformedMessage, match="no original tuple"):
        decode(message)


def test_tuple_without_addresses_is_malformed() -> None:
    tuple_ = netlink.nested(
        ctnetlink.CTA_TUPLE_PROTO, netlink.attribute(ctnetlink.CTA_PROTO_NUM, b"\x06")
    )

    with pytest.raises(MalformedMessage, match="without addresses"):
        ctnetlink.decode_tuple(tuple_)
