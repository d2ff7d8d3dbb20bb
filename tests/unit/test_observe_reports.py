"""Flow reports held until the controller stores them, sent again after a broken stream."""

from __future__ import annotations

from agent.observe.flows import FlowRecord, FlowTable
from agent.observe.model import Direction, Verdict
from agent.observe.reports import FlowReports
from bulkhead.v1 import agent_pb2


def filled(flows: int, capacity: int = 100) -> FlowTable:
    table = FlowTable(capacity)
    for i in range(flows):
        table.add(
            FlowRecord(
                Direction.OUTBOUND, "198.18.0.10", f"198.18.1.{i}", 5432, "tcp",
                Verdict.ALLOWED, None, 1, 1.0, 2.0,
            )
        )  # fmt: skip
    return table


def stored(reports: FlowReports, sequence: int, error: str = "") -> None:
    reports.stored(agent_pb2.FlowsStored(epoch=reports.epoch, sequence=sequence, error=error))


def peers(report: agent_pb2.FlowReport) -> list[str]:
    return [f.peer_address for f in report.flows]


def test_reports_are_numbered_and_at_most_a_window_is_out() -> None:
    table = filled(10)
    reports = FlowReports(table, batch=2, window=3, epoch=5)
    sent = reports.to_send()
    assert [(r.epoch, r.sequence, len(r.flows)) for r in sent] == [(5, 1, 2), (5, 2, 2), (5, 3, 2)]
    assert (table.held, len(table)) == (6, 4)
    assert reports.to_send() == [], "the window is full until the controller answers"
    stored(reports, 2)  # cumulative: 1 and 2 are stored
    assert (reports.acknowledged, table.held, reports.waiting) == (4, 2, 1)
    assert [r.sequence for r in reports.to_send()] == [4, 5]


def test_a_broken_stream_sends_the_unacknowledged_reports_again_unchanged() -> None:
    table = filled(6)
    reports = FlowReports(table, batch=2, window=4, epoch=5)
    first = reports.to_send()
    stored(reports, 1)
    reports.stream_lost()
    table.add(
        FlowRecord(
            Direction.INBOUND, "198.18.0.10", "198.18.2.1", 80, "tcp", Verdict.ALLOWED, None,
            1, 3.0, 3.0,
        )
    )  # fmt: skip
    again = reports.to_send()
    assert again[:2] == first[1:], "the same reports, same numbers, in order"
    assert [r.sequence for r in again] == [2, 3, 4]
    assert peers(again[2]) == ["198.18.2.1"]
    assert reports.to_send() == [], "sent once per stream"
    stored(reports, 4)
    assert (reports.acknowledged, table.held) == (7, 0)


def test_a_refused_report_is_dropped_and_counted_not_sent_again() -> None:
    table = filled(4)
    reports = FlowReports(table, batch=2, window=4, epoch=5)
    reports.to_send()
    stored(reports, 1, error="flows[0].port: 0 is not a port number")
    assert (reports.refused, reports.acknowledged, reports.waiting) == (2, 0, 1)
    reports.stream_lost()
    assert [r.sequence for r in reports.to_send()] == [2]


def test_held_flows_bound_the_memory_for_pending_flows_during_an_outage() -> None:
    table = filled(10, capacity=10)
    reports = FlowReports(table, batch=2, window=100, epoch=5)
    # At most half the capacity is out, so new flows still find room.
    assert sum(len(r.flows) for r in reports.to_send()) == 5
    assert len(table) + table.held == 10
    for i in range(20):
        table.add(
            FlowRecord(
                Direction.INBOUND, "198.18.0.10", f"198.18.3.{i}", 80, "tcp", Verdict.ALLOWED,
                None, 1, 4.0, 4.0,
            )
        )  # fmt: skip
    assert len(table) + table.held == 10
    assert table.dropped == 20


def test_acknowledgements_of_another_epoch_change_nothing() -> None:
    reports = FlowReports(filled(2), batch=2, epoch=5)
    reports.to_send()
    reports.stored(agent_pb2.FlowsStored(epoch=6, sequence=1))
    assert (reports.waiting, reports.acknowledged) == (1, 0)


def test_each_agent_start_draws_its_own_epoch() -> None:
    epochs = {FlowReports(FlowTable()).epoch for _ in range(20)}
    assert len(epochs) == 20
    assert all(0 < e < 2**63 for e in epochs)
