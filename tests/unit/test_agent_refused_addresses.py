"""The agent's side of issue 17's report rules: addresses the controller refuses are
logged once per change and their flows left out of reports (so its batches are not
refused whole), and a renewal the controller left unanswered is asked for again."""

from __future__ import annotations

import asyncio
import logging
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

import agent.link
from agent.identity import AgentCredentials, Validity
from agent.link import ControllerLink
from agent.observe.model import Direction
from agent.observe.observer import Observed, Observer
from agent.observe.reports import FlowReports
from bulkhead.v1 import agent_pb2

HERE, TAKEN, PEER = "198.18.0.10", "198.18.0.11", "198.18.0.20"


def link(tmp_path: Path, observer: Observer | None = None) -> ControllerLink:
    return ControllerLink(
        "198.18.0.1:1", agent_id="web", state_dir=tmp_path, enforcer=None,  # type: ignore[arg-type]
        make_hello=agent_pb2.Hello, discover=list, heartbeat_interval=5, address_poll_interval=2,
        observer=observer,
    )  # fmt: skip


def connect(observer: Observer, local: str, port: int, at: float = 100.0) -> None:
    """One outbound connection from LOCAL to PEER's PORT, counted."""
    key = ("tcp", local, 40000, PEER, port)
    observer.connections_started([Observed(key, Direction.OUTBOUND, at)], {})
    observer.count_waiting(now=at + 1)


def refused(*pairs: tuple[str, str]) -> agent_pb2.ControllerMessage:
    notice = agent_pb2.AddressesRefused(
        refused=[agent_pb2.RefusedAddress(address=a, reason=r) for a, r in pairs]
    )
    return agent_pb2.ControllerMessage(addresses_refused=notice)


def test_flows_on_a_refused_address_are_left_out_and_the_refusal_logged_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    observer = Observer(lambda: [HERE, TAKEN])
    the_link = link(tmp_path, observer)
    connect(observer, HERE, 40000)
    connect(observer, TAKEN, 40001)  # pending when the notice comes
    notice = refused((TAKEN, "held by agent db"))

    async def handle(message: agent_pb2.ControllerMessage) -> None:
        await the_link._handle(message, asyncio.Queue())

    with caplog.at_level(logging.INFO, logger="agent.link"):
        asyncio.run(handle(notice))
        asyncio.run(handle(notice))  # the same again: nothing new to say
        connect(observer, TAKEN, 40002, at=110.0)  # after it: not counted
        connect(observer, HERE, 40003, at=110.0)
        reports = FlowReports(observer.table, epoch=1).to_send()
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert warnings == [
            "the controller refuses 1 of this host's addresses (peers do not get them and "
            "their flows are not reported): 198.18.0.11: held by agent db"
        ]
        assert the_link.refused_addresses == {TAKEN: "held by agent db"}
        assert {f.local_address for report in reports for f in report.flows} == {HERE}
        assert observer.flows_on_refused == 2
        # Lifted: an empty notice; flows on the address count again.
        asyncio.run(handle(refused()))
        connect(observer, TAKEN, 40004, at=120.0)
        assert [f.local_ip for f in observer.table.take(10)] == [TAKEN]
        assert "accepts all of this host's addresses again" in caplog.records[-1].getMessage()


def test_a_new_stream_starts_with_nothing_refused(tmp_path: Path) -> None:
    # The refusal was lifted while the agent was away (the holder went offline): the
    # controller sends a list only when there is one, so the old list must not outlive
    # the stream it came on.
    observer = Observer(lambda: [HERE, TAKEN])
    the_link = link(tmp_path, observer)
    asyncio.run(the_link._handle(refused((TAKEN, "held by agent db")), asyncio.Queue()))
    the_link._forget_refused()  # what each new stream begins with (_run_once)
    assert the_link.refused_addresses == {}
    connect(observer, TAKEN, 40005)
    assert [f.local_ip for f in observer.table.take(10)] == [TAKEN]


def test_refusing_keeps_the_other_pending_flows_in_their_order() -> None:
    observer = Observer(lambda: [HERE, TAKEN])
    for port, local in enumerate([HERE, TAKEN, HERE, TAKEN, HERE], start=1):
        connect(observer, local, port)
    assert observer.refuse_local([TAKEN]) == 2
    assert [(f.local_ip, f.port) for f in observer.table.take(10)] == [
        (HERE, 1),
        (HERE, 3),
        (HERE, 5),
    ]
    assert observer.table.dropped == 0, "nothing counted as dropped for room"


def test_a_renewal_left_unanswered_is_asked_for_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(agent.link, "RENEWAL_ANSWER_WAIT_S", 0.0)
    keys = iter(range(100))
    monkeypatch.setattr(
        agent.link, "new_key_and_csr", lambda _: (f"key{next(keys)}".encode(), b"csr")
    )
    now = datetime.now(UTC)  # three quarters of its life gone: due for renewal
    due = AgentCredentials(
        b"", b"", b"", Validity(now - timedelta(seconds=3), now + timedelta(seconds=1))
    )
    the_link = link(tmp_path)

    async def two_asks() -> list[bytes]:
        outbox: asyncio.Queue[agent_pb2.AgentMessage] = asyncio.Queue()
        renewals = asyncio.create_task(the_link._renewals(outbox, due))
        first = await asyncio.wait_for(outbox.get(), 10)
        first_key = the_link._renewal_key
        second = await asyncio.wait_for(outbox.get(), 10)  # no certificate came: again
        renewals.cancel()
        assert first.renew.csr_pem == second.renew.csr_pem == "csr"
        return [first_key or b"", the_link._renewal_key or b""]

    assert asyncio.run(two_asks()) == [b"key0", b"key1"]
