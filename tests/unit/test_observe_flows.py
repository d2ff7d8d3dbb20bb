"""The pending-flow table: aggregation by key, the cap with oldest-first drops, batches."""

from __future__ import annotations

import pytest

from agent.observe.flows import FlowRecord, FlowTable
from agent.observe.model import Direction, ProcessInfo, Verdict

PSQL = ProcessInfo(812, "postgres", "/usr/bin/postgres", ("postgres",), "pg", 1.0, "pg.service")


def flow(peer: str = "198.18.0.11", port: int = 5432, at: float = 10.0, **kw: object) -> FlowRecord:
    fields: dict[str, object] = {
        "direction": Direction.INBOUND,
        "local_ip": "198.18.0.12",
        "peer_ip": peer,
        "port": port,
        "protocol": "tcp",
        "verdict": Verdict.ALLOWED,
        "process": PSQL,
        "count": 1,
        "first_seen": at,
        "last_seen": at,
    }
    fields.update(kw)
    return FlowRecord(**fields)  # type: ignore[arg-type]


def test_same_key_aggregates_count_and_times() -> None:
    table = FlowTable()
    table.add(flow(at=10.0))
    table.add(flow(at=12.0, count=3))
    table.add(flow(at=11.0))
    [record] = table.take(10)
    assert (record.count, record.first_seen, record.last_seen) == (5, 10.0, 12.0)


@pytest.mark.parametrize(
    "change",
    [
        {"peer": "198.18.0.13"},
        {"port": 5433},
        {"verdict": Verdict.WOULD_DENY},
        {"direction": Direction.OUTBOUND},
        {"protocol": "udp"},
        {"process": None},
    ],
)
def test_each_key_field_separates_flows(change: dict[str, object]) -> None:
    table = FlowTable()
    table.add(flow())
    table.add(flow(**change))  # type: ignore[arg-type]
    assert len(table) == 2


def test_a_full_table_drops_the_flow_updated_longest_ago_and_counts_it() -> None:
    table = FlowTable(capacity=2)
    table.add(flow(peer="198.18.0.1"))
    table.add(flow(peer="198.18.0.2"))
    table.add(flow(peer="198.18.0.1"))  # refreshed: now .2 is the oldest
    table.add(flow(peer="198.18.0.3"))
    assert table.dropped == 1
    assert sorted(r.peer_ip for r in table.take(10)) == ["198.18.0.1", "198.18.0.3"]


def test_take_is_bounded_and_oldest_first() -> None:
    table = FlowTable()
    for i in range(5):
        table.add(flow(peer=f"198.18.0.{i}"))
    assert [r.peer_ip for r in table.take(2)] == ["198.18.0.0", "198.18.0.1"]
    assert len(table) == 3


def test_flows_held_by_reports_in_flight_count_against_the_capacity() -> None:
    table = FlowTable(capacity=3)
    table.add(flow(peer="198.18.0.1"))
    table.add(flow(peer="198.18.0.2"))
    table.held = len(table.take(2))  # as FlowReports does while they wait for an ack
    table.add(flow(peer="198.18.0.3"))
    table.add(flow(peer="198.18.0.4"))  # 2 held + 1 pending: the oldest pending goes
    assert table.dropped == 1
    assert [r.peer_ip for r in table.take(10)] == ["198.18.0.4"]
    table.held = 3
    table.add(flow(peer="198.18.0.5"))  # nothing pending to drop: the new flow is lost
    assert table.dropped == 2
    assert len(table) == 0


def test_capacity_must_be_positive() -> None:
    with pytest.raises(ValueError, match="capacity"):
        FlowTable(capacity=0)
