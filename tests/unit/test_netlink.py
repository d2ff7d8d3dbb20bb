"""The shared netlink plumbing (agent/netlink/__init__.py): encoding attributes and
messages, and reading a dump to its end. Framing and listeners are also covered through
their users (test_observe_nflog.py)."""

from __future__ import annotations

import errno
import socket
import struct
from collections.abc import Iterator

import pytest

from agent import netlink


def header(length: int, msg_type: int, flags: int, sequence: int) -> bytes:
    return netlink.NLMSG_HEADER.pack(length, msg_type, flags, sequence, 4242)


def reply(msg_type: int, sequence: int, payload: bytes) -> bytes:
    """One message as the kernel sends it (its port id set), padded."""
    data = header(netlink.NLMSG_HEADER.size + len(payload), msg_type, 2, sequence) + payload
    return data + bytes(-len(data) % 4)


def done(sequence: int, code: int = 0) -> bytes:
    return reply(netlink.NLMSG_DONE, sequence, struct.pack("=i", code))


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    """(ours, the kernel's end): datagrams sent on one are read on the other."""
    ours, kernel = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    ours.setblocking(False)
    with ours, kernel:
        yield ours, kernel


def test_attribute_is_padded_to_four_bytes() -> None:
    assert netlink.attribute(3, b"\x11\x22\x33") == bytes.fromhex("0700 0300 112233 00")


def test_nested_attribute_sets_the_nested_flag_and_holds_its_children() -> None:
    children = netlink.attribute(1, b"\xc6\x12\x00\x01") + netlink.attribute(2, b"\x05")

    assert netlink.nested(1, children) == bytes.fromhex(
        "1400 0180" "0800 0100 c6120001" "0500 0200 05000000"
    )  # fmt: skip


def test_message_is_header_then_payload_with_port_id_zero() -> None:
    built = netlink.message(22, flags=0x301, sequence=7, payload=b"\x0a\0\0\0")

    assert built == bytes.fromhex("14000000 1600 0103 07000000 00000000 0a000000")


def test_dump_yields_the_messages_of_its_sequence_until_done(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    ours, kernel = pair
    request = netlink.message(20, flags=0x301, sequence=9, payload=b"")
    first = reply(20, 9, b"one!")
    kernel.send(reply(20, 8, b"old!") + first)  # an abandoned dump's answer first
    kernel.send(reply(20, 9, b"two!") + done(9))

    got = [(data[start:end], msg_type) for data, msg_type, start, end in
           netlink.dump(ours, request, "test dump")]  # fmt: skip

    assert kernel.recv(100) == request
    assert got == [(b"one!", 20), (b"two!", 20)]


def test_a_dump_ended_with_an_error_raises_it(pair: tuple[socket.socket, socket.socket]) -> None:
    ours, kernel = pair
    kernel.send(reply(20, 3, b"one!") + done(3, -errno.EINTR))

    with pytest.raises(netlink.NetlinkError, match="test dump: Interrupted") as raised:
        list(netlink.dump(ours, netlink.message(20, flags=0, sequence=3, payload=b""), "test dump"))
    assert raised.value.code == errno.EINTR


def test_a_refused_dump_raises_the_error(pair: tuple[socket.socket, socket.socket]) -> None:
    ours, kernel = pair
    request = netlink.message(20, flags=0, sequence=4, payload=b"")
    kernel.send(reply(netlink.NLMSG_ERROR, 4, struct.pack("=i", -errno.EPERM) + request))

    with pytest.raises(netlink.NetlinkError) as raised:
        list(netlink.dump(ours, request, "test dump"))
    assert raised.value.code == errno.EPERM


def test_a_dump_without_end_times_out(pair: tuple[socket.socket, socket.socket]) -> None:
    ours, kernel = pair
    kernel.send(reply(20, 5, b"one!"))

    with pytest.raises(netlink.NetlinkError, match="no answer"):
        list(netlink.dump(ours, netlink.message(20, flags=0, sequence=5, payload=b""), "d", 0.05))
