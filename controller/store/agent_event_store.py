"""Events agents cause (tamper reports, certificate renewals, address changes and
conflicts) in SQLite, in a table of their own: the operators' audit table never holds
them, so a host cannot push operator actions out of `bulkhead audit`.

A row stands for one event or for a run of the same (agent, action) merged into it: how
many (`repeated`), the first and the last time, and the latest detail. When to merge and
how many rows an agent may add are decided by controller/agent_events.py; this module
only stores.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

_SCHEMA = """
CREATE TABLE IF NOT EXISTS agent_events (
    id        INTEGER PRIMARY KEY AUTOINCREMENT,
    agent_id  TEXT NOT NULL,
    action    TEXT NOT NULL,
    first_ms  INTEGER NOT NULL,
    last_ms   INTEGER NOT NULL,
    repeated  INTEGER NOT NULL,
    detail    TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS agent_events_by_action ON agent_events(agent_id, action, last_ms);
CREATE INDEX IF NOT EXISTS agent_events_by_first ON agent_events(agent_id, first_ms);
CREATE INDEX IF NOT EXISTS agent_events_by_last ON agent_events(last_ms);
"""

_COLUMNS = "agent_id, action, first_ms, last_ms, repeated, detail"


@dataclass(frozen=True, slots=True)
class AgentEventRecord:
    """One row, shaped like an operator audit record (actor, action, target, detail, time
    of the latest occurrence) plus how many events it stands for."""

    agent_id: str
    action: str
    first_ms: int
    at_ms: int  # the latest occurrence
    repeated_count: int
    detail: str  # JSON of the latest occurrence

    @property
    def actor(self) -> str:
        return f"agent:{self.agent_id}"

    @property
    def target(self) -> str:
        return f"agent/{self.agent_id}"


class AgentEventStore:
    """The agent_events table on the controller's database connection."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db
        self._db.executescript(_SCHEMA)

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """One transaction, or the caller's if one is open already (the controller may
        record an event together with the change that caused it)."""
        if self._db.in_transaction:
            yield
            return
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    def merge(
        self, agent_id: str, action: str, *, last_since_ms: int, first_since_ms: int,
        at_ms: int, detail: str,
    ) -> int:  # fmt: skip
        """Count one more event into the agent's latest ACTION row last seen at or after
        LAST_SINCE_MS and begun at or after FIRST_SINCE_MS; its repeat count now, or 0 if
        there is no such row (nothing changed)."""
        row = self._db.execute(
            "SELECT id, repeated FROM agent_events WHERE agent_id = ? AND action = ? "
            "AND last_ms >= ? AND first_ms >= ? ORDER BY last_ms DESC LIMIT 1",
            (agent_id, action, last_since_ms, first_since_ms),
        ).fetchone()
        if row is None:
            return 0
        repeated = int(row[1]) + 1
        self._db.execute(
            "UPDATE agent_events SET repeated = ?, last_ms = max(last_ms, ?), detail = ? "
            "WHERE id = ?",
            (repeated, at_ms, detail, row[0]),
        )
        return repeated

    def add(self, agent_id: str, action: str, at_ms: int, detail: str) -> None:
        self._db.execute(
            f"INSERT INTO agent_events ({_COLUMNS}) VALUES (?, ?, ?, ?, 1, ?)",
            (agent_id, action, at_ms, at_ms, detail),
        )

    def rows_begun(self, agent_id: str, since_ms: int, *, besides: str) -> int:
        """The agent's rows begun at or after SINCE_MS, other than action BESIDES."""
        row = self._db.execute(
            "SELECT count(*) FROM agent_events WHERE agent_id = ? AND first_ms >= ? "
            "AND action != ?",
            (agent_id, since_ms, besides),
        ).fetchone()
        return int(row[0])

    def count(self) -> int:
        return int(self._db.execute("SELECT count(*) FROM agent_events").fetchone()[0])

    def prune(self, keep: int) -> int:
        """Drop the rows last seen longest ago beyond KEEP; how many went."""
        excess = self.count() - keep
        if excess <= 0:
            return 0
        return self._db.execute(
            "DELETE FROM agent_events WHERE id IN "
            "(SELECT id FROM agent_events ORDER BY last_ms, id LIMIT ?)",
            (excess,),
        ).rowcount

    def since(self, since_ms: int, limit: int) -> list[AgentEventRecord]:
        """The LIMIT rows last seen most recently, at or after SINCE_MS; oldest first."""
        rows = self._db.execute(
            f"SELECT {_COLUMNS} FROM agent_events WHERE last_ms >= ? "
            "ORDER BY last_ms DESC, id DESC LIMIT ?",
            (since_ms, limit),
        ).fetchall()
        return [_record(row) for row in reversed(rows)]

    def of_agent(self, agent_id: str, action: str, limit: int) -> list[AgentEventRecord]:
        """The agent's latest LIMIT rows of ACTION, oldest first."""
        rows = self._db.execute(
            f"SELECT {_COLUMNS} FROM agent_events WHERE agent_id = ? AND action = ? "
            "ORDER BY last_ms DESC, id DESC LIMIT ?",
            (agent_id, action, limit),
        ).fetchall()
        return [_record(row) for row in reversed(rows)]


def _record(row: sqlite3.Row | tuple[object, ...]) -> AgentEventRecord:
    return AgentEventRecord(*tuple(row))  # the columns in the record's field order
