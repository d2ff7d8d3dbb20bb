"""The sock_diag reader (inetdiag.py, sockdiag.py) on constructed inet_diag dumps.

Messages are built here from the documented layouts (<linux/netlink.h>,
<linux/inet_diag.h>), not with the module's own helpers, so a layout mistake on one side
does not hide on the other. The sockets are those of the /proc/net fixtures of
test_observe_sockets.py, so both readers are held to the same records.
"""

from __future__ import annotations

import errno
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.observe import inetdiag, sockdiag
from agent.observe.inetdiag import DatagramResult, Key, decode_datagram, dump_request
from agent.observe.sockdiag import SOURCE_PROC_NET, SOURCE_SOCK_DIAG, SockDiagReader
from agent.observe.sockets import TABLES, SocketRecord, SocketTable, parse_table
from tests.unit.test_observe_processes import FakeProc
from tests.unit.test_observe_sockets import TCP6_TEXT, TCP_TEXT, UDP6_TEXT, UDP_TEXT

NLMSG_NOOP, NLMSG_ERROR, NLMSG_DONE = 1, 2, 3
NLM_F_REQUEST, NLM_F_MULTI, NLM_F_DUMP = 0x1, 0x2, 0x300
SOCK_DIAG_BY_FAMILY = 20
INET_DIAG_SHUTDOWN, INET_DIAG_SKV6ONLY, INET_DIAG_MARK = 8, 11, 15
LISTEN, ESTABLISHED, SYN_SENT, TIME_WAIT, CLOSE, CLOSE_WAIT = 10, 1, 2, 6, 7, 8
TCP, TCP6, UDP, UDP6 = TABLES


@dataclass(frozen=True)
class Diag:
    """One socket as an inet_diag_msg describes it."""

    state: int
    src: str
    sport: int
    dst: str
    dport: int
    uid: int
    inode: int
    # What moves while the socket stays the same.
    timer: int = 0
    expires: int = 0
    rqueue: int = 0
    wqueue: int = 0
    cookie: int = 1
    attributes: bytes = b""


def nla(kind: int, value: bytes) -> bytes:
    length = 4 + len(value)
    return struct.pack("=HH", length, kind) + value + b"\0" * (-length % 4)


def address(family: int, text: str) -> bytes:
    """An inet_diag_sockid address: 16 bytes, an IPv4 one in the first 4."""
    return socket.inet_pton(family, text).ljust(16, b"\0")


def message(family: int, diag: Diag, sequence: int) -> bytes:
    body = (
        struct.pack("=BBBB", family, diag.state, diag.timer, 0)
        + struct.pack("!HH", diag.sport, diag.dport)  # the sockid's ports: network order
        + address(family, diag.src)
        + address(family, diag.dst)
        + struct.pack("=IQ", 0, diag.cookie)  # interface, cookie
        + struct.pack("=IIIII", diag.expires, diag.rqueue, diag.wqueue, diag.uid, diag.inode)
        + nla(INET_DIAG_SHUTDOWN, b"\0")
        + diag.attributes
    )
    header = struct.pack("=IHHII", 16 + len(body), SOCK_DIAG_BY_FAMILY, NLM_F_MULTI, sequence, 9)
    return header + body


def control(kind: int, sequence: int, code: int = 0) -> bytes:
    return struct.pack("=IHHIIi", 20, kind, NLM_F_MULTI, sequence, 9, code)


def v6only(diag: Diag) -> Diag:
    """What the kernel adds to an IPv6 socket in LISTEN or CLOSE."""
    return replace(diag, attributes=nla(INET_DIAG_SKV6ONLY, b"\0"))


# The sockets of the /proc/net fixtures, as the kernel dumps them: the TIME_WAIT line
# is left out (the request asks for every state but it), the others have the same
# values in the same order.
SOCKETS: dict[str, list[Diag]] = {
    "tcp": [
        Diag(LISTEN, "0.0.0.0", 22, "0.0.0.0", 0, 0, 20613),
        Diag(LISTEN, "127.0.0.1", 5432, "0.0.0.0", 0, 108, 31254, rqueue=0, wqueue=100),
        Diag(ESTABLISHED, "127.0.0.1", 5432, "127.0.0.1", 50594, 108, 44871),
        Diag(ESTABLISHED, "127.0.0.1", 50594, "127.0.0.1", 5432, 1000, 44870, timer=2),
        Diag(SYN_SENT, "198.18.0.10", 36652, "198.18.0.11", 443, 1000, 44990, timer=1),
    ],
    "tcp6": [
        v6only(Diag(LISTEN, "::", 80, "::", 0, 33, 30001)),
        Diag(ESTABLISHED, "2001:db8::1", 80, "2001:db8::2", 58020, 33, 30002),
        Diag(ESTABLISHED, "::ffff:198.18.0.10", 80, "::ffff:198.18.0.11", 54322, 33, 30003),
        Diag(CLOSE_WAIT, "::1", 41394, "::1", 8080, 1000, 30004, wqueue=1),
    ],
    "udp": [
        Diag(CLOSE, "0.0.0.0", 53, "0.0.0.0", 0, 101, 15120),
        Diag(ESTABLISHED, "198.18.0.10", 36190, "198.18.0.1", 53, 1000, 40001),
    ],
    "udp6": [v6only(Diag(CLOSE, "::1", 514, "::", 0, 0, 15200))],
}
PROC_TEXTS = {"tcp": TCP_TEXT, "tcp6": TCP6_TEXT, "udp": UDP_TEXT, "udp6": UDP6_TEXT}


def family_of(table: str) -> int:
    return socket.AF_INET6 if table.endswith("6") else socket.AF_INET


def dump(table: str, sockets: list[Diag], sequence: int, per_datagram: int = 100) -> list[bytes]:
    """A dump as the kernel sends it: datagrams of messages, NLMSG_DONE in the last."""
    messages = [message(family_of(table), diag, sequence) for diag in sockets]
    datagrams = [
        b"".join(messages[start : start + per_datagram])
        for start in range(0, len(messages), per_datagram)
    ] or [b""]
    datagrams[-1] += control(NLMSG_DONE, sequence)
    return datagrams


Answer = Callable[[str, int], list[bytes]]


class FakeDiag:
    """A netlink socket that answers each dump request with the datagrams of `answer`."""

    def __init__(self, answer: Answer) -> None:
        self.answer = answer
        self.requests: list[bytes] = []
        self.closed = False
        self._queue: list[bytes] = []

    def send(self, data: bytes, /) -> int:
        self.requests.append(data)
        sequence = struct.unpack_from("=I", data, 8)[0]
        family, protocol = data[16], data[17]
        [table] = [
            t.name
            for t in TABLES
            if family_of(t.name) == family
            and protocol == (socket.IPPROTO_TCP if t.protocol == "tcp" else socket.IPPROTO_UDP)
        ]
        self._queue = list(self.answer(table, sequence))
        return len(data)

    def recv(self, bufsize: int, /) -> bytes:
        return self._queue.pop(0) if self._queue else b""

    def close(self) -> None:
        self.closed = True


def answering(sockets: dict[str, list[Diag]], per_datagram: int = 100) -> Answer:
    return lambda table, sequence: dump(table, sockets.get(table, []), sequence, per_datagram)


def proc_records() -> list[SocketRecord]:
    return [
        record for table in TABLES for record in parse_table(table, PROC_TEXTS[table.name].encode())
    ]


@pytest.fixture
def proc(tmp_path: Path) -> FakeProc:
    fake = FakeProc(tmp_path / "proc")
    for name, text in PROC_TEXTS.items():
        fake.table(name, text)
    return fake


# -- the request ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("table", "family", "protocol"),
    [
        (TCP, socket.AF_INET, socket.IPPROTO_TCP),
        (TCP6, socket.AF_INET6, socket.IPPROTO_TCP),
        (UDP, socket.AF_INET, socket.IPPROTO_UDP),
        (UDP6, socket.AF_INET6, socket.IPPROTO_UDP),
    ],
)
def test_a_dump_request_asks_for_every_socket_of_one_table(
    table: SocketTable, family: int, protocol: int
) -> None:
    request = dump_request(table, 77)
    length, kind, flags, sequence, _ = struct.unpack_from("=IHHII", request)
    assert (length, kind, flags, sequence) == (
        len(request),
        SOCK_DIAG_BY_FAMILY,
        NLM_F_REQUEST | NLM_F_DUMP,
        77,
    )
    got_family, got_protocol, ext, states = struct.unpack_from("=BBBxI", request, 16)
    assert (got_family, got_protocol, ext) == (family, protocol, 0)
    assert request[24:] == bytes(48)  # inet_diag_sockid: no filter
    wanted = {ESTABLISHED, SYN_SENT, 3, 4, 5, CLOSE, CLOSE_WAIT, 9, LISTEN, 11}
    assert {state for state in range(32) if states >> state & 1} == wanted


# -- records ------------------------------------------------------------------------------


def test_records_are_those_the_proc_net_reader_makes_of_the_same_sockets() -> None:
    reader = SockDiagReader(connection=FakeDiag(answering(SOCKETS)))
    records = reader.read()
    assert records == proc_records()
    assert reader.fresh == records
    assert (reader.source, reader.malformed) == (SOURCE_SOCK_DIAG, 0)


def test_records_of_runs_of_mixed_lengths_across_datagrams() -> None:
    # Listeners (one attribute more) between connections, three messages a datagram.
    mixed = [
        v6only(Diag(LISTEN, "::", 1000 + i, "::", 0, 0, 100 + i))
        if i % 3 == 0
        else Diag(ESTABLISHED, "2001:db8::1", 1000 + i, "2001:db8::9", 80, 0, 100 + i)
        for i in range(20)
    ]
    reader = SockDiagReader(connection=FakeDiag(answering({"tcp6": mixed}, per_datagram=3)))
    records = reader.read()
    assert [(r.local_port, r.peer_ip, r.state) for r in records] == [
        (1000 + i, "" if i % 3 == 0 else "2001:db8::9", "LISTEN" if i % 3 == 0 else "ESTABLISHED")
        for i in range(20)
    ]


def test_address_texts_stay_right_when_their_cache_fills_up(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(inetdiag, "_ADDRESS_CACHE_LIMIT", 4)
    sockets = {
        "tcp": [
            Diag(ESTABLISHED, "198.18.0.1", 1000 + i, f"198.18.1.{i % 7}", 80, 0, 100 + i)
            for i in range(30)
        ]
    }
    reader = SockDiagReader(connection=FakeDiag(answering(sockets)))
    for peer_port in (80, 81, 82):  # new records each time: their addresses looked up
        sockets["tcp"] = [replace(diag, dport=peer_port) for diag in sockets["tcp"]]
        records = reader.read()
        assert [(r.local_ip, r.peer_ip, r.peer_port) for r in records] == [
            ("198.18.0.1", f"198.18.1.{i % 7}", peer_port) for i in range(30)
        ]


def test_sockets_no_file_holds_are_left_out() -> None:
    # A request socket (NEW_SYN_RECV, shown as SYN_RECV) and one not accepted yet.
    sockets = {
        "tcp": [
            Diag(3, "127.0.0.1", 80, "127.0.0.1", 40000, 0, 0),
            *SOCKETS["tcp"],
            Diag(ESTABLISHED, "127.0.0.1", 80, "127.0.0.1", 40001, 0, 0),
        ]
    }
    records = SockDiagReader(connection=FakeDiag(answering(sockets))).read()
    assert records == parse_table(TCP, TCP_TEXT.encode())


def test_an_unknown_state_is_named_as_the_proc_net_reader_names_it() -> None:
    sockets = {"tcp": [Diag(14, "127.0.0.1", 80, "0.0.0.0", 0, 0, 5)]}
    [record] = SockDiagReader(connection=FakeDiag(answering(sockets))).read()
    assert record.state == "UNKNOWN_0E"


# -- what the next read re-uses -----------------------------------------------------------


def test_a_read_with_only_counters_moved_gives_back_the_same_records() -> None:
    sockets = {name: list(diags) for name, diags in SOCKETS.items()}
    reader = SockDiagReader(connection=FakeDiag(answering(sockets)))
    before = reader.read()
    sockets["tcp"] = [
        replace(diag, timer=3, expires=diag.expires + 200, rqueue=5, wqueue=7)
        for diag in sockets["tcp"]
    ]

    after = reader.read()

    assert reader.fresh == []
    assert len(after) == len(before)
    assert all(a is b for a, b in zip(after, before, strict=True))


def test_new_and_changed_sockets_are_fresh_and_gone_ones_are_left_out() -> None:
    sockets = {name: list(diags) for name, diags in SOCKETS.items()}
    reader = SockDiagReader(connection=FakeDiag(answering(sockets)))
    before = {record.inode: record for record in reader.read()}
    listen_22, _, _, client, syn_sent = sockets["tcp"]
    # The 5432 sockets are gone, postgres hung up on the client, a new socket came.
    hung_up = replace(client, state=CLOSE_WAIT)
    new = Diag(ESTABLISHED, "127.0.0.1", 5432, "127.0.0.1", 50596, 108, 44999)
    sockets["tcp"] = [listen_22, hung_up, syn_sent, new]

    after = {record.inode: record for record in reader.read()}

    assert set(after) == set(before) - {31254, 44871} | {44999}
    assert [(r.inode, r.state) for r in reader.fresh] == [
        (44870, "CLOSE_WAIT"),
        (44999, "ESTABLISHED"),
    ]
    assert all(after[inode] is before[inode] for inode in set(after) - {44870, 44999})
    reader.read()
    assert reader.fresh == []


def test_a_socket_back_after_a_read_without_it_is_fresh() -> None:
    sockets = {name: list(diags) for name, diags in SOCKETS.items()}
    reader = SockDiagReader(connection=FakeDiag(answering(sockets)))
    reader.read()
    listener = sockets["tcp"].pop(0)
    assert listener.inode not in {record.inode for record in reader.read()}
    assert reader.fresh == []
    sockets["tcp"].append(listener)  # the dump missed it once, say

    reader.read()

    assert [record.inode for record in reader.fresh] == [listener.inode]


def test_a_socket_whose_bytes_change_but_record_does_not_is_not_fresh() -> None:
    # An unconnected IPv6 socket's peer, :: or ::ffff:0.0.0.0: either is no peer.
    sockets = {"udp6": [Diag(CLOSE, "::", 53, "::", 0, 0, 7)]}
    reader = SockDiagReader(connection=FakeDiag(answering(sockets)))
    [before] = reader.read()
    sockets["udp6"] = [Diag(CLOSE, "::", 53, "::ffff:0.0.0.0", 0, 0, 7)]

    [after] = reader.read()

    assert after is before
    assert reader.fresh == []


# -- what cannot be decoded ---------------------------------------------------------------

SEQUENCE = 5


def keys_of(data: bytes) -> tuple[list[Key], DatagramResult]:
    keys: list[Key] = []
    return keys, decode_datagram(data, SEQUENCE, keys)


def tcp_messages(count: int) -> list[bytes]:
    return [
        message(
            socket.AF_INET,
            Diag(ESTABLISHED, "127.0.0.1", 1000 + i, "127.0.0.1", 80, 0, i + 1),
            SEQUENCE,
        )
        for i in range(count)
    ]


def test_a_datagram_cut_short_gives_the_messages_before_the_cut() -> None:
    first, second, third = tcp_messages(3)
    keys, result = keys_of(first + second + third[:50])
    assert len(keys) == 2
    assert (result.malformed, result.done) == (1, False)


@pytest.mark.parametrize("length", [0, 15, 10_000])
def test_a_broken_length_drops_the_rest_of_the_datagram(length: int) -> None:
    first, second = tcp_messages(2)
    broken = struct.pack("=I", length) + second[4:]
    keys, result = keys_of(first + broken + control(NLMSG_DONE, SEQUENCE))
    assert len(keys) == 1
    assert (result.malformed, result.done) == (1, False)


def test_a_socket_message_too_short_is_skipped_and_the_next_one_read() -> None:
    first, second = tcp_messages(2)
    short = struct.pack("=IHHII", 40, SOCK_DIAG_BY_FAMILY, NLM_F_MULTI, SEQUENCE, 9) + bytes(24)
    keys, result = keys_of(first + short + second + control(NLMSG_DONE, SEQUENCE))
    assert len(keys) == 2
    assert (result.malformed, result.done) == (1, True)


def test_other_messages_are_skipped_and_counted_but_noop() -> None:
    first, second = tcp_messages(2)
    unknown = struct.pack("=IHHII", 20, 99, 0, SEQUENCE, 9) + bytes(4)
    keys, result = keys_of(first + control(NLMSG_NOOP, SEQUENCE) + unknown + second)
    assert len(keys) == 2
    assert result.malformed == 1


def test_a_datagram_of_another_dump_is_ignored() -> None:
    keys: list[Key] = []
    result = decode_datagram(b"".join(tcp_messages(2)), SEQUENCE + 1, keys)
    assert keys == []
    assert result == DatagramResult()


def test_an_unpadded_last_message_is_read() -> None:
    first, second = tcp_messages(2)
    odd = second[:-2]  # the SHUTDOWN attribute's padding
    odd = struct.pack("=I", len(odd)) + odd[4:]
    keys, result = keys_of(first + odd)
    assert len(keys) == 2
    assert result.malformed == 0


def well_formed(key: Key) -> bool:
    state, ident, owner = key
    return 0 <= state < 256 and len(ident) == 36 and len(owner) == 8


@given(st.binary(max_size=600))
def test_garbage_never_raises(garbage: bytes) -> None:
    header = struct.pack("=IHHII", 16 + len(garbage), SOCK_DIAG_BY_FAMILY, 0, SEQUENCE, 0)
    for data in (garbage, header + garbage):
        keys, _ = keys_of(data)
        assert len(keys) <= len(data) // 88
        assert all(map(well_formed, keys))


@given(st.lists(st.tuples(st.integers(0, 399), st.integers(0, 255)), max_size=12))
def test_a_damaged_dump_never_raises(damage: list[tuple[int, int]]) -> None:
    intact = b"".join(tcp_messages(4)) + control(NLMSG_DONE, SEQUENCE)
    data = bytearray(intact)
    for position, value in damage:
        data[position % len(data)] = value
    keys, result = keys_of(bytes(data))
    assert len(keys) <= 4
    assert all(map(well_formed, keys))
    if data == intact:
        assert (len(keys), result) == (4, DatagramResult(done=True))


def test_the_reader_counts_what_it_skipped() -> None:
    def answer(table: str, sequence: int) -> list[bytes]:
        datagrams = dump(table, SOCKETS[table], sequence)
        if table == "tcp":  # a cut-off datagram before the real ones
            datagrams.insert(0, message(socket.AF_INET, SOCKETS["tcp"][0], sequence)[:60])
        return datagrams

    reader = SockDiagReader(connection=FakeDiag(answer))
    assert reader.read() == proc_records()
    assert reader.malformed == 1


# -- falling back to /proc/net ------------------------------------------------------------


def test_an_error_from_the_kernel_falls_back_to_proc_net(proc: FakeProc) -> None:
    def answer(table: str, sequence: int) -> list[bytes]:
        if table == "udp":  # no udp_diag module
            return [control(NLMSG_ERROR, sequence, -errno.ENOENT)]
        return dump(table, SOCKETS[table], sequence)

    connection = FakeDiag(answer)
    reader = SockDiagReader(f"{proc.path}/net", connection=connection)

    assert reader.read() == proc_records()
    assert reader.source == SOURCE_PROC_NET
    assert connection.closed
    reader.read()
    assert len(connection.requests) == 3  # tcp, tcp6, udp: never again


def test_a_dump_that_does_not_end_falls_back_to_proc_net(proc: FakeProc) -> None:
    endless = FakeDiag(lambda table, sequence: [])  # every recv: an empty datagram
    reader = SockDiagReader(f"{proc.path}/net", connection=endless, timeout=0.01)
    assert reader.read() == proc_records()
    assert reader.source == SOURCE_PROC_NET


def test_no_netlink_socket_falls_back_to_proc_net(
    proc: FakeProc, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refused(timeout: float) -> socket.socket:
        raise PermissionError(errno.EACCES, "sock_diag forbidden here")

    monkeypatch.setattr(sockdiag, "open_sock_diag", refused)
    reader = SockDiagReader(f"{proc.path}/net")
    assert reader.source == SOURCE_PROC_NET
    assert reader.read() == proc_records()
