"""The agent's stream to the controller: hello, heartbeats, address updates, snapshots, acks.

The agent dials out and keeps retrying with jittered exponential backoff, so a
controller restart is followed by a spread-out reconnect, not a stampede.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import random
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc

from agent.enforcer import Enforcer
from agent.enroll import CONTROLLER_NAME
from agent.identity import (
    CA_FILE,
    AgentCredentials,
    IdentityError,
    Names,
    checked_credentials,
    load_credentials,
    new_key_and_csr,
    save_credentials,
)
from agent.observe.observer import Observer
from agent.observe.reports import FlowReports
from agent.observe.saved_flows import FlowKeeper
from agent.observe.wire import connection_message
from bulkhead.channel import AGENT_STREAM_OPTIONS
from bulkhead.v1 import agent_pb2, agent_pb2_grpc

log = logging.getLogger(__name__)

# The generated stub class is untyped; this alias gives it a type.
_AGENT_STUB: Callable[[grpc.aio.Channel], Any] = agent_pb2_grpc.AgentServiceStub

BACKOFF_INITIAL_S = 0.5
BACKOFF_MAX_S = 30.0
# A stream must stay up this long before the backoff starts again from its minimum, so two
# hosts cloned with one agent id cannot kick each other off several times a second.
STABLE_STREAM_S = 5.0
# Tamper reports (agent/tamper.py) kept while there is no stream; the oldest are dropped.
TAMPER_BACKLOG_MAX = 100
FLOW_REPORT_INTERVAL_S = 2.0
# A renewal the controller did not answer by then (it refuses one asked before the last
# third of the certificate's life by its clock, without answering) is asked for again.
RENEWAL_ANSWER_WAIT_S = 300.0
CHANNEL_OPTIONS: list[tuple[str, str | int]] = [
    # The controller is verified by this name (its certificate always carries it),
    # whatever address it is dialled at.
    ("grpc.ssl_target_name_override", CONTROLLER_NAME),
    *AGENT_STREAM_OPTIONS,
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
        *,
        agent_id: str,
        state_dir: Path,
        enforcer: Enforcer,
        make_hello: Callable[[], agent_pb2.Hello],
        discover: Callable[[], list[str]],
        heartbeat_interval: float,
        address_poll_interval: float,
        observer: Observer | None = None,
        flow_report_interval: float = FLOW_REPORT_INTERVAL_S,
    ) -> None:
        self._target = target
        self._agent_id = agent_id
        self._state_dir = state_dir
        self._enforcer = enforcer
        self._make_hello = make_hello
        self._discover = discover
        self._heartbeat_interval = heartbeat_interval
        self._address_poll_interval = address_poll_interval
        self.addresses: list[str] = []
        self._stream_up_at: float | None = None
        self._outbox: asyncio.Queue[agent_pb2.AgentMessage] | None = None
        # The key (PEM) of a renewal in flight: the certificate that comes back must match it.
        self._renewal_key: bytes | None = None
        self._renewed: AgentCredentials | None = None
        self._tamper_backlog: deque[agent_pb2.TamperEvent] = deque(maxlen=TAMPER_BACKLOG_MAX)
        self._observer = observer
        # Flows an earlier run left unstored come back from the state dir (saved_flows.py).
        self._flow_keeper = (
            FlowKeeper(state_dir, agent_id, observer.table) if observer is not None else None
        )
        self._flow_reports: FlowReports | None = (
            self._flow_keeper.reports if self._flow_keeper is not None else None
        )
        self._flow_report_interval = flow_report_interval
        # This host's addresses the controller refuses, with its reasons (AddressesRefused):
        # kept across streams until the controller says otherwise.
        self.refused_addresses: dict[str, str] = {}

    @property
    def flows_reported(self) -> int:
        """Flows the controller has acknowledged storing."""
        return 0 if self._flow_reports is None else self._flow_reports.acknowledged

    def save_flows(self) -> None:
        """Save the flows not stored yet to the state dir now (when the agent stops)."""
        if self._flow_keeper is not None:
            self._flow_keeper.save()

    async def run_forever(self) -> None:
        keeping = (
            None if self._flow_keeper is None else asyncio.create_task(self._flow_keeper.keep())
        )
        try:
            await self._reconnect_forever()
        finally:
            if keeping is not None:
                keeping.cancel()

    async def _reconnect_forever(self) -> None:
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

    def report(self, message: agent_pb2.AgentMessage) -> bool:
        """Send MESSAGE on the current stream; False if there is none (the next hello
        carries the agent's state anyway)."""
        if self._outbox is None:
            return False
        self._outbox.put_nowait(message)
        return True

    # -- tamper reports (agent/tamper.py) -------------------------------------------------
    async def report_tamper(self, event: agent_pb2.TamperEvent) -> None:
        """Send a tamper event now if the stream is up, else once it is (at most
        TAMPER_BACKLOG_MAX of them wait; the oldest are dropped)."""
        self._tamper_backlog.append(event)
        self._send_tamper_backlog()

    def _send_tamper_backlog(self) -> None:
        # Up means the controller answered our hello; before that a message could be lost.
        if self._outbox is None or self._stream_up_at is None:
            return
        while self._tamper_backlog:
            event = self._tamper_backlog.popleft()
            self._outbox.put_nowait(agent_pb2.AgentMessage(tamper=event))

    # -- end tamper reports ----------------------------------------------------------------

    async def _run_once(self) -> None:
        outbox: asyncio.Queue[agent_pb2.AgentMessage] = asyncio.Queue()
        self._outbox = outbox
        # What the controller refused is what it says on this stream: it sends the list
        # first thing when there is one, and a refusal lifted while we were away (the
        # holder went offline) must not keep this host's flows out.
        self._forget_refused()
        self.addresses = await asyncio.to_thread(self._discover)
        hello = self._make_hello()
        hello.addresses[:] = self.addresses
        await outbox.put(agent_pb2.AgentMessage(hello=hello))
        # Read afresh on every connect, so a renewed certificate is used from then on.
        # (In a thread: the key tool runs if the files changed behind the agent's back.)
        credentials = await asyncio.to_thread(load_credentials, self._state_dir)
        if credentials is None:
            raise IdentityError(f"no credentials in {self._state_dir}; enroll this host again")
        self._renewal_key = None
        self._renewed = None
        if credentials.not_after <= datetime.now(UTC):
            # The handshake would fail with an opaque "socket closed"; say what is wrong.
            raise IdentityError(
                f"this agent's certificate expired at {credentials.not_after}; revoke it on "
                "the controller (bulkhead agent revoke ID) and enroll again with a new token"
            )
        channel_credentials = grpc.ssl_channel_credentials(
            credentials.ca_pem, credentials.key_pem, credentials.cert_pem
        )
        async with grpc.aio.secure_channel(
            self._target, channel_credentials, options=CHANNEL_OPTIONS
        ) as channel:
            stub = _AGENT_STUB(channel)
            call: grpc.aio.StreamStreamCall[agent_pb2.AgentMessage, agent_pb2.ControllerMessage] = (
                stub.Connect(_drain(outbox))
            )
            helpers = [
                asyncio.create_task(self._heartbeats(outbox)),
                asyncio.create_task(self._watch_addresses(outbox)),
                asyncio.create_task(self._renewals(outbox, credentials)),
            ]
            if self._flow_reports is not None:
                helpers.append(asyncio.create_task(self._report_flows(outbox, self._flow_reports)))
            try:
                async for message in call:
                    self._stream_up_at = self._stream_up_at or time.monotonic()
                    self._send_tamper_backlog()  # tamper reports waiting for a stream
                    await self._handle(message, outbox)
            finally:
                self._outbox = None
                for task in helpers:
                    task.cancel()
                if self._flow_reports is not None:
                    self._flow_reports.stream_lost()

    async def _handle(
        self, message: agent_pb2.ControllerMessage, outbox: asyncio.Queue[agent_pb2.AgentMessage]
    ) -> None:
        kind = message.WhichOneof("body")
        if kind == "snapshot":
            addresses: Sequence[str] = list(self.addresses)
            ack = await asyncio.to_thread(self._enforcer.apply, message.snapshot, addresses)
            await outbox.put(agent_pb2.AgentMessage(ack=ack))
            await asyncio.to_thread(self._enforcer.cut_pending)
        elif kind == "delta":
            addresses = list(self.addresses)
            ack = await asyncio.to_thread(self._enforcer.apply_delta, message.delta, addresses)
            await outbox.put(agent_pb2.AgentMessage(ack=ack))
            await asyncio.to_thread(self._enforcer.cut_pending)
        elif kind == "flows_stored":
            if self._flow_reports is not None:
                self._flow_reports.stored(message.flows_stored)
        elif kind == "certificate":
            await self._store_renewed(message.certificate.certificate_pem.encode())
        elif kind == "addresses_refused":
            self._addresses_refused(message.addresses_refused)
        elif kind == "connections_request":
            await outbox.put(
                agent_pb2.AgentMessage(
                    connections=await self._connection_table(message.connections_request)
                )
            )
        elif kind == "in_sync":
            if message.in_sync.hash != self._enforcer.applied_hash:
                raise ResyncNeeded(
                    f"controller says revision {message.in_sync.revision} is current, "
                    "but that is not what this host enforces"
                )
            log.info("in sync with controller at revision %d", message.in_sync.revision)
        else:
            log.warning("ignoring unknown controller message %s", kind)

    def _forget_refused(self) -> None:
        if self.refused_addresses:
            self.refused_addresses = {}
            if self._observer is not None:
                self._observer.refuse_local({})

    def _addresses_refused(self, notice: agent_pb2.AddressesRefused) -> None:
        """The controller compiles none of these addresses into anyone's peer sets (held
        by another agent, outside this agent's allowed ranges, not a workload address),
        and refuses a flow report holding a flow on one: leave their flows out. Logged
        once per change."""
        refused: dict[str, str] = {}
        for entry in notice.refused:
            try:
                refused[str(ipaddress.ip_address(entry.address))] = entry.reason
            except ValueError:
                log.warning("ignoring a refused address that is not one: %r", entry.address)
        if refused == self.refused_addresses:
            return
        self.refused_addresses = refused
        if refused:
            log.warning(
                "the controller refuses %d of this host's addresses (peers do not get them "
                "and their flows are not reported): %s", len(refused),
                "; ".join(f"{address}: {reason}" for address, reason in sorted(refused.items())),
            )  # fmt: skip
        else:
            log.info("the controller accepts all of this host's addresses again")
        if self._observer is not None:
            self._observer.refuse_local(refused)

    async def _renewals(
        self, outbox: asyncio.Queue[agent_pb2.AgentMessage], credentials: AgentCredentials
    ) -> None:
        """Ask for a fresh certificate once two thirds of the current one's life are gone
        (again if no answer came within RENEWAL_ANSWER_WAIT_S)."""
        lifetime = (credentials.not_after - credentials.not_before).total_seconds()
        check_every = max(1.0, min(60.0, lifetime / 20))
        asked_at = 0.0
        while True:
            # The newest certificate on disk, so a renewal done on this stream counts.
            credentials = self._renewed or credentials
            waited = time.monotonic() - asked_at
            if self._renewal_key is not None and waited >= RENEWAL_ANSWER_WAIT_S:
                log.warning("no certificate from the controller %.0f s after asking", waited)
                self._renewal_key = None
            if self._renewal_key is None and credentials.needs_renewal(datetime.now(UTC)):
                try:
                    key, csr = await asyncio.to_thread(new_key_and_csr, self._agent_id)
                except IdentityError as exc:
                    log.error("cannot ask for a new certificate: %s; trying again later", exc)
                else:
                    self._renewal_key = key
                    asked_at = time.monotonic()
                    log.info("certificate expires %s; asking for a new one", credentials.not_after)
                    renew = agent_pb2.RenewCertificate(csr_pem=csr.decode())
                    await outbox.put(agent_pb2.AgentMessage(renew=renew))
            await asyncio.sleep(check_every)

    async def _store_renewed(self, cert_pem: bytes) -> None:
        # The key stays set while the key tool checks, so no second renewal starts meanwhile.
        key = self._renewal_key
        try:
            current = await asyncio.to_thread(load_credentials, self._state_dir)
            if key is None or current is None:
                log.warning("ignoring a certificate the agent did not ask for")
                return
            names = Names("the renewal key", "the renewed certificate", CA_FILE)
            renewed = await asyncio.to_thread(
                checked_credentials, key, cert_pem, current.ca_pem, names
            )
        except IdentityError as exc:
            log.error("%s; keeping the old certificate", exc)
            return
        finally:
            self._renewal_key = None
        save_credentials(self._state_dir, renewed)
        self._renewed = renewed
        log.info(
            "certificate renewed; valid until %s (used from the next connection)", renewed.not_after
        )

    async def _report_flows(
        self, outbox: asyncio.Queue[agent_pb2.AgentMessage], reports: FlowReports
    ) -> None:
        """Send pending flows in bounded batches, once the controller has answered hello;
        reports a broken stream did not see acknowledged go first (agent/observe/reports.py)."""
        while True:
            await asyncio.sleep(self._flow_report_interval)
            if self._stream_up_at is None or outbox.qsize() > 0:
                continue  # not up yet, or the controller is not keeping up
            built = reports.changes
            batch = reports.to_send()
            if self._flow_keeper is not None and reports.changes != built:
                await self._flow_keeper.save_soon()  # a new report is on disk before the wire
            for report in batch:
                await outbox.put(agent_pb2.AgentMessage(flows=report))

    async def _connection_table(
        self, request: agent_pb2.ConnectionsRequest
    ) -> agent_pb2.ConnectionTable:
        table = agent_pb2.ConnectionTable(request_id=request.request_id)
        if self._observer is None:
            table.error = "observation is off on this agent (observe: false)"
            return table
        try:
            connections = await asyncio.to_thread(self._observer.connection_table)
        except OSError as exc:
            table.error = f"cannot read the socket tables: {exc}"
            return table
        table.connections.extend(connection_message(c) for c in connections)
        return table

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
