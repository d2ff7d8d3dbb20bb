"""Enrollment: trade a one-time token for a client certificate, without ever sending the
token to anyone but the controller whose CA the token pins.

1. Read the controller's TLS certificate on the enrollment port (unverified so far).
2. Ask for the CA certificate over a channel that trusts exactly that certificate.
3. Check the CA against the fingerprint in the token, and that it issued the certificate
   the controller presented. A man in the middle fails here, before the token goes out.
4. Send token and CSR over a channel verified against the pinned CA; check that the
   certificate that comes back certifies our key; store key, certificate and CA (0600).

The key, the CSR, the checks and the reading of the presented certificate come from the
key tool (agent/identity.py), so an agent that enrolls at start neither loads the
cryptography package nor makes a TLS connection of its own.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc

from agent.identity import (
    AgentCredentials,
    IdentityError,
    KeytoolError,
    Names,
    Unreachable,
    ca_fingerprint,
    check_certificate,
    checked_credentials,
    new_key_and_csr,
    parse_token,
    presented_certificate,
    save_credentials,
)
from bulkhead.v1 import agent_pb2, agent_pb2_grpc

log = logging.getLogger(__name__)

# Clients verify the controller by this name, whatever address they dial.
CONTROLLER_NAME = "bulkhead-controller"
CHANNEL_OPTIONS = [("grpc.ssl_target_name_override", CONTROLLER_NAME)]
TIMEOUT_S = 10.0
_STUB: Callable[[grpc.aio.Channel], Any] = agent_pb2_grpc.EnrollmentServiceStub


class EnrollmentError(Exception):
    """Enrollment did not happen; the message says why and what to do."""

    def __init__(self, message: str, *, retryable: bool = False) -> None:
        super().__init__(message)
        # True when the controller could not be reached: trying again later may work.
        self.retryable = retryable


# Worth trying again with the backoff: the controller could not be reached, or it throttled
# this source address for failed attempts (perhaps another host's behind the same address).
_RETRYABLE = (
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
)


async def enroll(
    address: str, token_text: str, agent_id: str, hostname: str, state_dir: Path
) -> tuple[AgentCredentials, dict[str, str]]:
    """Enroll at ADDRESS (the enrollment port, ADDRESS:PORT with an IP literal); store and
    return the credentials and the labels the token gives."""
    try:
        token = parse_token(token_text)
    except IdentityError as exc:
        raise EnrollmentError(str(exc)) from exc
    host, _, port_text = address.rpartition(":")
    host = host.strip("[]")
    try:
        presented = await asyncio.to_thread(presented_certificate, host, int(port_text), TIMEOUT_S)
    except Unreachable as exc:
        raise EnrollmentError(
            f"cannot reach the controller at {host}:{port_text}: {exc}", retryable=True
        ) from exc
    except IdentityError as exc:
        raise EnrollmentError(str(exc)) from exc
    try:
        async with grpc.aio.secure_channel(
            address, grpc.ssl_channel_credentials(presented), options=CHANNEL_OPTIONS
        ) as channel:
            reply = await _STUB(channel).GetCA(agent_pb2.GetCARequest(), timeout=TIMEOUT_S)
        ca_pem = reply.ca_pem.encode()
        try:
            fingerprint = ca_fingerprint(ca_pem)
        except IdentityError as exc:
            raise EnrollmentError(
                f"the controller at {address} sent an unusable CA: {exc}"
            ) from exc
        if fingerprint != token.ca_fingerprint:
            raise EnrollmentError(
                f"the controller at {address} has CA {fingerprint[:16]}..., but the "
                f"token pins {token.ca_fingerprint[:16]}...: not sending the token. Is this the "
                "right controller, and the token from it?"
            )
        presented_names = Names(cert=f"the certificate presented at {address}", ca="the token")
        try:
            await asyncio.to_thread(check_certificate, presented, ca_pem, names=presented_names)
        except KeytoolError as exc:
            raise EnrollmentError(f"{exc}; not sending the token") from exc
        except IdentityError as exc:
            raise EnrollmentError(
                f"{exc}: not sending the token (someone may be in the way)"
            ) from exc
        try:
            key, csr = await asyncio.to_thread(new_key_and_csr, agent_id)
        except IdentityError as exc:
            raise EnrollmentError(f"cannot make this agent's key: {exc}") from exc
        request = agent_pb2.EnrollRequest(
            token=token_text, agent_id=agent_id, csr_pem=csr.decode(), hostname=hostname
        )
        async with grpc.aio.secure_channel(
            address, grpc.ssl_channel_credentials(ca_pem), options=CHANNEL_OPTIONS
        ) as channel:
            response = await _STUB(channel).Enroll(request, timeout=TIMEOUT_S)
    except grpc.aio.AioRpcError as exc:
        unreachable = exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
        verb = "could not be reached" if unreachable else "refused"
        raise EnrollmentError(
            f"the controller at {address} {verb}: {exc.details() or exc.code().name}",
            retryable=exc.code() in _RETRYABLE,
        ) from exc
    issued_names = Names("the new key", f"the certificate issued by {address}", "the token")
    try:
        credentials = await asyncio.to_thread(
            checked_credentials, key, response.certificate_pem.encode(), ca_pem, issued_names
        )
    except IdentityError as exc:
        raise EnrollmentError(f"the controller issued an unusable certificate: {exc}") from exc
    save_credentials(state_dir, credentials)
    log.info("enrolled as %s; certificate valid until %s", agent_id, credentials.not_after)
    return credentials, dict(response.labels)
