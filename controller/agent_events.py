"""Events agents cause, kept apart from the operators' audit and bounded per agent.

What an agent reports about itself (its rules were tampered with, it renewed its
certificate, its addresses changed or conflict with another agent's) is worth keeping,
but one compromised host must not be able to bury operator actions or fill the disk.
So, with the default figures:

* the same (agent, action) again within MERGE_WINDOW_S (60 s) of its last occurrence is
  counted into the same row (repeat count, last time, latest detail) instead of adding
  one; a row merges for at most MAX_ROW_SPAN_S (1 h), so a steady flood writes one row an
  hour per action;
* an agent may begin at most ROWS_PER_AGENT_HOUR (60) rows an hour; beyond that, its
  events are counted into one `agent.events_suppressed` row for that hour, whose detail
  is the latest suppressed action and detail;
* the table holds at most MAX_ROWS (100,000) rows: beyond, the ones last seen longest ago
  are dropped, a tenth of the cap at a time.

3,000 tamper reports on one stream thus make one row (tests/unit/test_agent_events.py).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Mapping

from bulkhead.v1 import agent_pb2
from controller.store.agent_event_store import AgentEventRecord, AgentEventStore

log = logging.getLogger(__name__)

MERGE_WINDOW_S = 60.0
MAX_ROW_SPAN_S = 3600.0
ROWS_PER_AGENT_HOUR = 60
MAX_ROWS = 100_000
SUPPRESSED = "agent.events_suppressed"
DETAIL_MAX_CHARS = 16_384  # of one event's JSON detail; a longer one is cut
TAMPER_DESCRIPTION_MAX = 1000  # characters of an agent's tamper description kept
_HOUR_MS = 3_600_000
Records = list[AgentEventRecord]  # a name apart: AgentEvents.list hides the builtin there


class AgentEvents:
    """Record agents' events (merged, capped) and list them for `bulkhead audit --agents`."""

    def __init__(
        self,
        store: AgentEventStore,
        *,
        clock: Callable[[], float] = time.time,
        merge_window_s: float = MERGE_WINDOW_S,
        max_row_span_s: float = MAX_ROW_SPAN_S,
        rows_per_agent_hour: int = ROWS_PER_AGENT_HOUR,
        max_rows: int = MAX_ROWS,
    ) -> None:
        self._store = store
        self._clock = clock
        self._merge_window_ms = int(merge_window_s * 1000)
        self._max_row_span_ms = int(max_row_span_s * 1000)
        self._rows_per_agent_hour = rows_per_agent_hour
        self._max_rows = max_rows
        # Rows added since the table was last counted: it is counted again only when this
        # could exceed the cap (a rolled-back caller's transaction may have undone some).
        self._rows_estimate = store.count()
        self.received = 0  # events recorded, merged or not (metrics)
        self.suppressed = 0  # events beyond an agent's hourly rows (metrics)

    def record(self, agent_id: str, action: str, detail: Mapping[str, object]) -> None:
        """Keep one event of AGENT_ID (merged into a recent row of the same action when
        there is one)."""
        self._record(agent_id, action, detail)

    def _record(self, agent_id: str, action: str, detail: Mapping[str, object]) -> int:
        """record(); returns the repeat count of the row the event went into (1: a new
        row), or 0 if it was suppressed."""
        self.received += 1
        at = int(self._clock() * 1000)
        text = _detail_json(detail)
        with self._store.transaction():
            repeated = self._store.merge(
                agent_id, action, last_since_ms=at - self._merge_window_ms,
                first_since_ms=at - self._max_row_span_ms, at_ms=at, detail=text,
            )  # fmt: skip
            if repeated:
                return repeated
            hour_ago = at - _HOUR_MS
            if self._store.rows_begun(agent_id, hour_ago, besides=SUPPRESSED) >= (
                self._rows_per_agent_hour
            ):
                self.suppressed += 1
                suppressed = _detail_json({"action": action, "detail": dict(detail)})
                merged = self._store.merge(
                    agent_id, SUPPRESSED, last_since_ms=hour_ago, first_since_ms=hour_ago,
                    at_ms=at, detail=suppressed,
                )  # fmt: skip
                if not merged:
                    self._add(agent_id, SUPPRESSED, at, suppressed)
                    log.warning(
                        "agent %s: more than %d events in an hour; merging the rest into "
                        "one %s entry", agent_id, self._rows_per_agent_hour, SUPPRESSED,
                    )  # fmt: skip
                return 0
            self._add(agent_id, action, at, text)
            return 1

    def _add(self, agent_id: str, action: str, at_ms: int, detail: str) -> None:
        self._store.add(agent_id, action, at_ms, detail)
        self._rows_estimate += 1
        if self._rows_estimate > self._max_rows:
            self._store.prune(self._max_rows - self._max_rows // 10)
            self._rows_estimate = self._store.count()

    def list(self, since_ms: int, limit: int) -> Records:
        """The LIMIT rows last seen most recently, at or after SINCE_MS; oldest first."""
        return self._store.since(since_ms, limit)

    # -- tamper reports (agent/tamper.py) -------------------------------------------------
    def tampered(self, agent_id: str, event: agent_pb2.TamperEvent) -> None:
        """The agent found its rules changed behind its back (and says if it repaired them).
        Logged as a warning when it starts a row; repeats within the merge window are
        counted there and logged at debug level (a flood must not flood the log either)."""
        description = event.description[:TAMPER_DESCRIPTION_MAX]
        repeated = self._record(
            agent_id, "agent.tamper",
            {"description": description, "repaired": event.repaired,
             "repair_seconds": event.repair_seconds, "detected_unix_ms": event.detected_unix_ms},
        )  # fmt: skip
        outcome = f"repaired in {event.repair_seconds:.3f} s" if event.repaired else "NOT repaired"
        level = logging.WARNING if repeated == 1 else logging.DEBUG
        log.log(level, "agent %s: rules tampered with (%s); %s", agent_id, description, outcome)

    def tamper_events(self, agent_id: str, limit: int = 100) -> Records:
        """The agent's latest tamper rows, oldest first."""
        return self._store.of_agent(agent_id, "agent.tamper", limit)

    # -- end tamper reports ----------------------------------------------------------------


def _detail_json(detail: Mapping[str, object]) -> str:
    text = json.dumps(detail, sort_keys=True, default=str)
    if len(text) <= DETAIL_MAX_CHARS:
        return text
    return json.dumps({"cut": text[:DETAIL_MAX_CHARS], "chars": len(text)})
