"""One connected agent stream's outbox, and how its next ruleset goes on the wire.

Desired state is offered, not queued: only the newest pending state matters, so a slow
agent gets the latest state when it catches up and the controller never blocks on it.
Other messages (an issued certificate) are each delivered, in order, before any pending
state.

The message for a state is built when it is sent, against `base`: what the agent will
hold once everything already sent on this stream is applied (the stream is ordered and
the agent applies in order). When only set elements differ from the base, a PolicyDelta
goes out (controller.desired.policy_delta); otherwise, or with no base known, a complete
PolicySnapshot. An agent that
cannot apply a delta says so in its ack and the controller forgets the base (forget_base),
so the next offer is a snapshot.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from bulkhead.v1 import agent_pb2
from controller.desired import DesiredRuleset, StateMessages
from controller.errors import ControllerError

# Bounded: an agent can only have a handful of one-off messages in flight.
MAX_QUEUED = 16


class _Desired:
    """Pending: whatever the agent's desired ruleset is when the message is built."""


_DESIRED = _Desired()
# Shared by all sessions: keyed by content, so also across controllers in one process.
MESSAGES = StateMessages()


@dataclass
class PushCounts:
    """What went out to agents, for metrics."""

    snapshots: int = 0
    deltas: int = 0


class AgentSession:
    def __init__(
        self,
        agent_id: str,
        desired: Callable[[], DesiredRuleset],
        base: DesiredRuleset | None = None,
        counts: PushCounts | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.agent_id = agent_id
        self._desired = desired  # the agent's desired ruleset as of now
        self.base = base
        self._counts = counts if counts is not None else PushCounts()
        self._clock = clock
        self._pending: agent_pb2.ControllerMessage | _Desired | None = None
        # For stuck agents: since when a state waits to be taken, and when each ruleset
        # sent but not yet acknowledged went out (acks come in order).
        self._pending_since: float | None = None
        self._unacked: deque[tuple[float, DesiredRuleset]] = deque()
        self._queued: deque[agent_pb2.ControllerMessage] = deque(maxlen=MAX_QUEUED)
        # A bare future rather than asyncio.Event: Event.wait() looks up the running loop,
        # which on Python 3.11 is a getpid() system call, ten thousand times per change.
        self._loop: asyncio.AbstractEventLoop | None = None
        self._waiter: asyncio.Future[None] | None = None
        self.closed = False
        # Why the agent's side of the stream was rejected, reported when it ends.
        self.failure: ControllerError | None = None

    def offer(self, message: agent_pb2.ControllerMessage) -> None:
        """Set the state message to send, replacing one not yet sent (latest wins)."""
        self._set_pending(message)

    def offer_desired(self) -> None:
        """Send the agent's desired ruleset, as it is when the message goes out (built then:
        thousands of sessions offered at once cost nothing until each is sent)."""
        self._set_pending(_DESIRED)

    def acknowledged(self) -> DesiredRuleset | None:
        """The agent answered the oldest ruleset sent and not yet acknowledged: that one."""
        return self._unacked.popleft()[1] if self._unacked else None

    def waiting_s(self) -> float:
        """How long the agent has kept the controller waiting: for the oldest ruleset sent
        and not acknowledged, or for a pending state to be taken off the stream (0: not)."""
        now = self._clock()
        oldest_sent = self._unacked[0][0] if self._unacked else None
        since = [t for t in (self._pending_since, oldest_sent) if t is not None]
        return now - min(since) if since else 0.0

    def _set_pending(self, pending: agent_pb2.ControllerMessage | _Desired) -> None:
        if self._pending is None:
            self._pending_since = self._clock()
        self._pending = pending
        self._wake()

    def forget_base(self) -> None:
        """The agent does not hold what was sent (it refused it): snapshots from now on."""
        self.base = None

    def send(self, message: agent_pb2.ControllerMessage) -> None:
        """Queue a message that must be delivered as such."""
        self._queued.append(message)
        self._wake()

    def close(self) -> None:
        self.closed = True
        self._wake()

    def _wake(self) -> None:
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def take(self) -> agent_pb2.ControllerMessage | None:
        """The next message if one is waiting, without blocking."""
        if self._queued:
            return self._queued.popleft()
        pending, self._pending = self._pending, None
        self._pending_since = None
        if isinstance(pending, _Desired):
            state = self._desired()
            message = self._state_message(state)
            if message is not None:
                self._unacked.append((self._clock(), state))
            return message
        return pending

    async def next_message(self) -> agent_pb2.ControllerMessage | None:
        """The next message to send, or None once the session is closed."""
        while not self.closed:
            message = self.take()
            if message is not None:
                return message
            if self._loop is None:
                self._loop = asyncio.get_running_loop()
            # No await since take(): nothing offered in between can be missed.
            self._waiter = self._loop.create_future()
            await self._waiter
        return None

    def _state_message(self, state: DesiredRuleset) -> agent_pb2.ControllerMessage | None:
        base, self.base = self.base, state
        if base is not None and base.hash == state.hash:
            return None  # already sent on this stream
        message = MESSAGES.step(base, state)
        if message.HasField("delta"):
            self._counts.deltas += 1
        else:
            self._counts.snapshots += 1
        return message
