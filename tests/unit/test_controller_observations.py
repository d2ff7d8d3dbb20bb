"""Flow reports on the controller: validation, storage with retention, the merge of both
ends' reports into source -> destination entries, and connection-table requests."""

from __future__ import annotations

import asyncio
import ipaddress
import sqlite3
from pathlib import Path

import pytest

from bulkhead.v1 import admin_pb2, agent_pb2, ruleset_pb2
from controller.desired import DesiredRuleset
from controller.errors import InvalidArgument, Unavailable
from controller.observations import Observations, Workloads, merge
from controller.sessions import AgentSession
from controller.store.flow_store import FlowStore, StoredFlow

WEB, DB = "198.18.0.10", "198.18.0.11"
OUT, IN = agent_pb2.FLOW_DIRECTION_OUTBOUND, agent_pb2.FLOW_DIRECTION_INBOUND
ALLOWED, DENIED = agent_pb2.VERDICT_ALLOWED, agent_pb2.VERDICT_DENIED
WOULD = agent_pb2.VERDICT_WOULD_DENY
WORKLOADS = Workloads(
    labels={"web": {"app": "web"}, "db": {"app": "db"}},
    owners={WEB: "web", DB: "db"},
    iplists=[(ipaddress.ip_network("203.0.113.0/24"), {"zone": "office"})],
)


def idle_session(agent_id: str) -> AgentSession:
    """A session whose agent should hold nothing (only connection tables are asked)."""
    return AgentSession(agent_id, lambda: DesiredRuleset.from_ruleset(0, ruleset_pb2.Ruleset()))


def flow(
    direction: int, local: str, peer: str, verdict: int = ALLOWED, **kw: object
) -> agent_pb2.Flow:
    fields: dict[str, object] = {
        "direction": direction,
        "local_address": local,
        "peer_address": peer,
        "port": 5432,
        "protocol": "tcp",
        "verdict": verdict,
        "count": 1,
        "first_seen_unix_ms": 1000,
        "last_seen_unix_ms": 2000,
    }
    fields.update(kw)
    return agent_pb2.Flow(**fields)  # type: ignore[arg-type]


@pytest.fixture
def observations(tmp_path: Path) -> Observations:
    db = sqlite3.connect(tmp_path / "flows.db", isolation_level=None)
    return Observations(FlowStore(db), lambda: WORKLOADS, clock=lambda: 10.0)


def report(*flows: agent_pb2.Flow, dropped: int = 0) -> agent_pb2.FlowReport:
    return agent_pb2.FlowReport(flows=flows, dropped=dropped)


def listed(observations: Observations, **kw: object) -> list[admin_pb2.FlowEntry]:
    return observations.list_flows(admin_pb2.ListFlowsRequest(**kw))[0]  # type: ignore[arg-type]


def test_both_ends_merge_into_one_entry_with_both_processes(observations: Observations) -> None:
    client = flow(OUT, WEB, DB, process=agent_pb2.Process(name="curl", pid=7), count=3)
    server = flow(IN, DB, WEB, process=agent_pb2.Process(name="postgres", pid=9), count=3)
    observations.record("web", report(client))
    observations.record("db", report(server))
    [entry] = listed(observations)
    assert (entry.source.workload, entry.source.process, entry.source.pid) == ("web", "curl", 7)
    assert (entry.destination.workload, entry.destination.process) == ("db", "postgres")
    assert entry.count == 3, "both ends count the same connections"
    assert dict(entry.source.labels) == {"app": "web"}


def test_a_destinations_drop_overrules_the_sources_allowed(observations: Observations) -> None:
    observations.record("web", report(flow(OUT, WEB, DB, ALLOWED)))
    observations.record("db", report(flow(IN, DB, WEB, DENIED, count=2)))
    entries = listed(observations)
    assert [(e.verdict, e.count) for e in entries] == [(DENIED, 2)]


def test_a_drop_at_the_source_stands_beside_the_destinations_history(
    observations: Observations,
) -> None:
    observations.record("db", report(flow(IN, DB, WEB, WOULD)))
    observations.record("web", report(flow(OUT, WEB, DB, WOULD), flow(OUT, WEB, DB, DENIED)))
    assert sorted(e.verdict for e in listed(observations)) == [DENIED, WOULD]


def test_unknown_addresses_stay_addresses_with_iplist_labels(observations: Observations) -> None:
    observations.record("db", report(flow(IN, DB, "203.0.113.5")))
    [entry] = listed(observations)
    assert entry.source.workload == ""
    assert entry.source.address == "203.0.113.5"
    assert dict(entry.source.labels) == {"zone": "office"}


def test_filters_by_workload_label_verdict_and_time(observations: Observations) -> None:
    observations.record("db", report(flow(IN, DB, WEB), flow(IN, DB, "203.0.113.5", DENIED)))
    assert len(listed(observations, workload="web")) == 1
    assert len(listed(observations, labels={"app": "db"})) == 2
    assert len(listed(observations, labels={"app": "nope"})) == 0
    assert [e.verdict for e in listed(observations, verdicts=[DENIED])] == [DENIED]
    assert listed(observations, since_unix_ms=3000) == []


def test_limit_truncates_most_recent_first(observations: Observations) -> None:
    observations.record(
        "db",
        report(*(flow(IN, DB, WEB, port=p, last_seen_unix_ms=2000 + p) for p in (1, 2, 3))),
    )
    entries, truncated = observations.list_flows(admin_pb2.ListFlowsRequest(limit=2))
    assert [e.port for e in entries] == [3, 2]
    assert truncated


@pytest.mark.parametrize(
    ("bad", "field"),
    [
        ({"peer_address": "not-an-ip"}, "flows[1].peer_address"),
        ({"protocol": "sctp"}, "flows[1].protocol"),
        ({"port": 0}, "flows[1].port"),
        ({"count": 0}, "flows[1].count"),
        ({"direction": agent_pb2.FLOW_DIRECTION_LISTEN}, "flows[1].direction"),
        ({"verdict": 0}, "flows[1].verdict"),
        ({"first_seen_unix_ms": 3000}, "first_seen_unix_ms"),
    ],
)
def test_a_bad_report_is_refused_whole_naming_the_field(
    observations: Observations, bad: dict[str, object], field: str
) -> None:
    broken = flow(IN, DB, WEB)
    for name, value in bad.items():
        setattr(broken, name, value)
    with pytest.raises(InvalidArgument, match=field.replace("[", r"\[").replace("]", r"\]")):
        observations.record("db", report(flow(IN, DB, WEB), broken))
    assert listed(observations) == [], "nothing of a refused batch is stored"


def test_retention_drops_old_rows_then_the_oldest_beyond_the_cap(tmp_path: Path) -> None:
    store = FlowStore(sqlite3.connect(tmp_path / "f.db", isolation_level=None), max_rows=2)
    store.retention_ms = 1000
    rows = [
        StoredFlow("db", IN, DB, WEB, "web", p, "tcp", ALLOWED, "", 0, 1, at, at)
        for p, at in ((1, 100), (2, 5000), (3, 6000), (4, 7000))
    ]
    store.record(rows)
    assert store.prune(now_ms=5500) == 2  # port 1 by age, then port 2 beyond the cap
    assert sorted(r.port for r in store.since(0)) == [3, 4]


def test_counts_add_up_per_key(tmp_path: Path) -> None:
    store = FlowStore(sqlite3.connect(tmp_path / "f.db", isolation_level=None))
    row = StoredFlow("db", IN, DB, WEB, "web", 1, "tcp", ALLOWED, "pg", 9, 2, 100, 200)
    store.record([row, row])
    [stored] = store.since(0)
    assert (stored.count, stored.first_seen_ms, stored.last_seen_ms) == (4, 100, 200)


def test_merge_of_nothing_is_nothing() -> None:
    assert merge([], WORKLOADS) == []


def test_connections_are_asked_for_and_the_answer_returned(observations: Observations) -> None:
    async def scenario() -> agent_pb2.ConnectionTable:
        session = idle_session("db")
        asking = asyncio.create_task(observations.connections("db", session, timeout=5))
        message = await session.next_message()
        assert message is not None
        request_id = message.connections_request.request_id
        observations.answered("web", agent_pb2.ConnectionTable(request_id=request_id))  # not db
        answer = agent_pb2.ConnectionTable(request_id=request_id, error="x")
        observations.answered("db", answer)
        return await asking

    assert asyncio.run(scenario()).error == "x"


def test_connections_of_a_silent_or_absent_agent_are_unavailable(
    observations: Observations,
) -> None:
    with pytest.raises(Unavailable, match="not connected"):
        asyncio.run(observations.connections("db", None))
    with pytest.raises(Unavailable, match="did not send"):
        asyncio.run(observations.connections("db", idle_session("db"), timeout=0.05))


def test_an_acknowledged_report_sent_twice_is_counted_once(observations: Observations) -> None:
    first = agent_pb2.FlowReport(flows=[flow(IN, DB, WEB, count=3)], epoch=7, sequence=1)
    assert observations.record("db", first) == agent_pb2.FlowsStored(epoch=7, sequence=1)
    # The stream broke before the acknowledgement arrived: the agent sends it again.
    assert observations.record("db", first) == agent_pb2.FlowsStored(epoch=7, sequence=1)
    [entry] = listed(observations)
    assert entry.count == 3
    second = agent_pb2.FlowReport(flows=[flow(IN, DB, WEB, count=2)], epoch=7, sequence=2)
    observations.record("db", second)
    # A restarted agent numbers from 1 again, in a new epoch; another agent's numbers are its own.
    observations.record("db", agent_pb2.FlowReport(flows=[flow(IN, DB, WEB)], epoch=8, sequence=1))
    observations.record(
        "web", agent_pb2.FlowReport(flows=[flow(OUT, WEB, DB)], epoch=7, sequence=1)
    )
    assert [e.count for e in listed(observations)] == [6]  # both ends merged: 3 + 2 + 1
    assert observations.flows_received == 4


def test_a_bad_acknowledged_report_is_refused_in_the_answer_not_by_ending_the_stream(
    observations: Observations,
) -> None:
    bad = agent_pb2.FlowReport(flows=[flow(IN, DB, "not-an-ip")], epoch=7, sequence=4)
    stored = observations.record("db", bad)
    assert stored is not None
    assert (stored.epoch, stored.sequence) == (7, 4)
    assert "flows[0].peer_address: 'not-an-ip' is not an IP address" in stored.error
    assert listed(observations) == []
    half = agent_pb2.FlowReport(flows=[flow(IN, DB, WEB)], epoch=0, sequence=4)
    assert "epoch, sequence" in observations.record("db", half).error  # type: ignore[union-attr]
    huge = agent_pb2.FlowReport(flows=[flow(IN, DB, WEB)], epoch=2**63, sequence=1)
    assert "epoch: 9223372036854775808 is above" in observations.record("db", huge).error  # type: ignore[union-attr]
    assert listed(observations) == []
