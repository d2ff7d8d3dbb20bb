"""The conntrack mirror on recorded events: it follows new and destroyed entries after one
dump, and dumps again whenever its copy cannot be trusted."""

from __future__ import annotations

import errno
import socket
from collections import deque
from pathlib import Path

import pytest

from agent import netlink
from agent.dataplane.conntrack_mirror import ConntrackMirror
from agent.netlink import ctnetlink


def entry(port: int, zone: int = 0) -> ctnetlink.Entry:
    orig = ctnetlink.Tuple(4, socket.IPPROTO_TCP, "198.18.0.1", "198.18.0.2", 40000, port)
    return ctnetlink.Entry(orig, zone)


def event(msg_type: int, item: ctnetlink.Entry) -> bytes:
    attributes = ctnetlink.encode_tuple(ctnetlink.CTA_TUPLE_ORIG, item.orig)
    if item.zone:
        attributes += netlink.attribute(ctnetlink.CTA_ZONE, item.zone.to_bytes(2, "big"))
    return netlink.nfnl_message(
        msg_type, flags=0, sequence=0, family=socket.AF_INET, res_id=0, attributes=attributes
    )


def new(item: ctnetlink.Entry) -> bytes:
    return event(ctnetlink.NEW_TYPE, item)


def destroyed(item: ctnetlink.Entry) -> bytes:
    return event(ctnetlink.DELETE_TYPE, item)


class Events:
    """The subscribed socket: queued datagrams, and an overrun flag as the kernel sets it."""

    def __init__(self) -> None:
        self.queue: deque[bytes] = deque()
        self.overrun = False
        self.closed = False

    def recv(self, _size: int) -> bytes:
        if self.overrun:
            self.overrun = False
            raise OSError(errno.ENOBUFS, "No buffer space available")
        if not self.queue:
            raise BlockingIOError
        return self.queue.popleft()

    def close(self) -> None:
        self.closed = True


class Kernel:
    """The table a dump returns; a dump may see events queued while it runs."""

    def __init__(self, events: Events) -> None:
        self.table: set[ctnetlink.Entry] = set()
        self.during_dump: list[bytes] = []
        self._events = events

    def dump(self) -> list[ctnetlink.Entry]:
        self._events.queue.extend(self.during_dump)
        self.during_dump = []
        return sorted(self.table, key=lambda e: e.orig.dport)


@pytest.fixture
def sysctl(tmp_path: Path) -> Path:
    path = tmp_path / "nf_conntrack_events"
    path.write_text("2\n")
    return path


def mirror_of(events: Events, kernel: Kernel, sysctl: Path, **kw: int) -> ConntrackMirror:
    return ConntrackMirror(
        dump=kernel.dump,
        subscribe=lambda: events,  # type: ignore[arg-type,return-value]
        events_sysctl=sysctl,
        **kw,
    )


def test_one_dump_then_new_and_destroyed_entries_from_events(sysctl: Path) -> None:
    events = Events()
    kernel = Kernel(events)
    kernel.table = {entry(1), entry(2)}
    mirror = mirror_of(events, kernel, sysctl)
    assert mirror.entries() == {entry(1), entry(2)}
    events.queue.extend([new(entry(3)) + new(entry(4, zone=5)), destroyed(entry(1))])
    assert mirror.entries() == {entry(2), entry(3), entry(4, zone=5)}
    assert mirror.entries() == {entry(2), entry(3), entry(4, zone=5)}
    assert mirror.dumps == 1


def test_what_changes_during_the_dump_is_applied_after_it(sysctl: Path) -> None:
    events = Events()
    kernel = Kernel(events)
    kernel.table = {entry(1), entry(2)}
    # Entry 1 ends after the dump listed it; entry 3 starts after the dump passed its place;
    # an event of before the dump repeats what the dump saw.
    events.queue.append(new(entry(2)))
    kernel.during_dump = [destroyed(entry(1)), new(entry(3))]
    mirror = mirror_of(events, kernel, sysctl)
    assert mirror.entries() == {entry(2), entry(3)}


def test_dropped_events_make_it_dump_again(sysctl: Path) -> None:
    events = Events()
    kernel = Kernel(events)
    mirror = mirror_of(events, kernel, sysctl)
    mirror.entries()
    kernel.table = {entry(7)}  # its NEW event is lost in the overrun
    events.overrun = True
    events.queue.append(new(entry(8)))  # worthless now: thrown away, the dump decides
    assert mirror.entries() == {entry(7)}
    assert mirror.dumps == 2
    assert events.queue == deque()


def test_a_message_that_does_not_decode_makes_it_dump_again(sysctl: Path) -> None:
    events = Events()
    kernel = Kernel(events)
    mirror = mirror_of(events, kernel, sysctl)
    mirror.entries()
    kernel.table = {entry(9)}
    broken = new(entry(9))
    events.queue.append(broken[:-8])
    assert mirror.entries() == {entry(9)}
    assert mirror.dumps == 2


def test_a_table_bigger_than_it_keeps_is_dumped_every_time(sysctl: Path) -> None:
    events = Events()
    kernel = Kernel(events)
    kernel.table = {entry(port) for port in range(1, 4)}
    mirror = mirror_of(events, kernel, sysctl, max_entries=3)
    assert len(mirror.entries()) == 3
    events.queue.append(new(entry(4)))
    kernel.table.add(entry(4))
    assert len(mirror.entries()) == 4
    assert len(mirror.entries()) == 4
    assert mirror.dumps == 3


def test_without_conntrack_events_it_always_dumps(sysctl: Path) -> None:
    events = Events()
    kernel = Kernel(events)
    mirror = mirror_of(events, kernel, sysctl)
    mirror.entries()
    sysctl.write_text("0\n")  # the kernel sends nothing: the copy would go stale silently
    kernel.table = {entry(5)}
    assert mirror.entries() == {entry(5)}
    assert mirror.entries() == {entry(5)}
    assert (mirror.dumps, events.closed) == (3, True)


def test_the_thorough_cut_ends_the_subscription_until_the_next_burst(
    sysctl: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import agent.dataplane.conntrack_mirror as module
    from agent.dataplane.baseline import Baseline, Mode
    from bulkhead.v1 import ruleset_pb2

    thorough: list[object] = []

    def full_dump_cut(*args: object) -> int:
        thorough.append(args)
        return 0

    monkeypatch.setattr(module, "cut_disallowed", full_dump_cut)
    events = Events()
    kernel = Kernel(events)
    mirror = mirror_of(events, kernel, sysctl)
    mirror.entries()
    mirror.thorough_cut(ruleset_pb2.Ruleset(), Baseline(Mode.ENFORCE), [])
    # Between bursts the kernel builds no events for it; the next cut starts afresh.
    assert (len(thorough), events.closed) == (1, True)
    kernel.table = {entry(6)}
    assert mirror.entries() == {entry(6)}
    assert mirror.dumps == 2
