"""Enrolling simulated agents like real ones, at fleet scale.

The CA is pinned once per fleet the way an agent pins it (read the certificate the
enrollment port presents, fetch the CA over a channel trusting exactly that, check it
against the token's fingerprint and that it issued the presented certificate); then every
agent trades a token and its own CSR for a certificate, a bounded number at a time over one
channel verified against the CA. Tokens come from the operator (`--token`) or are minted
with the admin API (`--operator-credentials`), at most MAX_TOKEN_USES uses each.
"""

from __future__ import annotations

import asyncio
import hashlib
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from bulkhead.presented import presented_certificate_pem
from bulkhead.v1 import agent_pb2, agent_pb2_grpc
from bulkhead.v1.contract import TokenFormatError, parse_token
from controller.cli.client import AdminClient
from controller.cli.errors import CliError
from controller.enrollment import MAX_TOKEN_USES
from controller.pki import CONTROLLER_NAME
from controller.sim.credentials import AgentCredentials, CredentialCache
from controller.sim.errors import SimError

ENROLL_TIMEOUT_S = 10.0
# Transient failures (the controller busy or restarting) are retried this often per agent.
ENROLL_ATTEMPTS = 5
TOKEN_TTL_S = 3600
_CHANNEL_OPTIONS = [("grpc.ssl_target_name_override", CONTROLLER_NAME)]
_RETRYABLE = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.CANCELLED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
    }
)
# The generated stub class is untyped; this alias gives it a type.
_ENROLL_STUB: Callable[[grpc.aio.Channel], Any] = agent_pb2_grpc.EnrollmentServiceStub


@dataclass
class EnrollReport:
    reused: int = 0
    enrolled: int = 0
    seconds: float = 0.0
    # agent id -> why it has no credentials (cache problems and refused enrollments)
    failed: dict[str, str] = field(default_factory=dict)


class TokenPool:
    """Tokens used in turn: one that the controller refuses (used up, expired, revoked)
    is dropped and the next one taken."""

    def __init__(self, tokens: Sequence[str]) -> None:
        self._tokens = list(tokens)
        self._index = 0
        self.last_refusal = ""

    def current(self) -> str:
        if self._index >= len(self._tokens):
            raise SimError(
                "every enrollment token was refused or used up"
                + (f" (last: {self.last_refusal})" if self.last_refusal else "")
                + "; give a token with more uses, or --operator-credentials to mint them"
            )
        return self._tokens[self._index]

    def retire(self, token: str, reason: str) -> None:
        """TOKEN was refused; move on unless another enrollment already did."""
        self.last_refusal = reason
        if self._index < len(self._tokens) and self._tokens[self._index] == token:
            self._index += 1


def mint_tokens(controller: str, operator_dir: Path, agents: int) -> list[str]:
    """Enough enrollment tokens for AGENTS. They carry no labels: the simulated hello does,
    which counts only on a controller that trusts those keys (--trust-host-label-keys; the
    benchmark's own controller does)."""
    tokens = []
    try:
        with AdminClient(controller, operator_dir) as admin:
            for start in range(0, agents, MAX_TOKEN_USES):
                uses = min(MAX_TOKEN_USES, agents - start)
                tokens.append(admin.create_token({}, TOKEN_TTL_S, uses).token)
    except CliError as exc:
        raise SimError(f"--operator-credentials: cannot create tokens: {exc}") from exc
    return tokens


def new_key_and_csr(agent_id: str) -> tuple[bytes, bytes]:
    """A fresh P-256 key (PEM) and a CSR for AGENT_ID (PEM)."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, agent_id)])
    csr = x509.CertificateSigningRequestBuilder().subject_name(subject).sign(key, hashes.SHA256())
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return key_pem, csr.public_bytes(serialization.Encoding.PEM)


def ca_fingerprint(pem: bytes) -> str:
    cert = x509.load_pem_x509_certificate(pem)
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


def presented_certificate(address: str) -> bytes:
    """The PEM certificate presented at ADDRESS (HOST:PORT), not verified yet."""
    host, _, port = address.rpartition(":")
    try:
        pem = presented_certificate_pem(host.strip("[]"), int(port), ENROLL_TIMEOUT_S)
    except OSError as exc:
        raise SimError(f"--enroll-address {address}: cannot reach the controller: {exc}") from exc
    if pem is None:
        raise SimError(f"--enroll-address {address}: the controller presented no certificate")
    return pem.encode()


def issued_by(leaf_pem: bytes, ca_pem: bytes) -> bool:
    try:
        leaf = x509.load_pem_x509_certificate(leaf_pem)
        leaf.verify_directly_issued_by(x509.load_pem_x509_certificate(ca_pem))
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


async def pinned_ca(address: str, token: str) -> bytes:
    """The controller's CA, checked against the fingerprint TOKEN pins."""
    try:
        pinned = parse_token(token).ca_fingerprint
    except TokenFormatError as exc:
        raise SimError(f"--token: {exc}") from exc
    presented = await asyncio.to_thread(presented_certificate, address)
    credentials = grpc.ssl_channel_credentials(presented)
    try:
        async with grpc.aio.secure_channel(address, credentials, options=_CHANNEL_OPTIONS) as ch:
            reply = await _ENROLL_STUB(ch).GetCA(agent_pb2.GetCARequest(), timeout=ENROLL_TIMEOUT_S)
    except grpc.aio.AioRpcError as exc:
        raise SimError(f"--enroll-address {address}: GetCA failed: {exc.details()}") from exc
    ca_pem: bytes = reply.ca_pem.encode()
    if ca_fingerprint(ca_pem) != pinned:
        raise SimError(
            f"--enroll-address {address}: the controller's CA is not the one the token pins"
        )
    if not issued_by(presented, ca_pem):
        raise SimError(f"--enroll-address {address}: the presented certificate is not from its CA")
    return ca_pem


async def enroll_fleet(
    agent_ids: Sequence[str],
    cache: CredentialCache,
    *,
    enroll_address: str,
    tokens: Callable[[int], Sequence[str]],
    concurrency: int,
    progress: Callable[[int], None] | None = None,
) -> tuple[dict[str, AgentCredentials], EnrollReport]:
    """Credentials for every agent: the cached ones, the rest enrolled and cached.
    TOKENS(n) gives enrollment tokens for n agents; it is called only if some agent has
    no cached credentials. Agents that could not get any are in the report's `failed`."""
    started = time.monotonic()
    usable, problems = await asyncio.to_thread(cache.load, list(agent_ids))
    report = EnrollReport(reused=len(usable), failed=dict(problems))
    missing = [i for i in agent_ids if i not in usable and i not in problems]
    if missing:
        given = await asyncio.to_thread(tokens, len(missing))
        if not given:
            raise SimError(
                f"{len(missing)} agent(s) have no credentials in {cache.directory}: give "
                "--token or --operator-credentials to enroll them"
            )
        ca_pem = await pinned_ca(enroll_address, given[0])
        cached = cache.ca_pem()
        if cached is not None and ca_fingerprint(cached) != ca_fingerprint(ca_pem):
            raise SimError(
                f"--credentials {cache.directory} holds agents of another controller (its "
                "ca.crt differs): use a fresh directory for this controller"
            )
        cache.save_ca(ca_pem)
        enroller = _Enroller(enroll_address, ca_pem, TokenPool(given), cache, concurrency)
        await enroller.run(missing, usable, report, progress)
    report.seconds = time.monotonic() - started
    return usable, report


class _Enroller:
    def __init__(
        self,
        address: str,
        ca_pem: bytes,
        pool: TokenPool,
        cache: CredentialCache,
        concurrency: int,
    ) -> None:
        self._address = address
        self._ca_pem = ca_pem
        self._pool = pool
        self._cache = cache
        self._slots = asyncio.Semaphore(concurrency)

    async def run(
        self,
        agent_ids: Sequence[str],
        usable: dict[str, AgentCredentials],
        report: EnrollReport,
        progress: Callable[[int], None] | None,
    ) -> None:
        credentials = grpc.ssl_channel_credentials(self._ca_pem)
        async with grpc.aio.secure_channel(
            self._address, credentials, options=_CHANNEL_OPTIONS
        ) as channel:
            stub = _ENROLL_STUB(channel)

            async def one(agent_id: str) -> None:
                async with self._slots:
                    outcome = await self._enroll(stub, agent_id)
                if isinstance(outcome, str):
                    report.failed[agent_id] = outcome
                    return
                usable[agent_id] = outcome
                report.enrolled += 1
                if progress is not None:
                    progress(report.enrolled)

            try:
                async with asyncio.TaskGroup() as group:
                    for agent_id in agent_ids:
                        group.create_task(one(agent_id))
            except* SimError as failures:
                raise failures.exceptions[0] from None

    async def _enroll(self, stub: Any, agent_id: str) -> AgentCredentials | str:
        """The agent's cached credentials, or why it could not enroll."""
        key_pem, csr_pem = new_key_and_csr(agent_id)
        attempts = 0
        while True:
            token = self._pool.current()
            request = agent_pb2.EnrollRequest(
                token=token, agent_id=agent_id, csr_pem=csr_pem.decode(), hostname=agent_id
            )
            try:
                reply = await stub.Enroll(request, timeout=ENROLL_TIMEOUT_S)
            except grpc.aio.AioRpcError as exc:
                details = exc.details() or exc.code().name
                if exc.code() == grpc.StatusCode.UNAUTHENTICATED and details.startswith("token"):
                    self._pool.retire(token, details)
                    continue
                attempts += 1
                if exc.code() not in _RETRYABLE:
                    return f"enrollment refused: {details}"
                if attempts >= ENROLL_ATTEMPTS:
                    return f"enrollment failed {attempts} times, last: {details}"
                await asyncio.sleep(random.uniform(0.1, 0.5 * 2**attempts))
                continue
            credentials = AgentCredentials(key_pem, reply.certificate_pem.encode())
            self._cache.save(agent_id, credentials)
            return credentials
