"""One simulated agent: the real agent's side of the stream without a dataplane.

It says hello with its fake addresses and labels and the revision and hash it last
"applied", checks every snapshot's hash against its ruleset (as a real agent does before
applying), applies deltas to the ruleset it holds (asking for a snapshot when one does not
fit), acks, and sends heartbeats. It records when each snapshot revision
arrived and when the current stream was first answered (a snapshot or InSync: resynced).
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable
from typing import Any

import grpc

from bulkhead.channel import AGENT_STREAM_OPTIONS
from bulkhead.v1 import agent_pb2, agent_pb2_grpc, ruleset_pb2
from bulkhead.v1.contract import DeltaError, DeltaHashMismatch, delta_result, ruleset_hash
from controller.pki import CONTROLLER_NAME
from controller.sim.credentials import AgentCredentials

AGENT_VERSION = "bulkhead-sim"
# The real agent's stream settings (bulkhead.channel), and one TCP connection per agent,
# as with real hosts, never a shared subchannel.
CHANNEL_OPTIONS: list[tuple[str, str | int]] = [
    ("grpc.ssl_target_name_override", CONTROLLER_NAME),
    *AGENT_STREAM_OPTIONS,
    ("grpc.use_local_subchannel_pool", 1),
]
# The generated stub class is untyped; this alias gives it a type.
_AGENT_STUB: Callable[[grpc.aio.Channel], Any] = agent_pb2_grpc.AgentServiceStub
Clock = Callable[[], float]
_Call = grpc.aio.StreamStreamCall[agent_pb2.AgentMessage, agent_pb2.ControllerMessage]


class ResyncNeeded(Exception):
    """The controller says we are in sync with a hash we do not hold; a new hello fixes it."""


class SimAgent:
    def __init__(
        self,
        agent_id: str,
        credentials: AgentCredentials,
        ca_pem: bytes,
        *,
        labels: dict[str, str],
        addresses: list[str],
        controller: str,
        clock: Clock = time.monotonic,
    ) -> None:
        self.agent_id = agent_id
        self.labels = labels
        self.addresses = addresses
        self._credentials = credentials
        self._ca_pem = ca_pem
        self._controller = controller
        self._clock = clock
        self.applied_revision = 0
        self.applied_hash = ""
        self.ruleset = ruleset_pb2.Ruleset()  # what it holds (applied_hash, when that is set)
        # revision -> clock() when its snapshot arrived (first arrival only)
        self.arrivals: dict[int, float] = {}
        self.up = False  # the current stream has been answered
        self.synced_at: float | None = None  # when the current stream was first answered
        self.snapshots = 0
        self.deltas = 0
        self.in_syncs = 0
        self.hash_mismatches = 0

    def hello(self) -> agent_pb2.Hello:
        return agent_pb2.Hello(
            agent_id=self.agent_id,
            hostname=self.agent_id,
            labels=self.labels,
            addresses=self.addresses,
            applied_revision=self.applied_revision,
            applied_hash=self.applied_hash,
            mode=agent_pb2.MODE_ENFORCE,
            baseline=agent_pb2.Baseline(controller=self._controller, dataplane="simulated"),
            agent_version=AGENT_VERSION,
        )

    def handle(self, message: agent_pb2.ControllerMessage) -> agent_pb2.AgentMessage | None:
        """What to answer MESSAGE with (None: nothing); ResyncNeeded on a foreign InSync."""
        now = self._clock()
        if not self.up:
            self.up = True
            self.synced_at = now
        kind = message.WhichOneof("body")
        if kind == "snapshot":
            snapshot = message.snapshot
            self.snapshots += 1
            self.arrivals.setdefault(snapshot.revision, now)
            if ruleset_hash(snapshot.ruleset) != snapshot.hash:
                self.hash_mismatches += 1
                failed = agent_pb2.Ack(
                    revision=snapshot.revision,
                    hash=snapshot.hash,
                    ok=False,
                    error="snapshot hash does not match its ruleset",
                )
                return agent_pb2.AgentMessage(ack=failed)
            self.applied_revision, self.applied_hash = snapshot.revision, snapshot.hash
            self.ruleset = snapshot.ruleset
            ack = agent_pb2.Ack(revision=snapshot.revision, hash=snapshot.hash, ok=True)
            return agent_pb2.AgentMessage(ack=ack)
        if kind == "delta":
            self.deltas += 1
            self.arrivals.setdefault(message.delta.revision, now)
            return agent_pb2.AgentMessage(ack=self._apply_delta(message.delta))
        if kind == "in_sync":
            self.in_syncs += 1
            if message.in_sync.hash != self.applied_hash:
                raise ResyncNeeded(
                    f"controller says revision {message.in_sync.revision} is current, "
                    "but that is not what this agent holds"
                )
            return None
        if kind == "connections_request":
            table = agent_pb2.ConnectionTable(
                request_id=message.connections_request.request_id,
                error="a simulated agent has no sockets",
            )
            return agent_pb2.AgentMessage(connections=table)
        return None  # a renewed certificate: the simulator keeps its first one

    def _apply_delta(self, delta: agent_pb2.PolicyDelta) -> agent_pb2.Ack:
        try:
            ruleset = delta_result(self.ruleset, self.applied_hash, delta)
        except DeltaError as exc:
            if isinstance(exc, DeltaHashMismatch):
                self.hash_mismatches += 1
            return agent_pb2.Ack(
                revision=delta.revision, hash=delta.hash, ok=False, error=str(exc),
                need_snapshot=True,
            )  # fmt: skip
        self.applied_revision, self.applied_hash, self.ruleset = delta.revision, delta.hash, ruleset
        return agent_pb2.Ack(revision=delta.revision, hash=delta.hash, ok=True)

    def first_arrival_after(self, revision: int) -> float | None:
        """When the first snapshot newer than REVISION arrived, None if none has."""
        times = [at for rev, at in self.arrivals.items() if rev > revision]
        return min(times) if times else None

    async def stream(self, *, heartbeat_interval: float, on_up: Callable[[], None]) -> None:
        """Hold one stream until the controller ends it (returns) or it fails (raises
        grpc.aio.AioRpcError or ResyncNeeded). ON_UP is called at the first answer."""
        self.up = False
        credentials = grpc.ssl_channel_credentials(
            self._ca_pem, self._credentials.key_pem, self._credentials.cert_pem
        )
        async with grpc.aio.secure_channel(
            self._controller, credentials, options=CHANNEL_OPTIONS
        ) as channel:
            # Written with call.write() rather than a request iterator: grpc's own iterator
            # task would outlive a failed call.
            call: _Call = _AGENT_STUB(channel).Connect()
            writer = _Writer(call)
            await writer.send(agent_pb2.AgentMessage(hello=self.hello()))
            beats = asyncio.create_task(_heartbeats(writer, heartbeat_interval))
            try:
                async for message in call:
                    was_up = self.up
                    answer = self.handle(message)
                    if not was_up:
                        on_up()
                    if answer is not None:
                        # Acked from this task, not handed to a writer task: with 10,000
                        # agents in one process each hop is felt in the latency measured.
                        await writer.send(answer)
            finally:
                self.up = False
                call.cancel()
                beats.cancel()
                await asyncio.gather(beats, return_exceptions=True)


class _Writer:
    """One write at a time on the call (grpc.aio allows no more), from any task."""

    def __init__(self, call: _Call) -> None:
        self._call = call
        self._lock = asyncio.Lock()

    async def send(self, message: agent_pb2.AgentMessage) -> None:
        async with self._lock:
            if self._call.done():
                return  # the read side reports how the call ended
            try:
                await self._call.write(message)
            except asyncio.InvalidStateError:
                return  # finished while we waited: as above


async def _heartbeats(writer: _Writer, interval: float) -> None:
    # The first beat at a random point of the interval, so a fleet does not beat in step.
    await asyncio.sleep(random.uniform(0, interval))
    while True:
        beat = agent_pb2.Heartbeat(sent_unix_ms=int(time.time() * 1000))
        await writer.send(agent_pb2.AgentMessage(heartbeat=beat))
        await asyncio.sleep(interval)
