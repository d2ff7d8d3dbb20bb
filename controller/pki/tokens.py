"""Making and checking enrollment tokens; the format itself is in bulkhead.v1.contract."""

from __future__ import annotations

import hashlib
import hmac
import secrets

from bulkhead.v1 import contract
from bulkhead.v1.contract import EnrollmentToken
from controller.pki.errors import PkiError


def new_token(ca_fingerprint: str) -> tuple[str, str, str]:
    """(full token text for the operator, token id, secret digest for the store)."""
    if contract.FINGERPRINT_PATTERN.fullmatch(ca_fingerprint) is None:
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
    """Split and check a token (format in bulkhead.v1.contract); PkiError if malformed."""
    try:
        return contract.parse_token(text)
    except contract.TokenFormatError as exc:
        raise PkiError(str(exc)) from exc
