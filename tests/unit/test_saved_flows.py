"""Flows an agent had not got stored survive its restart: saved in its state dir (bounded),
loaded at start and sent first with their own epoch and sequence."""

from __future__ import annotations

import asyncio
import json
import logging
import sqlite3
from pathlib import Path
from typing import Any, cast

import pytest

from agent.link import ControllerLink
from agent.observe.flows import FlowRecord, FlowTable
from agent.observe.model import Direction, ProcessInfo, Verdict
from agent.observe.observer import Observer
from agent.observe.saved_flows import (
    FLOWS_FILE,
    FlowKeeper,
    SavedFlows,
    SavedFlowsCorrupt,
    decode,
    encode,
    flow_record,
)
from agent.observe.wire import flow_message
from bulkhead.v1 import agent_pb2
from controller.store.flow_store import FlowStore, ReportId, StoredFlow

AGENT = "web-1"
PROCESS = ProcessInfo(
    4242, "psql", "/usr/bin/psql", ("psql", "-h", "db"), "app", 1.5, "app.service"
)


def record(i: int, process: ProcessInfo | None = None) -> FlowRecord:
    return FlowRecord(
        Direction.OUTBOUND, "198.18.0.10", f"198.18.1.{i}", 5432, "tcp", Verdict.ALLOWED,
        process, 1 + i, 10.0 + i, 20.25 + i,
    )  # fmt: skip


def filled(flows: int, capacity: int = 100) -> FlowTable:
    table = FlowTable(capacity)
    for i in range(flows):
        table.add(record(i, PROCESS if i % 2 else None))
    return table


def peers(reports: list[agent_pb2.FlowReport]) -> list[list[str]]:
    return [[f.peer_address for f in report.flows] for report in reports]


def test_a_stopped_agents_reports_and_queue_come_back_and_its_reports_go_first(
    tmp_path: Path,
) -> None:
    table = filled(9)
    keeper = FlowKeeper(tmp_path, AGENT, table)
    keeper.reports._batch = 2  # small batches, so several are out
    sent = keeper.reports.to_send()
    assert len(sent) == 4
    keeper.reports.stored(agent_pb2.FlowsStored(epoch=keeper.reports.epoch, sequence=1))
    keeper.save()  # the agent stops: reports 2, 3 and 4 unacknowledged, one flow queued

    again = FlowTable(100)
    restarted = FlowKeeper(tmp_path, AGENT, again)
    assert restarted.reports.epoch != keeper.reports.epoch, "a new run draws its own epoch"
    resent = restarted.reports.to_send()
    assert resent == sent[1:], "unchanged: the same flows, epoch and sequence"
    assert [(r.epoch, r.sequence) for r in resent] == [(keeper.reports.epoch, n) for n in (2, 3, 4)]
    assert (len(again), again.held) == (1, 6), "the queued flow waits in the table"
    # Nothing of the new epoch until the controller has acknowledged the old reports.
    again.add(record(50))
    restarted.reports.stream_lost()
    assert restarted.reports.to_send() == resent
    restarted.reports.stored(agent_pb2.FlowsStored(epoch=keeper.reports.epoch, sequence=4))
    (fresh,) = restarted.reports.to_send()
    assert (fresh.epoch, fresh.sequence) == (restarted.reports.epoch, 1)
    assert peers([fresh]) == [["198.18.1.8", "198.18.1.50"]]
    assert flow_record(fresh.flows[0]) == record(8)


def test_a_flow_with_its_process_reads_back_as_it_was() -> None:
    flow = record(3, PROCESS)
    assert flow_record(flow_message(flow)) == flow


def test_a_report_the_controller_stored_before_the_crash_counts_once(tmp_path: Path) -> None:
    store = FlowStore(sqlite3.connect(":memory:", isolation_level=None))

    def deliver(report: agent_pb2.FlowReport) -> bool:
        rows = [
            StoredFlow(
                AGENT, f.direction, f.local_address, f.peer_address, "", f.port, f.protocol,
                f.verdict, f.process.name, f.process.pid, f.count, f.first_seen_unix_ms,
                f.last_seen_unix_ms,
            )
            for f in report.flows
        ]  # fmt: skip
        return store.record(rows, ReportId(AGENT, report.epoch, report.sequence))

    keeper = FlowKeeper(tmp_path, AGENT, filled(2))
    (report,) = keeper.reports.to_send()
    keeper.save()  # saved before it goes on the wire
    assert deliver(report)  # stored; the agent dies before the acknowledgement arrives

    restarted = FlowKeeper(tmp_path, AGENT, FlowTable(100))
    (again,) = restarted.reports.to_send()
    assert not deliver(again), "recognised by its epoch and sequence"
    total = store._db.execute("SELECT sum(count) FROM flows").fetchone()[0]
    assert total == 1 + 2


def test_the_file_holds_at_most_the_capacity_newest_flows_first(tmp_path: Path) -> None:
    table = filled(30, capacity=100)
    keeper = FlowKeeper(tmp_path, AGENT, table)
    keeper.reports._batch = 10
    keeper.reports._window = 1
    keeper.reports.to_send()  # 10 in a report, 20 queued
    saved = SavedFlows(
        tuple(keeper.reports.unacknowledged()), tuple(map(flow_message, table.waiting()))
    )
    data, left_out = encode(AGENT, saved, max_flows=15)
    kept = decode(data, AGENT)
    assert left_out == 15
    assert (len(kept.reports), len(kept.queued)) == (1, 5)
    assert [f.peer_address for f in kept.queued] == [f"198.18.1.{i}" for i in range(25, 30)]
    # Bytes too: what does not fit goes, the longest-waiting first, and the file fits.
    data, left_out = encode(AGENT, saved, max_flows=100, max_bytes=6144)
    kept = decode(data, AGENT, max_bytes=6144)
    assert len(data) <= 6144
    assert 0 < left_out < 30
    assert kept.queued[-1].peer_address == "198.18.1.29"


def test_a_full_table_is_saved_within_its_bound(tmp_path: Path) -> None:
    table = filled(100, capacity=100)
    keeper = FlowKeeper(tmp_path, AGENT, table)
    keeper.reports.to_send()
    keeper.save()
    restarted_table = FlowTable(100)
    restarted = FlowKeeper(tmp_path, AGENT, restarted_table)
    assert len(restarted_table) + restarted_table.held == 100
    assert restarted_table.dropped == 0
    assert len(restarted.reports.unacknowledged()) == 1


def corrupt_files(good: bytes) -> dict[str, bytes]:
    payload: dict[str, Any] = json.loads(good)
    edited = {**payload, "agent_id": "db-1"}
    return {
        "not json": b"\x00\x01garbage",
        "truncated": good[: len(good) // 2],
        "edited": json.dumps({**payload, "format": 1, "reports": payload["reports"][:0]}).encode(),
        "another agent's": json.dumps(
            {**edited, "sha256": _resigned(edited)}
        ).encode(),
        "oversize": good + b" " * (16 * 2**20),
    }  # fmt: skip


def _resigned(payload: dict[str, Any]) -> str:
    import hashlib

    body = {key: payload[key] for key in ("format", "agent_id", "reports", "queued")}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def test_a_corrupt_oversize_or_foreign_file_is_reported_ignored_and_replaced(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    keeper = FlowKeeper(tmp_path, AGENT, filled(3))
    keeper.reports.to_send()
    keeper.save()
    good = (tmp_path / FLOWS_FILE).read_bytes()
    for what, data in corrupt_files(good).items():
        (tmp_path / FLOWS_FILE).write_bytes(data)
        caplog.clear()
        table = filled(1)
        with caplog.at_level(logging.WARNING):
            restarted = FlowKeeper(tmp_path, AGENT, table)
        assert restarted.reports.unacknowledged() == [], what
        assert (len(table), table.held) == (1, 0), what
        assert "ignoring the saved flows" in caplog.text, what
        restarted.save()  # replaced by this run's own flows
        assert decode((tmp_path / FLOWS_FILE).read_bytes(), AGENT).queued, what


@pytest.mark.parametrize(
    ("reports", "problem"),
    [
        ([(0, 1)], r"reports\[0\]: epoch and sequence must be 1 to 2\^63 - 1"),
        ([(5, 2), (5, 2)], r"reports\[1\]: sequence does not follow"),
        ([(5, 2), (6, 3)], r"reports\[1\]: epoch differs"),
    ],
)
def test_badly_numbered_reports_are_refused_with_the_reason(
    reports: list[tuple[int, int]], problem: str
) -> None:
    saved = SavedFlows(
        tuple(agent_pb2.FlowReport(epoch=e, sequence=s) for e, s in reports), queued=()
    )
    data, _ = encode(AGENT, saved, max_flows=100)
    with pytest.raises(SavedFlowsCorrupt, match=problem):
        decode(data, AGENT)


def test_nothing_is_written_when_nothing_changed(tmp_path: Path) -> None:
    table = filled(3)
    keeper = FlowKeeper(tmp_path, AGENT, table)
    keeper.save()
    path = tmp_path / FLOWS_FILE
    path.write_bytes(b"left alone")
    keeper.save()
    assert path.read_bytes() == b"left alone"
    table.add(record(9))
    keeper.save()
    assert len(decode(path.read_bytes(), AGENT).queued) == 4
    assert path.stat().st_mode & 0o777 == 0o600


class _Observing:
    def __init__(self, table: FlowTable) -> None:
        self.table = table


def test_the_link_saves_a_new_report_before_it_puts_it_on_the_wire(tmp_path: Path) -> None:
    link = ControllerLink(
        "198.18.0.1:1", agent_id=AGENT, state_dir=tmp_path, enforcer=cast(Any, None),
        make_hello=agent_pb2.Hello, discover=list, heartbeat_interval=5,
        address_poll_interval=2, observer=cast(Observer, _Observing(filled(2))),
        flow_report_interval=0.001,
    )  # fmt: skip
    reports = link._flow_reports
    assert reports is not None

    async def first_report() -> agent_pb2.AgentMessage:
        outbox: asyncio.Queue[agent_pb2.AgentMessage] = asyncio.Queue()
        link._stream_up_at = 1.0
        sending = asyncio.create_task(link._report_flows(outbox, reports))
        try:
            return await asyncio.wait_for(outbox.get(), 5)
        finally:
            sending.cancel()

    message = asyncio.run(first_report())
    assert decode((tmp_path / FLOWS_FILE).read_bytes(), AGENT).reports == (message.flows,)
