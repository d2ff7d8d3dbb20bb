"""Flows the controller has not stored yet, kept in the agent's state dir across a restart.

The file (`flows.json`) holds the reports sent and not acknowledged, with their epoch and
sequence, and the flows still waiting in the table. It is written whole (temporary, fsync,
rename) at three moments, never per flow: before a newly numbered report is sent, every
SAVE_INTERVAL_S while anything changed, and when the agent stops. Writing before sending
means a report on the wire is always in the file, so after a crash the flows in it come
back either inside that numbered report (which the controller recognises if it stored it)
or in the queue, never in both: nothing is counted twice, and what is lost is at most what
arrived since the last save.

At start the file is loaded: its reports go first, unchanged (reports.py), its queued flows
back into the table. The file is bounded by the table's capacity in flows and by
MAX_FILE_BYTES; what does not fit is left out when saving (the longest-waiting queued flows
first, as the table itself drops them). A file that is corrupt, oversize, or another
agent's is reported and ignored, and replaced at the next save.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import json
import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from google.protobuf.message import DecodeError

from agent.observe.flows import FlowRecord, FlowTable
from agent.observe.model import Direction, ProcessInfo, Verdict
from agent.observe.reports import MAX_NUMBER, FlowReports
from agent.observe.wire import FLOW_BATCH, flow_message
from bulkhead.privatefile import write_private_file
from bulkhead.v1 import agent_pb2

log = logging.getLogger(__name__)

FLOWS_FILE: Final = "flows.json"
FORMAT: Final = 1
MAX_FILE_BYTES: Final = 16 * 2**20  # ~50,000 flows with a process each
SAVE_INTERVAL_S: Final = 5.0
_ENVELOPE_BYTES: Final = 4096  # the JSON around the encoded reports, with room to spare

_DIRECTIONS = {
    agent_pb2.FLOW_DIRECTION_INBOUND: Direction.INBOUND,
    agent_pb2.FLOW_DIRECTION_OUTBOUND: Direction.OUTBOUND,
    agent_pb2.FLOW_DIRECTION_LISTEN: Direction.LISTEN,
}
_VERDICTS = {
    agent_pb2.VERDICT_ALLOWED: Verdict.ALLOWED,
    agent_pb2.VERDICT_DENIED: Verdict.DENIED,
    agent_pb2.VERDICT_WOULD_DENY: Verdict.WOULD_DENY,
}


class SavedFlowsCorrupt(Exception):
    """The flows file exists but cannot be used; the message says why."""


@dataclass(frozen=True)
class SavedFlows:
    """What a flows file holds: unacknowledged reports in order, and queued flows
    (longest-waiting first)."""

    reports: tuple[agent_pb2.FlowReport, ...]
    queued: tuple[agent_pb2.Flow, ...]


def encode(
    agent_id: str,
    saved: SavedFlows,
    *,
    max_flows: int,
    max_bytes: int = MAX_FILE_BYTES,
) -> tuple[bytes, int]:
    """The file's bytes for SAVED, within MAX_FLOWS flows and MAX_BYTES bytes, and how many
    flows were left out to fit: reports from the last, queued flows from the longest-waiting."""
    budget = max_bytes - _ENVELOPE_BYTES - len(agent_id.encode()) * 6
    flows_left, kept = max_flows, []
    for report in saved.reports:
        cost = _encoded_size(report.ByteSize()) + 4
        if len(report.flows) > flows_left or cost > budget:
            break
        kept.append(report)
        flows_left -= len(report.flows)
        budget -= cost
    # Queued flows: the newest that fit (one FlowReport, each flow a length-delimited field).
    newest = saved.queued[max(0, len(saved.queued) - flows_left) :] if flows_left else ()
    queue: list[agent_pb2.Flow] = []
    raw = 0
    for flow in reversed(newest):
        size = flow.ByteSize()
        size += 1 + _varint_size(size)
        if _encoded_size(raw + size) > budget:
            break
        queue.append(flow)
        raw += size
    queue.reverse()
    body = {
        "format": FORMAT,
        "agent_id": agent_id,
        "reports": [_b64(report) for report in kept],
        "queued": _b64(agent_pb2.FlowReport(flows=queue)),
    }
    data = json.dumps({**body, "sha256": _digest(body)}).encode()
    left_out = sum(len(r.flows) for r in saved.reports) + len(saved.queued)
    left_out -= sum(len(r.flows) for r in kept) + len(queue)
    return data, left_out


def decode(data: bytes, agent_id: str, *, max_bytes: int = MAX_FILE_BYTES) -> SavedFlows:
    """The flows in a file's DATA; SavedFlowsCorrupt if it fails any check."""
    if len(data) > max_bytes:
        raise SavedFlowsCorrupt(f"{len(data)} bytes, more than the {max_bytes} the agent writes")
    try:
        payload = json.loads(data)
        body = {key: payload[key] for key in ("format", "agent_id", "reports", "queued")}
        digest = payload["sha256"]
        if not isinstance(body["reports"], list):
            raise TypeError("reports: not a list")
        if body["format"] != FORMAT:
            raise SavedFlowsCorrupt(f"format {body['format']!r} is not {FORMAT}")
        if _digest(body) != digest:
            raise SavedFlowsCorrupt("content does not match its sha256 (edited or damaged?)")
        reports = tuple(_report(text) for text in body["reports"])
        queued = _report(body["queued"])
    except (ValueError, KeyError, TypeError, DecodeError, binascii.Error) as exc:
        raise SavedFlowsCorrupt(f"unreadable ({exc})") from exc
    if body["agent_id"] != agent_id:
        raise SavedFlowsCorrupt(f"written by agent {body['agent_id']!r}, not {agent_id!r}")
    _check_numbering(reports)
    if queued.epoch or queued.sequence:
        raise SavedFlowsCorrupt("queued: numbered like a report")
    return SavedFlows(reports, tuple(queued.flows))


def _check_numbering(reports: Sequence[agent_pb2.FlowReport]) -> None:
    for index, report in enumerate(reports):
        where = f"reports[{index}]"
        if not (0 < report.epoch <= MAX_NUMBER and 0 < report.sequence <= MAX_NUMBER):
            raise SavedFlowsCorrupt(f"{where}: epoch and sequence must be 1 to 2^63 - 1")
        if len(report.flows) > FLOW_BATCH:
            raise SavedFlowsCorrupt(f"{where}: {len(report.flows)} flows, more than {FLOW_BATCH}")
        if index and report.epoch != reports[0].epoch:
            raise SavedFlowsCorrupt(f"{where}: epoch differs from the first report's")
        if index and report.sequence <= reports[index - 1].sequence:
            raise SavedFlowsCorrupt(f"{where}: sequence does not follow the one before")


def flow_record(flow: agent_pb2.Flow) -> FlowRecord:
    """A saved flow back as the table holds it (flow_message, the other way)."""
    process = None
    if flow.HasField("process"):
        message = flow.process
        process = ProcessInfo(
            pid=message.pid,
            name=message.name,
            exe=message.exe,
            cmdline=tuple(message.cmdline),
            user=message.user,
            start_time=message.start_unix_ms / 1000,
            unit=message.systemd_unit,
        )
    return FlowRecord(
        _DIRECTIONS[flow.direction],
        flow.local_address,
        flow.peer_address,
        flow.port,
        flow.protocol,
        _VERDICTS[flow.verdict],
        process,
        flow.count,
        flow.first_seen_unix_ms / 1000,
        flow.last_seen_unix_ms / 1000,
    )


@dataclass(frozen=True)
class _Taken:
    number: int
    reports: tuple[agent_pb2.FlowReport, ...]
    queued: list[FlowRecord]


class FlowKeeper:
    """The flows file of one agent: loaded once at start, saved when something changed."""

    def __init__(self, state_dir: Path, agent_id: str, table: FlowTable) -> None:
        self._path = state_dir / FLOWS_FILE
        self._agent_id = agent_id
        self._table = table
        self.reports = FlowReports(table, restored=self._load())
        self._saved_at: tuple[int, int] | None = None  # the changes the file reflects
        self._written = 0  # the newest content written, so an older one never replaces it
        self._taken = 0
        self._lock = threading.Lock()

    def _load(self) -> tuple[agent_pb2.FlowReport, ...]:
        try:
            saved = decode(self._path.read_bytes(), self._agent_id)
            if sum(len(report.flows) for report in saved.reports) > self._table.capacity:
                raise SavedFlowsCorrupt(f"more flows than flow_capacity ({self._table.capacity})")
            records = [flow_record(flow) for flow in saved.queued]
        except FileNotFoundError:
            return ()
        except (OSError, SavedFlowsCorrupt, KeyError) as exc:
            log.warning("ignoring the saved flows in %s: %s", self._path, exc)
            return ()
        for record in records:
            self._table.add(record)  # beyond the capacity, the oldest go, counted as dropped
        restored = sum(len(report.flows) for report in saved.reports) + len(records)
        if restored:
            log.info(
                "restored %d flows not stored before the agent stopped (%d reports to resend)",
                restored,
                len(saved.reports),
            )
        return saved.reports

    def _changes(self) -> tuple[int, int]:
        return (self.reports.changes, self._table.changes)

    def _take(self) -> _Taken | None:
        """What to save, numbered, taken on the event loop's thread (cheap: references);
        None if nothing changed since the last save."""
        changes = self._changes()
        if changes == self._saved_at:
            return None
        self._saved_at = changes
        self._taken += 1
        return _Taken(self._taken, tuple(self.reports.unacknowledged()), self._table.waiting())

    def _write(self, taken: _Taken) -> None:
        """Encode and write TAKEN, unless a newer one is on disk already. Encoding may run in
        another thread: reports do not change once built, and a queued flow's count read a
        little later than taken is still a count not sent anywhere (a flow taken into a
        report leaves the table and changes no more)."""
        saved = SavedFlows(taken.reports, tuple(flow_message(record) for record in taken.queued))
        data, left_out = encode(self._agent_id, saved, max_flows=self._table.capacity)
        if left_out:
            log.warning("%d pending flows do not fit in %s and are not saved", left_out, self._path)
        with self._lock:
            if taken.number < self._written:
                return
            try:
                write_private_file(self._path, data)
            except OSError as exc:
                log.warning("cannot save pending flows to %s: %s", self._path, exc)
                self._saved_at = None  # try again at the next chance
                return
            self._written = taken.number

    def save(self) -> None:
        """Write the file now if anything changed (on the event loop's thread: it blocks)."""
        taken = self._take()
        if taken is not None:
            self._write(taken)

    async def save_soon(self) -> None:
        """Write the file if anything changed: the content is taken now, encoded and
        written off the event loop."""
        taken = self._take()
        if taken is not None:
            await asyncio.to_thread(self._write, taken)

    async def keep(self, interval: float = SAVE_INTERVAL_S) -> None:
        """Save every INTERVAL seconds while anything changed, until cancelled."""
        while True:
            await asyncio.sleep(interval)
            await self.save_soon()


def _b64(report: agent_pb2.FlowReport) -> str:
    return base64.b64encode(report.SerializeToString(deterministic=True)).decode()


def _report(text: Any) -> agent_pb2.FlowReport:
    if not isinstance(text, str):
        raise TypeError(f"{type(text).__name__} where an encoded report belongs")
    return agent_pb2.FlowReport.FromString(base64.b64decode(text, validate=True))


def _digest(body: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def _encoded_size(raw: int) -> int:
    return 4 * ((raw + 2) // 3)  # base64


def _varint_size(value: int) -> int:
    return max(1, (value.bit_length() + 6) // 7)
