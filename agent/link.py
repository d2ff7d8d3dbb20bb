"""The agent's stream to the controller: hello, heartbeats, address updates, snapshots, acks.

The agent dials out and keeps retrying with jittered exponential backoff, so a
controller restart is followed by a spread-out reconnect, not a stampede.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import grpc

from agent.enforcer import Enforcer
from bulkhead.v1 import agent_pb2, agent_pb2_grpc

log = logging.getLogger(__name__)

# The generated stub class is untyped; this alias gives it a type.
_AGENT_STUB: Callable[[grpc.aio.Channel], Any] = agent_pb2_grpc.AgentServiceStub

BACKOFF_INITIAL_S = 0.5
BACKOFF_MAX_S = 30.0
# A stream must stay up this long before the backoff starts again from its minimum, so two
# hosts cloned with one agent id cannot kick each other off several times a second.
STABLE_STREAM_S = 5.0
# Pings notice a controller that vanished without closing the connection.
CHANNEL_OPTIONS = [
    ("grpc.keepalive_time_ms", 20_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
]


class ResyncNeeded(Exception):
    """The controller believes we enforce something we do not; a new hello fixes that."""


class Backoff:
    """Full-jitter exponential backoff."""

    def __init__(self, initial: float = BACKOFF_INITIAL_S, maximum: float = BACKOFF_MAX_S) -> None:
        self._initial = initial
        self._maximum = maximum
        self._attempt = 0

    def reset(self) -> None:
        self._attempt = 0

    def next_delay(self) -> float:
        ceiling = min(self._maximum, self._initial * 2**self._attempt)
        self._attempt += 1
        return random.uniform(self._initial / 2, ceiling)


class ControllerLink:
    def __init__(
        self,
        target: str,
        enforcer: Enforcer,
        make_hello: Callable[[], agent_pb2.Hello],
        discover: Callable[[], list[str]],
        *,
        heartbeat_interval: float,
        address_poll_interval: float,
    ) -> None:
        self._target = target
        self._enforcer = enforcer
        self._make_hello = make_hello
        self._discover = discover
        self._heartbeat_interval = heartbeat_interval
        self._address_poll_interval = address_poll_interval
        self.addresses: list[str] = []
        self._stream_up_at: float | None = None

    async def run_forever(self) -> None:
        backoff = Backoff()
        while True:
            self._stream_up_at = None
            try:
                await self._run_once()
                log.warning("controller closed the stream")
            except ResyncNeeded as exc:
                log.warning("%s; reconnecting to resync", exc)
            except grpc.aio.AioRpcError as exc:
                log.warning(
                    "controller %s: %s %s", self._target, exc.code().name, exc.details() or ""
                )
            except Exception:
                # Whatever went wrong, the rules in the kernel stay; keep trying to resync.
                log.exception("controller link failed; the last policy stays enforced")
            if self._stream_up_at and time.monotonic() - self._stream_up_at >= STABLE_STREAM_S:
                backoff.reset()
            delay = backoff.next_delay()
            log.info("reconnecting in %.1fs", delay)
            await asyncio.sleep(delay)

    async def _run_once(self) -> None:
        outbox: asyncio.Queue[agent_pb2.AgentMessage] = asyncio.Queue()
        self.addresses = await asyncio.to_thread(self._discover)
        hello = self._make_hello()
        hello.addresses[:] = self.addresses
        await outbox.put(agent_pb2.AgentMessage(hello=hello))
        async with grpc.aio.insecure_channel(self._target, options=CHANNEL_OPTIONS) as channel:
            stub = _AGENT_STUB(channel)
            call: grpc.aio.StreamStreamCall[agent_pb2.AgentMessage, agent_pb2.ControllerMessage] = (
                stub.Connect(_drain(outbox))
            )
            helpers = [
                asyncio.create_task(self._heartbeats(outbox)),
                asyncio.create_task(self._watch_addresses(outbox)),
            ]
            try:
                async for message in call:
                    self._stream_up_at = self._stream_up_at or time.monotonic()
                    await self._handle(message, outbox)
            finally:
                for task in helpers:
                    task.cancel()

    async def _handle(
        self, message: agent_pb2.ControllerMessage, outbox: asyncio.Queue[agent_pb2.AgentMessage]
    ) -> None:
        kind = message.WhichOneof("body")
        if kind == "snapshot":
            addresses: Sequence[str] = list(self.addresses)
            ack = await asyncio.to_thread(self._enforcer.apply, message.snapshot, addresses)
            await outbox.put(agent_pb2.AgentMessage(ack=ack))
        elif kind == "in_sync":
            if message.in_sync.hash != self._enforcer.applied_hash:
                raise ResyncNeeded(
                    f"controller says revision {message.in_sync.revision} is current, "
                    "but that is not what this host enforces"
                )
            log.info("in sync with controller at revision %d", message.in_sync.revision)
        else:
            log.warning("ignoring unknown controller message %s", kind)

    async def _heartbeats(self, outbox: asyncio.Queue[agent_pb2.AgentMessage]) -> None:
        while True:
            await asyncio.sleep(self._heartbeat_interval)
            beat = agent_pb2.Heartbeat(sent_unix_ms=int(time.time() * 1000))
            await outbox.put(agent_pb2.AgentMessage(heartbeat=beat))

    async def _watch_addresses(self, outbox: asyncio.Queue[agent_pb2.AgentMessage]) -> None:
        while True:
            await asyncio.sleep(self._address_poll_interval)
            try:
                current = await asyncio.to_thread(self._discover)
            except Exception:
                # Keep the stream; the next poll may work (netlink can fail transiently).
                log.exception("could not read this host's addresses")
                continue
            if current != self.addresses:
                log.info("addresses changed: %s", ", ".join(current))
                self.addresses = current
                update = agent_pb2.AddressUpdate(addresses=current)
                await outbox.put(agent_pb2.AgentMessage(addresses=update))


async def _drain(
    outbox: asyncio.Queue[agent_pb2.AgentMessage],
) -> AsyncIterator[agent_pb2.AgentMessage]:
    while True:
        yield await outbox.get()
