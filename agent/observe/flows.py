"""Pending flow records: connections and denied packets aggregated until they are reported.

The table is bounded: when it is full, the flow updated longest ago is dropped and
counted, so a long controller outage costs at most `capacity` flows of memory and loses
the oldest ones first.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from agent.observe.model import Direction, ProcessInfo, Verdict

DEFAULT_CAPACITY = 10_000

FlowKey = tuple[Direction, str, str, int, str, str, Verdict]


@dataclass(slots=True)
class FlowRecord:
    """One flow: (direction, local address, peer address, service port, protocol,
    process name, verdict) with how often and when it was seen."""

    direction: Direction
    local_ip: str
    peer_ip: str
    port: int  # local port for inbound flows, the peer's port for outbound ones
    protocol: str
    verdict: Verdict
    process: ProcessInfo | None  # the latest process seen for this key
    count: int
    first_seen: float
    last_seen: float

    @property
    def key(self) -> FlowKey:
        name = self.process.name if self.process else ""
        return (
            self.direction,
            self.local_ip,
            self.peer_ip,
            self.port,
            self.protocol,
            name,
            self.verdict,
        )


class FlowTable:
    """Flows waiting to be reported, at most `capacity` of them."""

    def __init__(self, capacity: int = DEFAULT_CAPACITY) -> None:
        if capacity < 1:
            raise ValueError(f"capacity: {capacity} is not a positive number of flows")
        self.capacity = capacity
        self.dropped = 0  # flows discarded because the table was full, since start
        # Flows taken and sent, not yet acknowledged (agent/observe/reports.py): they count
        # against the capacity until the controller has stored them.
        self.held = 0
        # Grows with every add and take: whoever saves the table (saved_flows.py) can tell
        # whether anything changed since, without comparing flows.
        self.changes = 0
        self._flows: OrderedDict[FlowKey, FlowRecord] = OrderedDict()

    def __len__(self) -> int:
        return len(self._flows)

    def add(self, record: FlowRecord) -> None:
        """Count RECORD in: merged into the flow with the same key, or a new flow."""
        key = record.key
        self.changes += 1
        existing = self._flows.get(key)
        if existing is not None:
            existing.count += record.count
            existing.first_seen = min(existing.first_seen, record.first_seen)
            existing.last_seen = max(existing.last_seen, record.last_seen)
            existing.process = record.process or existing.process
            self._flows.move_to_end(key)
            return
        if len(self._flows) + self.held >= self.capacity:
            self.dropped += 1
            if not self._flows:
                return  # everything is held by reports on their way: this one is lost
            self._flows.popitem(last=False)
        self._flows[key] = FlowRecord(
            record.direction,
            record.local_ip,
            record.peer_ip,
            record.port,
            record.protocol,
            record.verdict,
            record.process,
            record.count,
            record.first_seen,
            record.last_seen,
        )

    def take(self, limit: int) -> list[FlowRecord]:
        """Remove and return up to LIMIT flows, the longest-waiting first."""
        taken: list[FlowRecord] = []
        while self._flows and len(taken) < limit:
            taken.append(self._flows.popitem(last=False)[1])
        self.changes += 1
        return taken

    def waiting(self) -> list[FlowRecord]:
        """The flows not taken yet, the longest-waiting first; the table keeps them."""
        return list(self._flows.values())
