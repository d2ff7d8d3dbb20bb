"""The parts of the contract that are code rather than messages, shared by agent and
controller (which never import each other): the ruleset hash and the agent id rule.
See PROTOCOL.md beside this file."""

from __future__ import annotations

import hashlib
import re

from bulkhead.v1 import ruleset_pb2

AGENT_ID_RULE = (
    "1-63 lowercase letters, digits, '.', '_' or '-', starting and ending with a letter or digit"
)
_AGENT_ID = re.compile(r"[a-z0-9]([a-z0-9._-]{0,61}[a-z0-9])?")


def ruleset_hash(ruleset: ruleset_pb2.Ruleset) -> str:
    """Lowercase hex sha256 of the ruleset's deterministic serialisation."""
    return hashlib.sha256(ruleset.SerializeToString(deterministic=True)).hexdigest()


def is_valid_agent_id(text: str) -> bool:
    return _AGENT_ID.fullmatch(text) is not None
