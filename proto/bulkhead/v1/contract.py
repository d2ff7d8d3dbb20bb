"""The parts of the contract that are code rather than messages, shared by agent and
controller (which never import each other): the ruleset hash, the rules for agent ids
and labels, and the enrollment token format. See PROTOCOL.md beside this file."""

from __future__ import annotations

import hashlib
import re
from typing import NamedTuple

from bulkhead.v1 import ruleset_pb2

AGENT_ID_RULE = (
    "1-63 lowercase letters, digits, '.', '_' or '-', starting and ending with a letter or digit"
)
_AGENT_ID = re.compile(r"[a-z0-9]([a-z0-9._-]{0,61}[a-z0-9])?")

LABEL_KEY_PATTERN = r"[A-Za-z0-9][A-Za-z0-9_.\-/]*"
LABEL_VALUE_PATTERN = r"[A-Za-z0-9._-]{0,63}"
MAX_LABEL_KEY_LENGTH = 63
LABEL_KEY_RULE = (
    f"at most {MAX_LABEL_KEY_LENGTH} letters, digits, '_', '.', '-' and '/', "
    "starting with a letter or digit"
)
LABEL_VALUE_RULE = "up to 63 letters, digits, '.', '_' or '-'"
_LABEL_KEY = re.compile(LABEL_KEY_PATTERN)
_LABEL_VALUE = re.compile(LABEL_VALUE_PATTERN)


def ruleset_hash(ruleset: ruleset_pb2.Ruleset) -> str:
    """Lowercase hex sha256 of the ruleset's deterministic serialisation."""
    return hashlib.sha256(ruleset.SerializeToString(deterministic=True)).hexdigest()


def is_valid_agent_id(text: str) -> bool:
    return _AGENT_ID.fullmatch(text) is not None


def is_valid_label_key(text: str) -> bool:
    return len(text) <= MAX_LABEL_KEY_LENGTH and _LABEL_KEY.fullmatch(text) is not None


def is_valid_label_value(text: str) -> bool:
    return _LABEL_VALUE.fullmatch(text) is not None


# Enrollment tokens: <id>.<secret>.<ca fingerprint>. The id (12 lowercase hex) names the
# token in the controller's store, which keeps only the sha256 of the secret (32 random
# bytes, base64url without padding: 43 characters); the fingerprint (sha256 of the CA
# certificate's DER, lowercase hex) lets the agent pin the CA before it trusts anything.
TOKEN_ID_PATTERN = re.compile(r"[0-9a-f]{12}")
TOKEN_SECRET_PATTERN = re.compile(r"[A-Za-z0-9_-]{43}")
FINGERPRINT_PATTERN = re.compile(r"[0-9a-f]{64}")


class TokenFormatError(ValueError):
    """The text is not an enrollment token; the message names the part (never the secret)."""


class EnrollmentToken(NamedTuple):
    token_id: str
    secret: str
    ca_fingerprint: str


def parse_token(text: str) -> EnrollmentToken:
    """Split and check a token; errors never echo the secret."""
    parts = text.strip().split(".")
    if len(parts) != 3:
        raise TokenFormatError(
            "enrollment token must be <id>.<secret>.<ca-fingerprint>, "
            f"found {len(parts)} part(s) separated by '.'"
        )
    token_id, secret, fingerprint = parts
    if TOKEN_ID_PATTERN.fullmatch(token_id) is None:
        raise TokenFormatError(
            "enrollment token id (first part) must be 12 lowercase hex characters"
        )
    if TOKEN_SECRET_PATTERN.fullmatch(secret) is None:
        raise TokenFormatError(
            "enrollment token secret (second part) must be 43 base64url characters"
        )
    if FINGERPRINT_PATTERN.fullmatch(fingerprint) is None:
        raise TokenFormatError(
            "enrollment token CA fingerprint (third part) must be 64 lowercase hex characters"
        )
    return EnrollmentToken(token_id, secret, fingerprint)
