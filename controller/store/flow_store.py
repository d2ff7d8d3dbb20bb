"""Reported flows in SQLite, one row per (reporting agent, flow key), with retention.

Each agent reports its own side of a connection: the client's agent an outbound flow
with the client process, the server's agent an inbound one with the server process.
Rows keep the peer's workload as it was resolved when the flow was reported: an address
that later changes hands does not rewrite history. Merging both sides into one
source -> destination row is the reader's job (controller/observations.py).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass

DEFAULT_MAX_ROWS = 200_000
DEFAULT_RETENTION_MS = 7 * 24 * 3600 * 1000

_SCHEMA = """
CREATE TABLE IF NOT EXISTS flows (
    reporter       TEXT NOT NULL,
    direction      INTEGER NOT NULL,
    local_address  TEXT NOT NULL,
    peer_address   TEXT NOT NULL,
    peer_workload  TEXT NOT NULL,
    port           INTEGER NOT NULL,
    protocol       TEXT NOT NULL,
    verdict        INTEGER NOT NULL,
    process        TEXT NOT NULL,
    pid            INTEGER NOT NULL,
    count          INTEGER NOT NULL,
    first_seen_ms  INTEGER NOT NULL,
    last_seen_ms   INTEGER NOT NULL,
    PRIMARY KEY (reporter, direction, local_address, peer_address, port, protocol, verdict,
                 process)
);
CREATE INDEX IF NOT EXISTS flows_by_last_seen ON flows(last_seen_ms);
-- The last report stored per agent: a report sent again after a broken stream (its
-- acknowledgement lost) is recognised and not counted twice.
CREATE TABLE IF NOT EXISTS flow_reports (
    reporter  TEXT PRIMARY KEY,
    epoch     INTEGER NOT NULL,
    sequence  INTEGER NOT NULL
);
"""

_UPSERT = """
INSERT INTO flows VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
ON CONFLICT (reporter, direction, local_address, peer_address, port, protocol, verdict, process)
DO UPDATE SET
    count = count + excluded.count,
    peer_workload = excluded.peer_workload,
    pid = excluded.pid,
    first_seen_ms = min(first_seen_ms, excluded.first_seen_ms),
    last_seen_ms = max(last_seen_ms, excluded.last_seen_ms)
"""


@dataclass(frozen=True, slots=True)
class ReportId:
    """Which report of which agent a batch is: (epoch, sequence) grow per agent process."""

    reporter: str
    epoch: int
    sequence: int


@dataclass(frozen=True, slots=True)
class StoredFlow:
    reporter: str
    direction: int  # agent_pb2.FlowDirection
    local_address: str
    peer_address: str
    peer_workload: str  # "" when no workload held the address when reported
    port: int
    protocol: str
    verdict: int  # agent_pb2.Verdict
    process: str
    pid: int
    count: int
    first_seen_ms: int
    last_seen_ms: int


class FlowStore:
    """The flows table on the controller's database connection."""

    def __init__(
        self,
        db: sqlite3.Connection,
        *,
        max_rows: int = DEFAULT_MAX_ROWS,
        retention_ms: int = DEFAULT_RETENTION_MS,
    ) -> None:
        self._db = db
        self.max_rows = max_rows
        self.retention_ms = retention_ms
        self._db.executescript(_SCHEMA)

    def record(self, flows: Sequence[StoredFlow], report: ReportId | None = None) -> bool:
        """Add FLOWS (counts add up per key) in one transaction; False, adding nothing, if
        REPORT was stored already (same epoch, sequence not above the last one stored)."""
        rows = [
            (
                f.reporter,
                f.direction,
                f.local_address,
                f.peer_address,
                f.peer_workload,
                f.port,
                f.protocol,
                f.verdict,
                f.process,
                f.pid,
                f.count,
                f.first_seen_ms,
                f.last_seen_ms,
            )
            for f in flows
        ]
        self._db.execute("BEGIN IMMEDIATE")
        try:
            if report is not None and self._already_stored(report):
                self._db.execute("ROLLBACK")
                return False
            self._db.executemany(_UPSERT, rows)
            if report is not None:
                self._db.execute(
                    "INSERT OR REPLACE INTO flow_reports VALUES (?, ?, ?)",
                    (report.reporter, report.epoch, report.sequence),
                )
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")
        return True

    def _already_stored(self, report: ReportId) -> bool:
        row = self._db.execute(
            "SELECT epoch, sequence FROM flow_reports WHERE reporter = ?", (report.reporter,)
        ).fetchone()
        return row is not None and row[0] == report.epoch and report.sequence <= row[1]

    def prune(self, now_ms: int) -> int:
        """Apply retention: drop rows older than retention, then the oldest beyond max_rows."""
        removed = self._db.execute(
            "DELETE FROM flows WHERE last_seen_ms < ?", (now_ms - self.retention_ms,)
        ).rowcount
        excess = self.count() - self.max_rows
        if excess > 0:
            removed += self._db.execute(
                "DELETE FROM flows WHERE rowid IN "
                "(SELECT rowid FROM flows ORDER BY last_seen_ms LIMIT ?)",
                (excess,),
            ).rowcount
        return removed

    def count(self) -> int:
        return int(self._db.execute("SELECT count(*) FROM flows").fetchone()[0])

    def since(self, since_ms: int) -> list[StoredFlow]:
        """Every row last seen at or after SINCE_MS, most recent first."""
        cursor = self._db.execute(
            "SELECT reporter, direction, local_address, peer_address, peer_workload, port, "
            "protocol, verdict, process, pid, count, first_seen_ms, last_seen_ms FROM flows "
            "WHERE last_seen_ms >= ? ORDER BY last_seen_ms DESC",
            (since_ms,),
        )
        return [StoredFlow(*tuple(row)) for row in cursor]
