"""The socket tables of /proc/net, parsed from golden text (sockets.py), and snapshots
made from them (snapshot.py) over a directory laid out like /proc."""

from __future__ import annotations

import dataclasses
import gc
import os
import sys
import threading
from pathlib import Path

import pytest

from agent.observe import owners as owners_module
from agent.observe.model import Connection, Direction, ProcessInfo
from agent.observe.processes import ProcessCache
from agent.observe.snapshot import (
    SocketSnapshotter,
    direction,
    directions,
    listening_ports,
    make_connections,
)
from agent.observe.sockets import (
    TABLES,
    SocketRecord,
    SocketTableReader,
    address_text,
    parse_table,
)
from tests.unit.test_observe_processes import FakeProc

# The fixtures print addresses the way a little-endian machine does.
pytestmark = pytest.mark.skipif(sys.byteorder != "little", reason="little-endian /proc text")

TCP, TCP6, UDP, UDP6 = TABLES

TCP_TEXT = """\
  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000:0016 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 20613 1 0000000000000000 100 0 0 10 0
   1: 0100007F:1538 00000000:0000 0A 00000000:00000000 00:00000000 00000000   108        0 31254 1 0000000000000000 100 0 0 10 0
   2: 0100007F:1538 0100007F:C5A2 01 00000000:00000000 00:00000000 00000000   108        0 44871 1 0000000000000000 20 4 30 10 -1
   3: 0100007F:C5A2 0100007F:1538 01 00000000:00000000 02:000A7D4C 00000000  1000        0 44870 2 0000000000000000 20 4 28 10 -1
   4: 0A0012C6:0016 0B0012C6:D431 06 00000000:00000000 03:00001770 00000000     0        0 0 3 0000000000000000
   5: 0A0012C6:8F2C 0B0012C6:01BB 02 00000000:00000000 01:00000064 00000001  1000        0 44990 2 0000000000000000 200 0 0 10 -1
"""  # noqa: E501  (the kernel's lines)

TCP6_TEXT = """\
  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000000000000000000000000000:0050 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000    33        0 30001 1 0000000000000000 100 0 0 10 0
   1: B80D0120000000000000000001000000:0050 B80D0120000000000000000002000000:E2A4 01 00000000:00000000 00:00000000 00000000    33        0 30002 1 0000000000000000 20 4 31 10 -1
   2: 0000000000000000FFFF00000A0012C6:0050 0000000000000000FFFF00000B0012C6:D432 01 00000000:00000000 00:00000000 00000000    33        0 30003 1 0000000000000000 20 4 31 10 -1
   3: 00000000000000000000000001000000:A1B2 00000000000000000000000001000000:1F90 08 00000001:00000000 00:00000000 00000000  1000        0 30004 1 0000000000000000 20 4 31 10 -1
"""  # noqa: E501

UDP_TEXT = """\
   sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode ref pointer drops
  130: 00000000:0035 00000000:0000 07 00000000:00000000 00:00000000 00000000   101        0 15120 2 0000000000000000 0
  513: 0A0012C6:8D5E 010012C6:0035 01 00000000:00000000 00:00000000 00000000  1000        0 40001 2 0000000000000000 0
"""  # noqa: E501

UDP6_TEXT = """\
   sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode ref pointer drops
  131: 00000000000000000000000001000000:0202 00000000000000000000000000000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 15200 2 0000000000000000 0
"""  # noqa: E501


def test_tcp_lines_become_records_and_time_wait_is_left_out() -> None:
    assert parse_table(TCP, TCP_TEXT.encode()) == [
        SocketRecord("tcp", "0.0.0.0", 22, "", 0, "LISTEN", 0, 20613),
        SocketRecord("tcp", "127.0.0.1", 5432, "", 0, "LISTEN", 108, 31254),
        SocketRecord("tcp", "127.0.0.1", 5432, "127.0.0.1", 50594, "ESTABLISHED", 108, 44871),
        SocketRecord("tcp", "127.0.0.1", 50594, "127.0.0.1", 5432, "ESTABLISHED", 1000, 44870),
        SocketRecord("tcp", "198.18.0.10", 36652, "198.18.0.11", 443, "SYN_SENT", 1000, 44990),
    ]


def test_tcp6_addresses_are_compressed_and_ipv4_mapped_ones_are_ipv4() -> None:
    assert parse_table(TCP6, TCP6_TEXT.encode()) == [
        SocketRecord("tcp", "::", 80, "", 0, "LISTEN", 33, 30001),
        SocketRecord("tcp", "2001:db8::1", 80, "2001:db8::2", 58020, "ESTABLISHED", 33, 30002),
        SocketRecord("tcp", "198.18.0.10", 80, "198.18.0.11", 54322, "ESTABLISHED", 33, 30003),
        SocketRecord("tcp", "::1", 41394, "::1", 8080, "CLOSE_WAIT", 1000, 30004),
    ]


def test_udp_sockets_are_unconnected_or_connected() -> None:
    assert parse_table(UDP, UDP_TEXT.encode()) == [
        SocketRecord("udp", "0.0.0.0", 53, "", 0, "UNCONN", 101, 15120),
        SocketRecord("udp", "198.18.0.10", 36190, "198.18.0.1", 53, "ESTABLISHED", 1000, 40001),
    ]
    assert parse_table(UDP6, UDP6_TEXT.encode()) == [
        SocketRecord("udp", "::1", 514, "", 0, "UNCONN", 0, 15200),
    ]


@pytest.mark.parametrize(
    ("hex_address", "text"),
    [
        (b"0100007F", "127.0.0.1"),
        (b"00000000", "0.0.0.0"),
        (b"FFFFFFFF", "255.255.255.255"),
        (b"00000000000000000000000001000000", "::1"),
        (b"B80D0120000000000000000001000000", "2001:db8::1"),
        (b"B80D012000000100000000000000ABCD", "2001:db8:1::cdab:0"),
        (b"000080FE00000000FF2F0002FE0CD87F", "fe80::200:2fff:7fd8:cfe"),
        (b"0000000000000000FFFF00000100007F", "127.0.0.1"),
        (b"0000000000000000FFFF000000000000", "0.0.0.0"),
    ],
)
def test_address_text(hex_address: bytes, text: str) -> None:
    assert address_text(hex_address) == text


@pytest.mark.parametrize("hex_address", [b"0100007", b"0100007G", b"0100007F00", b""])
def test_a_bad_address_is_an_error_naming_it(hex_address: bytes) -> None:
    with pytest.raises(ValueError, match="address"):
        address_text(hex_address)


@pytest.mark.parametrize(
    "line",
    [
        "   0: 0100007F:1538 00000000:0000 0A",  # cut short
        "   0: 0100007F-1538 00000000:0000 0A 00000000:00000000 00:00000000 00000000 0 0 7 1",
        "   0: 0100007F:1538 00000000:0000 0A 00000000:00000000 00:00000000 00000000 x 0 7 1",
        "garbage that is not a socket line at all, but has enough words in it to split",
    ],
)
def test_a_malformed_line_is_an_error_naming_the_table(line: str) -> None:
    with pytest.raises(ValueError, match=r"/proc/net/tcp: .*"):
        parse_table(TCP, f"header\n{line}\n".encode())


def test_an_unknown_state_code_is_kept_visible() -> None:
    text = TCP_TEXT.splitlines()[0] + "\n" + TCP_TEXT.splitlines()[1].replace(" 0A ", " 0E ")
    [record] = parse_table(TCP, text.encode())
    assert record.state == "UNKNOWN_0E"


# -- the reader -----------------------------------------------------------------------


def write_tables(proc: FakeProc, *, tcp: str = TCP_TEXT) -> None:
    proc.table("tcp", tcp)
    proc.table("tcp6", TCP6_TEXT)
    proc.table("udp", UDP_TEXT)  # and no udp6: IPv6 UDP missing is not an error


@pytest.fixture
def proc(tmp_path: Path) -> FakeProc:
    return FakeProc(tmp_path / "proc")


def test_reader_reads_every_table_in_order(proc: FakeProc) -> None:
    write_tables(proc)
    reader = SocketTableReader(f"{proc.path}/net")
    records = reader.read()
    expected = [
        *parse_table(TCP, TCP_TEXT.encode()),
        *parse_table(TCP6, TCP6_TEXT.encode()),
        *parse_table(UDP, UDP_TEXT.encode()),
    ]
    assert records == expected
    assert reader.fresh == expected


def test_reader_gives_back_the_same_records_for_lines_it_has_seen(proc: FakeProc) -> None:
    write_tables(proc)
    reader = SocketTableReader(f"{proc.path}/net")
    before = {record.inode: record for record in reader.read()}
    header, listen_22, _, _, client, _, syn_sent = TCP_TEXT.splitlines()
    # The 5432 sockets are gone, so the rows after them are renumbered; the client's
    # timer moved; a new socket came.
    moved = client.replace("   3:", "   1:").replace("02:000A7D4C", "02:000A7C00")
    new = "   3: 0100007F:1538 0100007F:C5A4 01 00000000:00000000 00:00000000 00000000   108        0 44999 1 0000000000000000 20 4 30 10 -1"  # noqa: E501
    renumbered = syn_sent.replace("   5:", "   2:")
    proc.table("tcp", "\n".join([header, listen_22, moved, renumbered, new, ""]))

    after = {record.inode: record for record in reader.read()}

    assert set(after) == set(before) - {31254, 44871} | {44999}
    assert all(after[inode] is before[inode] for inode in set(after) - {44999})
    assert [record.inode for record in reader.fresh] == [44870, 44999]
    assert reader.fresh[0] is before[44870]  # re-read, not re-made
    reader.read()
    assert reader.fresh == []


# -- snapshots over a fake /proc ------------------------------------------------------


def describe(pid: int) -> ProcessInfo:
    return ProcessInfo(pid, f"p{pid}", f"/usr/bin/p{pid}", (f"p{pid}",), "app", 1.0, "")


def snapshotter_at(proc: FakeProc) -> SocketSnapshotter:
    return SocketSnapshotter(proc.path, processes=ProcessCache(proc.path, describe=describe))


def own(proc: FakeProc, pid: int, *inodes: int) -> None:
    proc.process(pid)
    for fd, inode in enumerate(inodes, start=3):
        proc.socket(pid, fd, inode)


@pytest.fixture
def host(proc: FakeProc) -> FakeProc:
    """sshd (100), postgres (200) and its client (300), a web server (400), a resolver
    (500); the SYN_SENT socket's process (600) is hidden from us."""
    write_tables(proc)
    own(proc, 100, 20613)
    own(proc, 200, 31254, 44871)
    own(proc, 300, 44870, 30004, 40001)
    own(proc, 400, 30001, 30002, 30003)
    own(proc, 500, 15120)
    return proc


def summary(snapshotter: SocketSnapshotter) -> dict[int, tuple[Direction, int, int | None]]:
    """inode -> direction, service port, pid."""
    return {
        c.inode: (c.direction, c.service_port, c.process.pid if c.process else None)
        for c in snapshotter.snapshot()
    }


def test_snapshot_classifies_directions_and_names_processes(host: FakeProc) -> None:
    snapshotter = snapshotter_at(host)
    assert summary(snapshotter) == {
        20613: (Direction.LISTEN, 22, 100),
        31254: (Direction.LISTEN, 5432, 200),
        44871: (Direction.INBOUND, 5432, 200),  # accepted by the 127.0.0.1:5432 listener
        44870: (Direction.OUTBOUND, 5432, 300),
        44990: (Direction.OUTBOUND, 443, None),
        30001: (Direction.LISTEN, 80, 400),
        30002: (Direction.INBOUND, 80, 400),
        30003: (Direction.INBOUND, 80, 400),  # IPv4 into the dual-stack [::]:80 listener
        30004: (Direction.OUTBOUND, 8080, 300),
        15120: (Direction.LISTEN, 53, 500),
        40001: (Direction.OUTBOUND, 53, 300),
    }
    [postgres] = [c for c in snapshotter.snapshot() if c.inode == 44871]
    assert postgres.process == describe(200)
    assert (postgres.uid, postgres.state, postgres.peer_ip) == (108, "ESTABLISHED", "127.0.0.1")


def test_snapshot_follows_changes(host: FakeProc) -> None:
    snapshotter = snapshotter_at(host)
    first = snapshotter.snapshot()
    assert snapshotter.snapshot() == first
    lines = TCP_TEXT.splitlines()
    # The client closed 44870 and reconnected on the same fd: 44995; postgres accepted
    # it as 44996 on the fd of 44871, which it had closed.
    accepted = lines[3].replace(":C5A2", ":C5B0").replace("44871", "44996")
    client = lines[4].replace(":C5A2", ":C5B0").replace("44870", "44995")
    host.table("tcp", "\n".join([*lines[:3], accepted, client, *lines[5:], ""]))
    host.socket(300, 3, 44995)
    host.socket(200, 4, 44996)

    now = summary(snapshotter)

    assert now[44995] == (Direction.OUTBOUND, 5432, 300)
    assert now[44996] == (Direction.INBOUND, 5432, 200)
    assert now[44990] == (Direction.OUTBOUND, 443, None)  # still no process we can see
    assert not {44870, 44871} & set(now)
    assert len(now) == len(first)
    assert summary(snapshotter_at(host)) == now  # what a cold snapshot sees


def test_a_socket_that_changes_state_is_seen_in_its_new_state(host: FakeProc) -> None:
    snapshotter = snapshotter_at(host)
    snapshotter.snapshot()
    # postgres hung up: its client's socket is in CLOSE_WAIT until the client closes it.
    host.table(
        "tcp",
        TCP_TEXT.replace(
            "0100007F:1538 01 00000000:00000000 02:", "0100007F:1538 08 00000000:00000000 00:"
        ),
    )

    [client] = [c for c in snapshotter.snapshot() if c.inode == 44870]

    assert (client.state, client.direction, client.process) == (
        "CLOSE_WAIT",
        Direction.OUTBOUND,
        describe(300),
    )


def test_a_new_listener_turns_connections_on_its_port_inbound(host: FakeProc) -> None:
    snapshotter = snapshotter_at(host)
    assert summary(snapshotter)[40001][0] is Direction.OUTBOUND
    # Something now serves UDP 198.18.0.10:36190, the port 40001 sends from.
    listener = "  600: 0A0012C6:8D5E 00000000:0000 07 00000000:00000000 00:00000000 00000000  1000        0 40002 2 0000000000000000 0"  # noqa: E501
    host.table("udp", UDP_TEXT + listener + "\n")
    own(host, 700, 40002)

    now = summary(snapshotter)

    assert now[40001] == (Direction.INBOUND, 36190, 300)
    assert now[40002] == (Direction.LISTEN, 36190, 700)
    # It connect()s to a peer of its own: nothing serves the port any more.
    connected = listener.replace("00000000:0000 07", "030012C6:0035 01")
    host.table("udp", UDP_TEXT + connected + "\n")
    assert summary(snapshotter)[40001] == (Direction.OUTBOUND, 53, 300)


def test_a_process_gone_leaves_its_shared_socket_to_the_other_holder(host: FakeProc) -> None:
    snapshotter = snapshotter_at(host)
    assert summary(snapshotter)[31254][2] == 200
    own(host, 201, 31254)  # a worker postgres forked
    host.end(200)
    host.table("tcp", TCP_TEXT.replace("44871", "0"))  # its connection closed with it

    now = summary(snapshotter)

    assert now[31254] == (Direction.LISTEN, 5432, 201)
    assert 44871 not in now


def test_attribute_finds_the_flows_process_or_the_one_serving_its_port(host: FakeProc) -> None:
    snapshotter = snapshotter_at(host)
    flows = [
        ("tcp", "127.0.0.1", 50594, "127.0.0.1", 5432),  # the client's socket
        ("tcp", "127.0.0.1", 5432, "127.0.0.1", 50594),  # postgres's accepted socket
        ("tcp", "198.18.0.10", 22, "198.18.0.99", 40000),  # closed already: sshd listens
        ("tcp", "198.18.0.10", 80, "198.18.0.99", 40001),  # into [::]:80
        ("udp", "198.18.0.10", 53, "198.18.0.99", 5353),  # answered by 0.0.0.0:53
        ("tcp", "198.18.0.10", 41000, "198.18.0.99", 443),  # gone, nothing listens there
        ("udp", "::1", 53, "::1", 5353),  # the UDP listener is IPv4 only
    ]
    processes = snapshotter.attribute(iter(flows))
    assert {flow: info.pid if info else None for flow, info in processes.items()} == {
        flows[0]: 300,
        flows[1]: 200,
        flows[2]: 100,
        flows[3]: 400,
        flows[4]: 500,
        flows[5]: None,
        flows[6]: None,
    }
    assert snapshotter.lookup(*flows[0]) == describe(300)


def test_a_snapshot_after_lookups_sees_what_they_read(host: FakeProc) -> None:
    snapshotter = snapshotter_at(host)
    snapshotter.snapshot()
    new = "   6: 0100007F:1538 0100007F:C5A4 01 00000000:00000000 00:00000000 00000000   108        0 44999 1 0000000000000000 20 4 30 10 -1"  # noqa: E501
    host.table("tcp", TCP_TEXT + new + "\n")
    host.socket(200, 9, 44999)
    assert snapshotter.lookup("tcp", "127.0.0.1", 5432, "127.0.0.1", 50596) == describe(200)

    assert summary(snapshotter)[44999] == (Direction.INBOUND, 5432, 200)


def test_connections_made_column_by_column_are_connections() -> None:
    rows = [
        ("tcp", "LISTEN", "0.0.0.0", 22, "", 0, Direction.LISTEN, 20613, 0, describe(100)),
        ("udp", "ESTABLISHED", "::1", 5353, "::1", 53, Direction.OUTBOUND, 15, 1000, None),
    ]
    names = [field.name for field in dataclasses.fields(Connection)]
    columns = {
        name: list(column) for name, column in zip(names, zip(*rows, strict=True), strict=True)
    }

    made = make_connections(**columns)

    assert made == [Connection(*row) for row in rows]
    assert [type(connection) for connection in made] == [Connection, Connection]
    with pytest.raises(dataclasses.FrozenInstanceError):
        made[0].state = "CLOSE"  # type: ignore[misc]
    with pytest.raises(ValueError, match="column uid: 1 values for 2"):
        make_connections(**(columns | {"uid": [0]}))
    with pytest.raises(ValueError, match="not the fields of Connection"):
        make_connections(**{name: column for name, column in columns.items() if name != "uid"})


def test_a_cold_snapshot_on_two_threads_is_the_one_on_one(host: FakeProc) -> None:
    two = snapshotter_at(host)
    one = SocketSnapshotter(
        host.path, processes=ProcessCache(host.path, describe=describe), overlap=False
    )
    assert sorted(two.snapshot(), key=_by_inode) == sorted(one.snapshot(), key=_by_inode)


def _by_inode(connection: Connection) -> int:
    return connection.inode


class _BrokenOnce:
    """A socket source whose first read fails (on the helper thread, beside the fd scan)."""

    def __init__(self, proc: FakeProc, *, fail_first: bool = True) -> None:
        self._reader = SocketTableReader(f"{proc.path}/net")
        self._reads = 0 if fail_first else 1
        self.fresh: list[SocketRecord] = []
        self.threads: list[str] = []

    def read(self) -> list[SocketRecord]:
        self._reads += 1
        self.threads.append(threading.current_thread().name)
        if self._reads == 1:
            raise RuntimeError("the table read broke")
        records = self._reader.read()
        self.fresh = self._reader.fresh
        return records


def test_an_error_beside_the_fd_scan_reaches_the_caller_and_the_next_snapshot_is_whole(
    host: FakeProc,
) -> None:
    source = _BrokenOnce(host)
    snapshotter = SocketSnapshotter(
        host.path, processes=ProcessCache(host.path, describe=describe), sockets=source
    )
    with pytest.raises(RuntimeError, match="the table read broke"):
        snapshotter.snapshot()

    assert summary(snapshotter) == summary(snapshotter_at(host))
    assert source.threads[0] != threading.current_thread().name  # it was read beside
    assert source.threads[1] != threading.current_thread().name  # the scan was retried


def test_a_cold_snapshot_reads_every_fd_on_the_callers_thread_and_the_tables_beside(
    host: FakeProc, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Two threads sharing the fd scan were slower than one: each readlink handed the GIL
    # over. Only the table dump, mostly spent waiting in recv(), goes to the helper.
    readers: set[str] = set()
    real = owners_module.read_all_fds

    def read_all_fds(proc: str, pid: int) -> dict[str, int] | None:
        readers.add(threading.current_thread().name)
        return real(proc, pid)

    monkeypatch.setattr(owners_module, "read_all_fds", read_all_fds)
    source = _BrokenOnce(host, fail_first=False)  # it notes the thread of each read
    snapshotter = SocketSnapshotter(
        host.path, processes=ProcessCache(host.path, describe=describe), sockets=source
    )

    assert summary(snapshotter) == summary(snapshotter_at(host))
    assert readers == {threading.current_thread().name}
    assert source.threads[0] != threading.current_thread().name


def test_a_cold_snapshot_pauses_the_collector_and_leaves_it_as_it_found_it(
    host: FakeProc, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[bool] = []
    real = ProcessCache.get

    def get(cache: ProcessCache, pid: int) -> ProcessInfo | None:
        seen.append(gc.isenabled())
        return real(cache, pid)

    monkeypatch.setattr(ProcessCache, "get", get)
    snapshotter = snapshotter_at(host)
    snapshotter.snapshot()
    assert seen
    assert not any(seen)  # paused while the connections were made
    assert gc.isenabled()
    gc.disable()
    try:
        snapshotter_at(host).snapshot()
        assert not gc.isenabled()  # someone else's pause is not ended
    finally:
        gc.enable()


def test_directions_of_columns_are_those_of_each_record() -> None:
    records = [
        SocketRecord("tcp", "0.0.0.0", 22, "", 0, "LISTEN", 0, 1),
        SocketRecord("tcp", "::", 80, "", 0, "LISTEN", 0, 2),
        SocketRecord("tcp", "127.0.0.1", 5432, "", 0, "LISTEN", 0, 3),
        SocketRecord("udp", "0.0.0.0", 53, "", 0, "UNCONN", 0, 4),
    ]
    for protocol in ("tcp", "udp"):
        for local_ip in ("198.18.0.10", "127.0.0.1", "2001:db8::1", "::1"):
            for port in (22, 53, 80, 5432, 40000):
                records.append(
                    SocketRecord(protocol, local_ip, port, "198.18.0.99", 1, "ESTABLISHED", 0, 9)
                )
    listeners = listening_ports(records)
    columns = list(zip(*records, strict=True))

    assert directions(columns[0], columns[1], columns[2], columns[3], listeners) == [
        direction(record, listeners) for record in records
    ]


def test_on_one_core_the_tables_are_read_on_the_callers_thread(
    host: FakeProc, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0})
    source = _BrokenOnce(host)
    snapshotter = SocketSnapshotter(
        host.path, processes=ProcessCache(host.path, describe=describe), sockets=source
    )
    with pytest.raises(RuntimeError, match="the table read broke"):
        snapshotter.snapshot()
    assert source.threads == [threading.current_thread().name]
