"""The parts of the contract that are code rather than messages, shared by agent and
controller (which never import each other): the ruleset hash and the rules for agent ids
and labels. See PROTOCOL.md beside this file."""

from __future__ import annotations

import hashlib
import re

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
