"""Enrollment tokens: ``<id>.<secret>.<ca fingerprint>``.

The id (12 lowercase hex) names the token in the store, which keeps only the sha256 of
the secret (32 random bytes, base64url without padding: 43 characters). The CA
fingerprint lets the agent pin the controller's CA before it has a certificate. The agent
parses the same format in agent/identity.py (it cannot import the controller).
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from typing import NamedTuple

from controller.pki.errors import PkiError

_TOKEN_ID = re.compile(r"[0-9a-f]{12}")
_SECRET = re.compile(r"[A-Za-z0-9_-]{43}")
_FINGERPRINT = re.compile(r"[0-9a-f]{64}")


class EnrollmentToken(NamedTuple):
    """A NamedTuple so callers may unpack it: ``token_id, secret, fingerprint = ...``."""

    token_id: str
    secret: str
    ca_fingerprint: str


def new_token(ca_fingerprint: str) -> tuple[str, str, str]:
    """(full token text for the operator, token id, secret digest for the store)."""
    if _FINGERPRINT.fullmatch(ca_fingerprint) is None:
        raise PkiError("CA fingerprint must be 64 lowercase hex characters (sha256)")
    token_id = secrets.token_hex(6)
    secret = secrets.token_urlsafe(32)
    return f"{token_id}.{secret}.{ca_fingerprint}", token_id, secret_digest(secret)


def secret_digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def secret_matches(secret: str, digest: str) -> bool:
    """Constant-time check of SECRET against a stored digest."""
    return hmac.compare_digest(secret_digest(secret), digest)


def parse_token(text: str) -> EnrollmentToken:
    """Split and check a token; errors never echo the secret."""
    parts = text.strip().split(".")
    if len(parts) != 3:
        raise PkiError(
            f"enrollment token must be <id>.<secret>.<ca-fingerprint>, "
            f"found {len(parts)} part(s) separated by '.'"
        )
    token_id, secret, fingerprint = parts
    if _TOKEN_ID.fullmatch(token_id) is None:
        raise PkiError("enrollment token id (first part) must be 12 lowercase hex characters")
    if _SECRET.fullmatch(secret) is None:
        raise PkiError("enrollment token secret (second part) must be 43 base64url characters")
    if _FINGERPRINT.fullmatch(fingerprint) is None:
        raise PkiError(
            "enrollment token CA fingerprint (third part) must be 64 lowercase hex characters"
        )
    return EnrollmentToken(token_id, secret, fingerprint)
