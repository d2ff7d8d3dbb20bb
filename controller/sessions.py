"""One connected agent stream's outbox.

Snapshots are complete, so only the newest pending one matters: a slow agent gets the
latest state when it catches up, and the controller never blocks on it. Other messages
(an issued certificate) are each delivered, in order, before any pending snapshot.
"""

from __future__ import annotations

import asyncio
from collections import deque

from bulkhead.v1 import agent_pb2
from controller.errors import ControllerError

# Bounded: an agent can only have a handful of one-off messages in flight.
MAX_QUEUED = 16


class AgentSession:
    def __init__(self, agent_id: str) -> None:
        self.agent_id = agent_id
        self._snapshot: agent_pb2.ControllerMessage | None = None
        self._queued: deque[agent_pb2.ControllerMessage] = deque(maxlen=MAX_QUEUED)
        self._wakeup = asyncio.Event()
        self.closed = False
        # Why the agent's side of the stream was rejected, reported when it ends.
        self.failure: ControllerError | None = None

    def offer(self, message: agent_pb2.ControllerMessage) -> None:
        """Set the state message to send, replacing one not yet sent (latest wins)."""
        self._snapshot = message
        self._wakeup.set()

    def send(self, message: agent_pb2.ControllerMessage) -> None:
        """Queue a message that must be delivered as such."""
        self._queued.append(message)
        self._wakeup.set()

    def close(self) -> None:
        self.closed = True
        self._wakeup.set()

    def take(self) -> agent_pb2.ControllerMessage | None:
        """The next message if one is waiting, without blocking."""
        if self._queued:
            return self._queued.popleft()
        message, self._snapshot = self._snapshot, None
        return message

    async def next_message(self) -> agent_pb2.ControllerMessage | None:
        """The next message to send, or None once the session is closed."""
        while not self.closed:
            message = self.take()
            if message is not None:
                return message
            self._wakeup.clear()
            await self._wakeup.wait()
        return None
