"""Who is calling: the verified client certificate, and what that identity may do.

The TLS layer has already checked the chain against the controller's CA (a certificate
from another CA never gets here); this adds revocation and the identity's kind and role.
Identity comes only from the certificate, never from a message field.
"""

from __future__ import annotations

from typing import Any

import grpc

from controller.enrollment import Enrollment, Presented
from controller.errors import PermissionDenied, Unauthenticated
from controller.pki import Identity, PkiError, certificate_from_pem, identity_from_certificate

ADMIN = "admin"
VIEWER = "viewer"


def caller(context: grpc.aio.ServicerContext[Any, Any], enrollment: Enrollment) -> Identity:
    """The identity of the peer's certificate; Unauthenticated if there is none to trust."""
    return caller_certificate(context, enrollment)[0]


def caller_certificate(
    context: grpc.aio.ServicerContext[Any, Any], enrollment: Enrollment
) -> tuple[Identity, Presented]:
    """The identity and the certificate the peer presented, once both are trusted."""
    pem = next(iter(context.auth_context().get("x509_pem_cert") or []), None)
    if pem is None:
        raise Unauthenticated(
            "a client certificate issued by this controller's CA is required "
            "(agents: bulkhead-agent enroll; operators: bulkhead-controller admin-cert)"
        )
    try:
        certificate = certificate_from_pem(pem)
        identity = identity_from_certificate(certificate)
    except PkiError as exc:
        raise Unauthenticated(f"client certificate: {exc}") from exc
    presented = Presented.of(certificate)
    if not enrollment.is_trusted(presented, identity.uri):
        raise Unauthenticated(
            f"{identity.uri}: certificate revoked or not issued by this controller"
        )
    return identity, presented


def agent_caller(
    context: grpc.aio.ServicerContext[Any, Any], enrollment: Enrollment
) -> tuple[str, Presented]:
    """The agent id of an agent caller, and the certificate it connected with."""
    identity, presented = caller_certificate(context, enrollment)
    if identity.kind != "agent":
        raise PermissionDenied(f"{identity.uri} is not an agent")
    return identity.name, presented


def operator_caller(
    context: grpc.aio.ServicerContext[Any, Any], enrollment: Enrollment, *, write: bool
) -> str:
    """The audit name ("operator:NAME") of an operator allowed to read, or to write."""
    identity = caller(context, enrollment)
    if identity.kind != "operator":
        raise PermissionDenied(f"{identity.uri} is not an operator")
    if write and identity.role != ADMIN:
        raise PermissionDenied(
            f"operator '{identity.name}' has the {identity.role} role: it may read, not change"
        )
    return f"operator:{identity.name}"
