"""Agents' events on the controller: merged while they repeat, capped per agent and in
all, kept apart from the operators' audit (real SQLite, the controller's own store)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from controller.agent_events import SUPPRESSED, AgentEvents
from controller.core import Controller
from controller.store.sqlite_store import SqliteStore
from tests.pki_support import make_controller

OPERATOR = "operator:alice"


class Clock:
    def __init__(self, at: float = 1_000_000.0) -> None:
        self.at = at

    def __call__(self) -> float:
        return self.at


@pytest.fixture
def store(tmp_path: Path) -> SqliteStore:
    return SqliteStore(tmp_path / "c.db")


def rows(events: AgentEvents) -> list[tuple[str, str, int, str]]:
    return [(e.agent_id, e.action, e.repeated_count, e.detail) for e in events.list(0, 1000)]


def test_a_repeating_event_counts_into_one_row_with_the_latest_detail(store: SqliteStore) -> None:
    clock = Clock()
    events = AgentEvents(store.agent_event_store(), clock=clock)
    for n in range(500):
        events.record("web", "agent.tamper", {"n": n})
        clock.at += 0.125
    [row] = events.list(0, 100)
    assert (row.actor, row.action, row.target) == ("agent:web", "agent.tamper", "agent/web")
    assert row.repeated_count == 500
    assert json.loads(row.detail) == {"n": 499}
    assert (row.first_ms, row.at_ms) == (1_000_000_000, 1_000_062_375)
    # Another agent, or another action, has rows of its own.
    events.record("db", "agent.tamper", {})
    events.record("web", "agent.renewed", {})
    assert len(events.list(0, 100)) == 3


def test_a_pause_beyond_the_window_or_an_hour_of_repeats_starts_a_new_row(
    store: SqliteStore,
) -> None:
    clock = Clock()
    events = AgentEvents(store.agent_event_store(), clock=clock, rows_per_agent_hour=1000)
    events.record("web", "agent.tamper", {})
    clock.at += 61  # beyond the 60 s merge window
    events.record("web", "agent.tamper", {})
    assert [r[2] for r in rows(events)] == [1, 1]
    for _ in range(200):  # every 30 s for 100 min: merged, but one row per hour at most
        clock.at += 30
        events.record("web", "agent.tamper", {})
    assert [r[2] for r in rows(events)] == [1, 121, 80]  # 1 + 120 within its hour


def test_an_agent_beyond_its_hourly_rows_is_merged_into_one_suppressed_row(
    store: SqliteStore,
) -> None:
    clock = Clock()
    events = AgentEvents(store.agent_event_store(), clock=clock, rows_per_agent_hour=5)
    for n in range(1000):  # distinct actions: none merges with another
        events.record("web", f"agent.made_up_{n}", {"n": n})
    events.record("db", "agent.tamper", {})
    listed = rows(events)
    assert len(listed) == 7, "five rows, one suppressed row, and db's own"
    suppressed = [r for r in listed if r[1] == SUPPRESSED]
    assert [(r[0], r[2]) for r in suppressed] == [("web", 995)]
    assert json.loads(suppressed[0][3]) == {"action": "agent.made_up_999", "detail": {"n": 999}}
    assert events.suppressed == 995
    assert events.received == 1001
    clock.at += 3601  # a new hour: rows again
    events.record("web", "agent.made_up_x", {})
    assert rows(events)[-1][1] == "agent.made_up_x"


def test_the_table_is_capped_dropping_what_was_seen_longest_ago(store: SqliteStore) -> None:
    clock = Clock()
    events = AgentEvents(store.agent_event_store(), clock=clock, max_rows=100)
    for n in range(250):
        events.record(f"agent-{n}", "agent.tamper", {})
        clock.at += 1
    kept = [r[0] for r in rows(events)]
    assert len(kept) <= 100
    assert kept[-1] == "agent-249"
    assert kept == [f"agent-{n}" for n in range(250 - len(kept), 250)], "the oldest went"


def test_an_event_recorded_inside_a_store_transaction_shares_its_fate(
    store: SqliteStore,
) -> None:
    events = AgentEvents(store.agent_event_store())
    with store.transaction():
        events.record("web", "agent.addresses", {"added": ["198.18.0.10"]})
        store.add_audit(OPERATOR, "agent.labelled", "agent/web", {})

    def failing_change() -> None:
        with store.transaction():
            events.record("web", "agent.address_conflict", {"address": "198.18.0.11"})
            raise RuntimeError("the change failed")

    with pytest.raises(RuntimeError):
        failing_change()
    assert [r[1] for r in rows(events)] == ["agent.addresses"]


def test_a_huge_detail_is_cut(store: SqliteStore) -> None:
    events = AgentEvents(store.agent_event_store())
    events.record("web", "agent.tamper", {"description": "x" * 100_000})
    [row] = events.list(0, 10)
    assert len(row.detail) < 20_000
    assert json.loads(row.detail)["chars"] > 100_000


def test_audit_shows_operator_entries_alone_unless_agents_are_asked_for(
    tmp_path: Path,
) -> None:
    core: Controller = make_controller(tmp_path)
    core.enrollment.create_token({}, 600, 1, actor=OPERATOR)
    core.agent_events.record("web", "agent.renewed", {"serial": "ab"})
    assert [e.action for e in core.audit(0, 100)] == ["token.created"]
    both = core.audit(0, 100, include_agents=True)
    assert [e.action for e in both] == ["token.created", "agent.renewed"]
    assert [e.action for e in core.audit(0, 1, include_agents=True)] == ["agent.renewed"]
