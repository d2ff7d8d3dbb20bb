"""AgentService: one long-lived stream per agent (see proto/bulkhead/v1/PROTOCOL.md)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc
from google.protobuf.message import DecodeError

from bulkhead.v1 import agent_pb2, agent_pb2_grpc
from controller.core import Controller
from controller.enrollment import Presented, RenewalRefused
from controller.errors import ControllerError, InvalidArgument
from controller.server.auth import agent_caller
from controller.server.errors import status_for
from controller.sessions import AgentSession

log = logging.getLogger(__name__)

# An agent that opens a stream must say hello promptly; a silent peer is dropped.
HELLO_TIMEOUT_S = 10.0
NOT_AN_AGENT_MESSAGE = "message: not a valid bulkhead.v1.AgentMessage (corrupt or foreign bytes)"


@dataclass
class _Renewals:
    """One stream's renewals: a certificate is issued at most once per stream."""

    issued: bool = False
    refused: int = 0


class AgentServicer(agent_pb2_grpc.AgentServiceServicer):
    def __init__(self, core: Controller) -> None:
        self._core = core

    async def Connect(
        self,
        request_iterator: AsyncIterator[agent_pb2.AgentMessage],
        context: grpc.aio.ServicerContext[agent_pb2.AgentMessage, agent_pb2.ControllerMessage],
    ) -> AsyncIterator[agent_pb2.ControllerMessage]:
        # Who is calling comes first and only from the certificate: an untrusted peer
        # gets nothing, not even a read of its first message.
        try:
            agent_id, presented = agent_caller(context, self._core.enrollment)
        except ControllerError as exc:
            await context.abort(status_for(exc), str(exc))
        try:
            first = await asyncio.wait_for(anext(request_iterator), HELLO_TIMEOUT_S)
        except (TimeoutError, StopAsyncIteration):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "expected hello first")
        except DecodeError:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, NOT_AN_AGENT_MESSAGE)
        if first.WhichOneof("body") != "hello":
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"first message must be hello, got {first.WhichOneof('body') or 'nothing'}",
            )
        try:
            session = self._core.connect(agent_id, first.hello)
        except ControllerError as exc:
            await context.abort(status_for(exc), str(exc))
        reader = asyncio.create_task(self._read(session, presented, request_iterator))
        try:
            while (message := await session.next_message()) is not None:
                yield message
        finally:
            reader.cancel()
            self._core.disconnect(session)
        if session.failure is not None:
            await context.abort(status_for(session.failure), str(session.failure))

    async def _read(
        self,
        session: AgentSession,
        presented: Presented,
        requests: AsyncIterator[agent_pb2.AgentMessage],
    ) -> None:
        """Dispatch what the agent sends until its side of the stream ends."""
        renewals = _Renewals()
        try:
            async for message in requests:
                kind = message.WhichOneof("body")
                if kind == "heartbeat":
                    self._core.heartbeat(session.agent_id)
                elif kind == "addresses":
                    self._core.addresses_changed(
                        session.agent_id, list(message.addresses.addresses)
                    )
                elif kind == "ack":
                    self._core.acknowledged(session.agent_id, message.ack)
                elif kind == "config":
                    self._core.config_changed(session.agent_id, message.config)
                elif kind == "tamper":
                    self._core.agent_events.tampered(session.agent_id, message.tamper)
                elif kind == "flows":
                    stored = self._core.observations.record(session.agent_id, message.flows)
                    if stored is not None:
                        session.send(agent_pb2.ControllerMessage(flows_stored=stored))
                elif kind == "connections":
                    self._core.observations.answered(session.agent_id, message.connections)
                elif kind == "renew":
                    self._renew(session, presented, message.renew, renewals)
                else:
                    log.warning("agent %s sent unexpected %s; ignored", session.agent_id, kind)
        except ControllerError as exc:
            log.warning("agent %s: %s; closing its stream", session.agent_id, exc)
            session.failure = exc
        except DecodeError:
            log.warning("agent %s sent undecodable bytes; closing its stream", session.agent_id)
            session.failure = InvalidArgument([NOT_AN_AGENT_MESSAGE])
        except (grpc.aio.AioRpcError, asyncio.CancelledError):
            pass
        except Exception:
            log.exception("agent %s: unexpected error; closing its stream", session.agent_id)
            session.failure = ControllerError("internal error in the controller; see its log")
        finally:
            session.close()

    def _renew(
        self,
        session: AgentSession,
        presented: Presented,
        request: agent_pb2.RenewCertificate,
        renewals: _Renewals,
    ) -> None:
        """Answer a renewal with a certificate, recorded as an agent event. One refused as
        too early or as a second on this stream gets no answer and the stream stays up (a
        legitimate agent asks once, in the last third, and asks again later if no answer
        came); it is recorded as an agent event too (merged: a flood makes one row) and
        logged once per stream. Revoked or expired certificates end the stream."""
        agent_id = session.agent_id
        events = self._core.agent_events
        try:
            pem, issued = self._core.enrollment.renew(
                agent_id, request.csr_pem.encode(), presented, renewed_on_stream=renewals.issued
            )
        except RenewalRefused as exc:
            renewals.refused += 1
            if renewals.refused == 1:
                log.warning("%s; not answered", exc)
            events.record(agent_id, "agent.renewal_refused", {"reason": str(exc)})
            return
        renewals.issued = True
        events.record(
            agent_id, "agent.renewed",
            {"serial": issued.serial, "not_after_unix_ms": issued.not_after_ms,
             "previous_serial": presented.serial},
        )  # fmt: skip
        certificate = agent_pb2.CertificateIssued(certificate_pem=pem.decode())
        session.send(agent_pb2.ControllerMessage(certificate=certificate))
