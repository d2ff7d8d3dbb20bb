"""Test PKI: a real CA in a temporary directory, the gRPC credentials made from it, and an
enrollment port."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import grpc

from agent.identity import AgentCredentials, Validity
from agent.keytool import generate_key, key_pem, make_csr
from bulkhead.v1 import agent_pb2_grpc
from controller.core import Controller
from controller.enrollment import DEFAULT_AGENT_CERT_TTL, Enrollment
from controller.pki import (
    CONTROLLER_NAME,
    CertificateAuthority,
    cert_pem,
    certificate_from_pem,
    identity_from_certificate,
)
from controller.server.enrollment_servicer import EnrollmentServicer
from controller.server.enrollment_throttle import EnrollmentThrottle
from controller.store.sqlite_store import SqliteStore

# The token of a group write (bulkhead.privatefile) that a crash interrupted, in tests that
# replay one by placing its pending files.
CRASHED_WRITE = "0123456789abcdef"
# Clients verify the controller by this name, whatever address they dial.
CHANNEL_OPTIONS = [("grpc.ssl_target_name_override", CONTROLLER_NAME)]


def make_controller(
    directory: Path, *, agent_cert_ttl: timedelta = DEFAULT_AGENT_CERT_TTL, **options: Any
) -> Controller:
    directory.mkdir(parents=True, exist_ok=True)
    store = SqliteStore(directory / "c.db")
    ca = CertificateAuthority.load_or_create(directory / "pki")
    return Controller(store, Enrollment(store, ca, agent_cert_ttl=agent_cert_ttl), **options)


# Label keys that the compile and push tests let hosts report themselves (the controller
# setting --trust-host-label-keys): those tests are about compiling, not about trust.
HOST_LABEL_KEYS = frozenset({"app", "env", "role", "tier"})


def make_trusting_controller(directory: Path, **options: Any) -> Controller:
    """A controller that compiles the labels hosts report for HOST_LABEL_KEYS."""
    return make_controller(directory, trusted_label_keys=HOST_LABEL_KEYS, **options)


def issued_credentials(ca: CertificateAuthority, agent_id: str, ttl: timedelta) -> AgentCredentials:
    """An agent's credentials as enrollment leaves them, made in this process (unlike the
    agent, the tests may load cryptography)."""
    key = generate_key()
    cert = ca.issue_agent(make_csr(key, agent_id), agent_id, ttl)
    validity = Validity(cert.not_valid_before_utc, cert.not_valid_after_utc)
    return AgentCredentials(key_pem(key), cert_pem(cert), ca.certificate_pem, validity)


def server_credentials(
    ca: CertificateAuthority, *, require_client: bool = True
) -> grpc.ServerCredentials:
    cert, key = ca.issue_server(("127.0.0.1",))
    return grpc.ssl_server_credentials(
        [(key, cert)], root_certificates=ca.certificate_pem, require_client_auth=require_client
    )


def agent_credentials(
    ca: CertificateAuthority,
    agent_id: str,
    core: Controller | None = None,
    *,
    ttl: timedelta = timedelta(hours=1),
) -> grpc.ChannelCredentials:
    """An agent certificate; put on CORE's record (as enrollment does) when given. Its life
    is TTL plus the CA's 5 min backdating: with a TTL under 2.5 min, it is in its last
    third (renewable) at once."""
    key = generate_key()
    certificate = ca.issue_agent(make_csr(key, agent_id), agent_id, ttl)
    if core is not None:
        core.enrollment.record_certificate(certificate, identity_from_certificate(certificate).uri)
    return grpc.ssl_channel_credentials(ca.certificate_pem, key_pem(key), cert_pem(certificate))


def operator_credentials(
    ca: CertificateAuthority, name: str, role: str, core: Controller | None = None
) -> grpc.ChannelCredentials:
    """An operator certificate; put on CORE's record (as admin-cert does) when given."""
    cert, key = ca.issue_operator(name, role, timedelta(hours=1))
    if core is not None:
        certificate = certificate_from_pem(cert)
        core.enrollment.record_certificate(certificate, identity_from_certificate(certificate).uri)
    return grpc.ssl_channel_credentials(ca.certificate_pem, key, cert)


def anonymous_credentials(ca: CertificateAuthority) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(ca.certificate_pem)


def with_enrollment_server(
    tmp_path: Path,
    body: Callable[[Controller, str], Awaitable[None]],
    *,
    ca_dir: str = "pki",
    throttle: EnrollmentThrottle | None = None,
) -> None:
    """Run BODY(core, address) with an enrollment port whose certificate is from CA_DIR."""

    async def run() -> None:
        core = make_controller(tmp_path)
        presented_by = CertificateAuthority.load_or_create(tmp_path / ca_dir)
        server = grpc.aio.server()
        agent_pb2_grpc.add_EnrollmentServiceServicer_to_server(
            EnrollmentServicer(core.enrollment, throttle), server
        )
        port = server.add_secure_port(
            "127.0.0.1:0", server_credentials(presented_by, require_client=False)
        )
        await server.start()
        try:
            await body(core, f"127.0.0.1:{port}")
        finally:
            await server.stop(None)

    asyncio.run(run())
