"""Interface addresses (agent/netlink/rtnetlink.py, agent/addresses.py): a message the
kernel sent decoded, the dump request to golden bytes, and the rule that picks the
host's own addresses. tests/integration/test_netlink_dumps.py compares the real dump
with pyroute2's."""

from __future__ import annotations

import socket
from ipaddress import ip_address

import pytest

import agent.addresses
from agent import netlink
from agent.addresses import discover_addresses
from agent.netlink import MalformedMessage, rtnetlink
from agent.netlink.rtnetlink import InterfaceAddress

# An RTM_NEWADDR message (nlmsghdr included) from a 6.18 kernel: 198.18.1.1 peer
# 198.18.1.2/32 on interface 2 (`ip address add 198.18.1.1 peer 198.18.1.2/32`).
POINT_TO_POINT = bytes.fromhex(
    "5000000014000200010000006d140000022080000200000008000100c612010208000200c6120101"
    "0a0003007665746830000000080008008000000014000600ffffffffffffffff0e6203000e620300"
)
HEADER = netlink.NLMSG_HEADER.size


def test_point_to_point_address_is_ifa_local_not_the_far_end() -> None:
    decoded = rtnetlink.decode_address(POINT_TO_POINT, HEADER, len(POINT_TO_POINT))

    assert decoded == InterfaceAddress(2, 32, ip_address("198.18.1.2"), ip_address("198.18.1.1"))
    assert decoded is not None
    assert decoded.own == ip_address("198.18.1.1")


def test_address_of_another_family_is_left_out() -> None:
    payload = rtnetlink.IFADDRMSG.pack(socket.AF_PACKET, 0, 0, 0, 1)

    assert rtnetlink.decode_address(payload, 0, len(payload)) is None


def test_address_of_a_wrong_size_is_malformed() -> None:
    payload = rtnetlink.IFADDRMSG.pack(socket.AF_INET, 24, 0, 0, 1) + netlink.attribute(
        rtnetlink.IFA_ADDRESS, b"\xc6\x12\x00"
    )

    with pytest.raises(MalformedMessage):
        rtnetlink.decode_address(payload, 0, len(payload))


def test_dump_request_asks_for_every_family() -> None:
    assert rtnetlink.dump_request(sequence=1) == bytes.fromhex(
        "18000000 1600 0103 01000000 00000000" "00 00 00 00 00000000"
    )  # fmt: skip


def entry(address: str, local: str | None = None) -> InterfaceAddress:
    return InterfaceAddress(2, 24, ip_address(address), ip_address(local) if local else None)


def test_discovery_keeps_own_global_addresses_once_sorted(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    dumped = [
        entry("2001:db8::1"),
        entry("198.18.1.2", local="198.18.1.1"),  # point-to-point: the far end is not ours
        entry("127.0.0.1", local="127.0.0.1"),
        entry("::1"),
        entry("fe80::1"),
        entry("169.254.0.1", local="169.254.0.1"),
        entry("198.18.0.10", local="198.18.0.10"),
        entry("198.18.0.10", local="198.18.0.10"),  # on a second interface
        entry("2001:db8:0:0::2"),
    ]
    monkeypatch.setattr(agent.addresses, "dump_addresses", lambda: dumped)

    assert discover_addresses() == ["198.18.0.10", "198.18.1.1", "2001:db8::1", "2001:db8::2"]
