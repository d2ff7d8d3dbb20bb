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
"""

from __future__ import annotations

import logging
import secrets
from collections import OrderedDict
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
    ) -> None:
        self._table = table
        self._batch = batch
        self._window = window
        self.epoch = epoch if epoch is not None else 1 + secrets.randbelow(MAX_NUMBER)
        self._next = 1
        self._unacked: OrderedDict[int, agent_pb2.FlowReport] = OrderedDict()
        self._sent_upto = 0  # the highest sequence put on the current stream
        self.acknowledged = 0  # flows the controller stored
        self.refused = 0  # flows the controller refused (an agent bug: logged)

    @property
    def waiting(self) -> int:
        """Reports sent (or to be sent again) and not acknowledged yet."""
        return len(self._unacked)

    def to_send(self) -> list[agent_pb2.FlowReport]:
        """What to put on the stream now: reports a broken stream lost, in order, then new
        batches from the table while the window has room."""
        resend = [report for seq, report in self._unacked.items() if seq > self._sent_upto]
        while len(self._unacked) < self._window:
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
            self._unacked[self._next] = report
            self._table.held += len(records)
            self._next += 1
            resend.append(report)
        if resend:
            self._sent_upto = resend[-1].sequence
        return resend

    def stored(self, ack: agent_pb2.FlowsStored) -> None:
        """The controller stored (or refused) every report up to ack.sequence."""
        if ack.epoch != self.epoch:
            log.warning("ignoring an acknowledgement for flow reports of another epoch")
            return
        while self._unacked:
            sequence, report = next(iter(self._unacked.items()))
            if sequence > ack.sequence:
                break
            del self._unacked[sequence]
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
        self._sent_upto = 0
