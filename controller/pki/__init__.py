"""The controller's private CA and the identities in client certificates.

Pure logic over the ``cryptography`` library: no gRPC, no store. Errors: ``PkiError``.
"""

from __future__ import annotations

from bulkhead.v1.contract import EnrollmentToken
from controller.pki.authority import CertificateAuthority, cert_pem
from controller.pki.errors import PkiError
from controller.pki.identity import (
    AGENT_URI_PREFIX,
    CONTROLLER_NAME,
    OPERATOR_ROLES,
    OPERATOR_URI_PREFIX,
    Identity,
    certificate_from_pem,
    identity_from_certificate,
    identity_from_pem,
)
from controller.pki.tokens import (
    new_token,
    parse_token,
    secret_digest,
    secret_matches,
)

__all__ = [
    "AGENT_URI_PREFIX",
    "CONTROLLER_NAME",
    "OPERATOR_ROLES",
    "OPERATOR_URI_PREFIX",
    "CertificateAuthority",
    "EnrollmentToken",
    "Identity",
    "PkiError",
    "cert_pem",
    "certificate_from_pem",
    "identity_from_certificate",
    "identity_from_pem",
    "new_token",
    "parse_token",
    "secret_digest",
    "secret_matches",
]
