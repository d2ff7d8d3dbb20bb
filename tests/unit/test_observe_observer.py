"""The observer's counting: events, drops and snapshots become flows, each connection
once, a visibility-mode connection as would-deny only, the controller link never."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from dataclasses import dataclass

import pytest

from agent.observe import observer as observer_module
from agent.observe.model import Connection, Direction, ProcessInfo, Verdict
from agent.observe.observer import VERDICT_WAIT_S, Observed, Observer, _orient
from agent.observe.snapshot import FlowKey

HERE, PEER, CONTROLLER = "198.18.0.10", "198.18.0.11", "198.18.0.1"
CURL = ProcessInfo(7, "curl", "/usr/bin/curl", ("curl",), "root", 1.0, "")
OUT_KEY: FlowKey = ("tcp", HERE, 40000, PEER, 5432)
IN_KEY: FlowKey = ("tcp", HERE, 5432, PEER, 40000)


class Everyone(dict[FlowKey, ProcessInfo | None]):
    """Attribution that finds curl behind every flow."""

    def get(self, key: FlowKey, default: object = None) -> ProcessInfo | None:
        return CURL


CURL_EVERYWHERE = Everyone()


class FakeSnapshotter:
    def __init__(self, connections: list[Connection] | None = None) -> None:
        self.connections = connections or []

    def snapshot(self) -> list[Connection]:
        return self.connections

    def attribute(self, flows: Iterable[FlowKey]) -> dict[FlowKey, ProcessInfo | None]:
        return dict.fromkeys(flows, CURL)


@dataclass
class Event:
    protocol: str
    src: str
    sport: int
    dst: str
    dport: int
    timestamp: float = 100.0


def observer(snapshotter: FakeSnapshotter | None = None) -> Observer:
    return Observer(
        lambda: [HERE],
        snapshotter=snapshotter or FakeSnapshotter(),  # type: ignore[arg-type]
        clock=lambda: 200.0,
        ignore=[(CONTROLLER, 50151)],
    )


def test_a_new_connection_is_counted_after_the_verdict_wait_with_its_process() -> None:
    obs = observer()
    obs.connections_started([Observed(OUT_KEY, Direction.OUTBOUND, 100.0)], CURL_EVERYWHERE)
    obs.count_waiting(now=100.0 + VERDICT_WAIT_S / 2)
    assert len(obs.table) == 0, "not before the verdict wait"
    obs.count_waiting(now=100.0 + VERDICT_WAIT_S)
    [flow] = obs.table.take(10)
    assert (flow.direction, flow.port, flow.verdict, flow.process) == (
        Direction.OUTBOUND, 5432, Verdict.ALLOWED, CURL,
    )  # fmt: skip


def test_an_inbound_flow_is_keyed_by_the_local_service_port() -> None:
    obs = observer()
    obs.connections_started([Observed(IN_KEY, Direction.INBOUND, 100.0)], CURL_EVERYWHERE)
    obs.count_waiting(now=101.0)
    assert obs.table.take(1)[0].port == 5432


def test_a_would_deny_connection_counts_once_as_would_deny() -> None:
    obs = observer()
    obs.connections_started([Observed(OUT_KEY, Direction.OUTBOUND, 100.0)], CURL_EVERYWHERE)
    obs.packets_dropped(
        [(Observed(OUT_KEY, Direction.OUTBOUND, 100.1), Verdict.WOULD_DENY)], CURL_EVERYWHERE
    )
    obs.count_waiting(now=101.0)
    assert [f.verdict for f in obs.table.take(10)] == [Verdict.WOULD_DENY]
    assert obs.denied_packets == 1


def test_a_snapshot_counts_only_what_the_events_did_not() -> None:
    def connection(key: FlowKey, direction: Direction, state: str = "ESTABLISHED") -> Connection:
        protocol, local_ip, local_port, peer_ip, peer_port = key
        return Connection(
            protocol, state, local_ip, local_port, peer_ip, peer_port, direction, 1, 0, CURL
        )

    old: FlowKey = ("tcp", HERE, 41000, PEER, 22)
    snapshot = FakeSnapshotter(
        [
            connection(OUT_KEY, Direction.OUTBOUND),  # already counted from its event
            connection(old, Direction.OUTBOUND),  # older than the agent: new to us
            connection(("tcp", HERE, 80, "", 0), Direction.LISTEN, "LISTEN"),
            connection(("tcp", HERE, 42000, "127.0.0.1", 80), Direction.OUTBOUND),
            connection(("tcp", HERE, 43000, HERE, 80), Direction.OUTBOUND),
        ]
    )
    obs = observer(snapshot)
    obs.connections_started([Observed(OUT_KEY, Direction.OUTBOUND, 100.0)], CURL_EVERYWHERE)
    obs.count_waiting(now=101.0)
    obs.count_snapshot(snapshot.snapshot())
    obs.count_snapshot(snapshot.snapshot())  # a second snapshot counts nothing again
    assert sorted(f.port for f in obs.table.take(10)) == [22, 5432]
    assert obs.connections_seen == 2


def test_connections_gone_from_a_later_snapshot_are_forgotten_the_live_ones_kept() -> None:
    def established(key: FlowKey) -> Connection:
        protocol, local_ip, local_port, peer_ip, peer_port = key
        return Connection(
            protocol, "ESTABLISHED", local_ip, local_port, peer_ip, peer_port,
            Direction.OUTBOUND, 1, 0, CURL,
        )  # fmt: skip

    short = [("tcp", HERE, port, PEER, 80) for port in range(50000, 50100)]
    snapshot = FakeSnapshotter([established(OUT_KEY)])
    obs = observer(snapshot)  # its clock says 200.0
    for key in [OUT_KEY, *short]:
        obs.connections_started([Observed(key, Direction.OUTBOUND, 100.0)], CURL_EVERYWHERE)
    obs.count_waiting(now=199.0)  # remembered at 199.0
    assert obs.remembered == 101
    obs.count_snapshot(snapshot.snapshot(), taken_at=199.0)  # read as they were counted
    assert obs.remembered == 101, "the tables may have been read before they closed"
    obs.count_snapshot(snapshot.snapshot(), taken_at=199.5)
    assert obs.remembered == 1, "the short connections are gone"
    obs.count_snapshot(snapshot.snapshot(), taken_at=300.0)
    assert obs.remembered == 1, "the live one stays remembered"
    assert obs.connections_seen == 101, "and is not counted again"


def test_the_controller_link_is_not_a_flow() -> None:
    obs = observer()
    key: FlowKey = ("tcp", HERE, 40001, CONTROLLER, 50151)
    obs.connections_started([Observed(key, Direction.OUTBOUND, 100.0)], CURL_EVERYWHERE)
    obs.count_waiting(now=101.0)
    assert len(obs.table) == 0


def test_every_connection_event_counts_even_on_a_reused_five_tuple() -> None:
    obs = observer()
    for at in (100.0, 101.0):
        obs.connections_started([Observed(OUT_KEY, Direction.OUTBOUND, at)], CURL_EVERYWHERE)
        obs.count_waiting(now=at + 1)
    assert obs.table.take(1)[0].count == 2


def test_events_wait_for_the_tick_and_are_attributed_off_the_loop() -> None:
    obs = observer()
    obs._queue(obs._started, Observed(OUT_KEY, Direction.OUTBOUND, 100.0))
    assert len(obs.table) == 0
    asyncio.run(obs._attribute_pending())
    obs.count_waiting(now=101.0)
    assert obs.table.take(1)[0].process == CURL


def test_a_flood_beyond_the_pending_bound_is_counted_not_kept(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(observer_module, "MAX_PENDING_EVENTS", 2)
    obs = observer()
    for _ in range(5):
        obs._queue(obs._started, Observed(OUT_KEY, Direction.OUTBOUND, 100.0))
    assert (len(obs._started), obs.events_lost) == (2, 3)


def test_denied_packets_count_as_packets_at_once() -> None:
    obs = observer()
    syn = Observed(IN_KEY, Direction.INBOUND, 100.0)
    obs.packets_dropped([(syn, Verdict.DENIED), (syn, Verdict.DENIED)], CURL_EVERYWHERE)
    [flow] = obs.table.take(10)
    assert (flow.verdict, flow.count) == (Verdict.DENIED, 2)


def test_orientation_of_events() -> None:
    local = {HERE}
    out = _orient(local, Event("tcp", HERE, 40000, PEER, 5432))
    assert out is not None
    assert (out.direction, out.key) == (Direction.OUTBOUND, OUT_KEY)
    inbound = _orient(local, Event("tcp", PEER, 40000, HERE, 5432))
    assert inbound is not None
    assert (inbound.direction, inbound.key) == (Direction.INBOUND, IN_KEY)
    icmp = _orient(local, Event("icmpv6", "2001:db8::2", 0, HERE, 0))
    assert icmp is not None
    assert icmp.key[0] == "icmp"
    assert _orient(local, Event("tcp", "127.0.0.1", 1, "127.0.0.1", 2)) is None
    assert _orient(local, Event("gre", PEER, 0, HERE, 0)) is None
    assert _orient(local, Event("tcp", "198.18.0.99", 1, PEER, 2)) is None, "not ours"


def test_a_taken_nflog_group_or_missing_conntrack_leaves_the_agent_running(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from agent import netlink
    from agent.observe import ctevents, nflog

    def taken(*_: object, **__: object) -> None:
        raise netlink.NetlinkError("binding NFLOG group 1001 (is another logger on it?)", 1)

    def missing(*_: object, **__: object) -> None:
        raise OSError(93, "Protocol not supported")

    monkeypatch.setattr(nflog.NflogListener, "__init__", taken)
    monkeypatch.setattr(ctevents.ConntrackListener, "__init__", missing)
    obs = observer()
    loop = asyncio.new_event_loop()
    try:
        obs.start(loop)  # logs both problems, raises neither
        assert obs.lost_events() == 0
    finally:
        obs.close(loop)
        loop.close()
