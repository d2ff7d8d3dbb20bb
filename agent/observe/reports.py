"""Flow reports on their way to the controller, kept until it says it stored them.

Batches are taken from the FlowTable and numbered: an `epoch` drawn at random when the
agent starts and a `sequence` that grows across streams. A report stays here until the
controller acknowledges it (FlowsStored); if the stream breaks first, every report not
acknowledged is sent again, unchanged, on the next stream, and the controller, which
stores the last (epoch, sequence) of each agent in the same transaction as the flows,
counts a report sent twice once. So a broken stream loses nothing and doubles nothing.

Reports waiting for an acknowledgement hold their flows against the table's capacity
(FlowTable.held), and at most WINDOW of them, holding at most half the capacity, are
out at once: the agent's memory for pending flows stays bounded during an outage.

Reports a previous run of the agent left unacknowledged (saved_flows.py) come back with
their own epoch and sequence and go first. No report of the new epoch is built until the
controller has acknowledged them all: it remembers one (epoch, sequence) per agent, so a
new-epoch report stored between two old ones would make it count an old one resent twice.
"""

from __future__ import annotations

import logging
import secrets
from collections import OrderedDict
from collections.abc import Sequence
from typing import Final

from agent.observe.flows import FlowTable
from agent.observe.wire import FLOW_BATCH, flow_message
from bulkhead.v1 import agent_pb2

log = logging.getLogger(__name__)

WINDOW: Final = 4  # reports sent and not acknowledged yet, at most
MAX_NUMBER: Final = 2**63 - 1  # the controller stores epoch and sequence as SQLite integers


class FlowReports:
    """Numbered flow reports: built from the table, held until stored, resent after a break."""

    def __init__(
        self,
        table: FlowTable,
        *,
        batch: int = FLOW_BATCH,
        window: int = WINDOW,
        epoch: int | None = None,
        restored: Sequence[agent_pb2.FlowReport] = (),
    ) -> None:
        """RESTORED: reports an earlier run left unacknowledged, in order (of one epoch,
        other than this one); they hold their flows against the table too."""
        self._table = table
        self._batch = batch
        self._window = window
        self.epoch = epoch if epoch is not None else 1 + secrets.randbelow(MAX_NUMBER)
        self._next = 1
        # By (epoch, sequence), in the order sent: restored reports first.
        self._unacked: OrderedDict[tuple[int, int], agent_pb2.FlowReport] = OrderedDict()
        for report in restored:
            self._unacked[report.epoch, report.sequence] = report
            table.held += len(report.flows)
        self._on_stream = 0  # how many of the first unacknowledged went on this stream
        self.acknowledged = 0  # flows the controller stored
        self.refused = 0  # flows the controller refused (an agent bug: logged)
        self.changes = 0  # grows when a report is built or acknowledged (for saved_flows)

    @property
    def waiting(self) -> int:
        """Reports sent (or to be sent again) and not acknowledged yet."""
        return len(self._unacked)

    def unacknowledged(self) -> list[agent_pb2.FlowReport]:
        """The reports sent (or to be sent) and not acknowledged yet, in order."""
        return list(self._unacked.values())

    def to_send(self) -> list[agent_pb2.FlowReport]:
        """What to put on the stream now: reports a broken stream lost, in order, then new
        batches from the table while the window has room (and no restored report waits)."""
        resend = list(self._unacked.values())[self._on_stream :]
        while len(self._unacked) < self._window and not self._restored_waiting():
            room = min(self._batch, self._table.capacity // 2 - self._table.held)
            records = self._table.take(room) if room > 0 else []
            if not records:
                break
            report = agent_pb2.FlowReport(
                flows=[flow_message(record) for record in records],
                dropped=self._table.dropped,
                epoch=self.epoch,
                sequence=self._next,
            )
            self._unacked[self.epoch, self._next] = report
            self._table.held += len(records)
            self._next += 1
            self.changes += 1
            resend.append(report)
        self._on_stream = len(self._unacked)
        return resend

    def _restored_waiting(self) -> bool:
        return bool(self._unacked) and next(iter(self._unacked))[0] != self.epoch

    def stored(self, ack: agent_pb2.FlowsStored) -> None:
        """The controller stored (or refused) every report of ack.epoch up to ack.sequence."""
        if ack.epoch != self.epoch and all(epoch != ack.epoch for epoch, _ in self._unacked):
            log.warning("ignoring an acknowledgement for flow reports of another epoch")
            return
        while self._unacked:
            (epoch, sequence), report = next(iter(self._unacked.items()))
            if epoch != ack.epoch or sequence > ack.sequence:
                break
            del self._unacked[epoch, sequence]
            self._on_stream = max(0, self._on_stream - 1)
            self.changes += 1
            self._table.held -= len(report.flows)
            if sequence == ack.sequence and ack.error:
                self.refused += len(report.flows)
                log.error(
                    "controller refused flow report %d (%d flows, not sent again): %s",
                    sequence,
                    len(report.flows),
                    ack.error,
                )
            else:
                self.acknowledged += len(report.flows)

    def stream_lost(self) -> None:
        """The stream broke: whatever it did not acknowledge goes again on the next one."""
        self._on_stream = 0
