"""What may reach the operator's terminal: text from a host never acts on it.

Hosts are not trusted, and much of what the CLI prints came from one (hostnames, labels,
addresses, process names, errors). ``printable`` writes each character that would act on
the terminal as an escape; the tables, describe views and error lines use it. The json
output goes through ``escape_in_json``; yaml is encoded as ASCII when ``has_active``.
"""

from __future__ import annotations

import re

# Characters that act on a terminal instead of showing (ESC starts a control sequence, C1
# controls do as much on some terminals), reorder what follows (bidirectional embeddings,
# overrides and isolates) or break a line. The newline apart: json and yaml use it.
_ACTIVE = "\x00-\x09\x0b-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069"
_ACTIVE_IN_TEXT = re.compile(f"[\n{_ACTIVE}]")
_ACTIVE_IN_DOCUMENT = re.compile(f"[{_ACTIVE}]")


def printable(value: object) -> str:
    """VALUE as text with each character that would act on the terminal written as an
    escape instead (ESC as `\\x1b`, U+202E as `\\u202e`, a newline as `\\x0a`)."""
    return _ACTIVE_IN_TEXT.sub(_escape, str(value))


def has_active(document: str) -> bool:
    """Whether DOCUMENT (json or yaml text) holds a character that would act on the terminal."""
    return _ACTIVE_IN_DOCUMENT.search(document) is not None


def escape_in_json(text: str) -> str:
    """JSON TEXT with each active character as a \\uXXXX escape: json escapes C0 controls
    itself, and the others can only stand inside strings, where the escape means them."""
    return _ACTIVE_IN_DOCUMENT.sub(lambda match: f"\\u{ord(match.group()):04x}", text)


def _escape(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code <= 0xFF else f"\\u{code:04x}"
