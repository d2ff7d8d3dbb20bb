"""Test PKI: a real CA in a temporary directory and the gRPC credentials made from it."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any

import grpc

from agent.identity import generate_key, key_pem, make_csr
from controller.core import Controller
from controller.enrollment import Enrollment
from controller.pki import (
    CONTROLLER_NAME,
    CertificateAuthority,
    cert_pem,
    certificate_from_pem,
    identity_from_certificate,
)
from controller.store.sqlite_store import SqliteStore

# Clients verify the controller by this name, whatever address they dial.
CHANNEL_OPTIONS = [("grpc.ssl_target_name_override", CONTROLLER_NAME)]


def make_controller(directory: Path, **options: Any) -> Controller:
    directory.mkdir(parents=True, exist_ok=True)
    store = SqliteStore(directory / "c.db")
    ca = CertificateAuthority.load_or_create(directory / "pki")
    return Controller(store, Enrollment(store, ca), **options)


def server_credentials(
    ca: CertificateAuthority, *, require_client: bool = True
) -> grpc.ServerCredentials:
    cert, key = ca.issue_server(("127.0.0.1",))
    return grpc.ssl_server_credentials(
        [(key, cert)], root_certificates=ca.certificate_pem, require_client_auth=require_client
    )


def agent_credentials(
    ca: CertificateAuthority, agent_id: str, core: Controller | None = None
) -> grpc.ChannelCredentials:
    """An agent certificate; put on CORE's record (as enrollment does) when given."""
    key = generate_key()
    certificate = ca.issue_agent(make_csr(key, agent_id), agent_id, timedelta(hours=1))
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
