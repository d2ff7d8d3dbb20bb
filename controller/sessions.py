"""One connected agent stream's outbox.

Snapshots are complete, so only the newest pending message matters: a slow
agent gets the latest state when it catches up, and the controller never
blocks on it.
"""

from __future__ import annotations

import asyncio

from bulkhead.v1 import agent_pb2
from controller.errors import ControllerError


class AgentSession:
    def __init__(self, agent_id: str) -> None:
        self.agent_id = agent_id
        self._pending: agent_pb2.ControllerMessage | None = None
        self._wakeup = asyncio.Event()
        self.closed = False
        # Why the agent's side of the stream was rejected, reported when it ends.
        self.failure: ControllerError | None = None

    def offer(self, message: agent_pb2.ControllerMessage) -> None:
        """Queue a message, replacing any not yet sent (latest snapshot wins)."""
        self._pending = message
        self._wakeup.set()

    def close(self) -> None:
        self.closed = True
        self._wakeup.set()

    async def next_message(self) -> agent_pb2.ControllerMessage | None:
        """The next message to send, or None once the session is closed."""
        while True:
            if self.closed:
                return None
            if self._pending is not None:
                message, self._pending = self._pending, None
                self._wakeup.clear()
                return message
            await self._wakeup.wait()
            self._wakeup.clear()
