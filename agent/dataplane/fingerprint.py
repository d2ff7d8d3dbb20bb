"""Fingerprints of what a backend holds in the kernel, compared to notice tampering.

A fingerprint is text with one line per component the backend owns ("table inet bulkhead",
"chain input", "set web_v4", "ipv4 chain BULKHEAD-INPUT", "ipset bh4-web"): its name, a
tab and a digest of its canonical content, sorted by name. Equal fingerprints mean nothing
changed; comparing the lines says what did, without keeping the content itself around.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping

# The fingerprint of a backend that holds nothing at all in the kernel.
ABSENT = "absent"
# Components whose absence makes listing the rest pointless ("table inet bulkhead missing").
_CONTAINER_PREFIX = "table "
_DIGEST_CHARS = 32


def _digest(content: object) -> str:
    canonical = json.dumps(content, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:_DIGEST_CHARS]


def compose(components: Mapping[str, object]) -> str:
    """The fingerprint of these components (name -> JSON-serialisable content)."""
    if not components:
        return ABSENT
    return "\n".join(f"{name}\t{_digest(components[name])}" for name in sorted(components))


def parse(fingerprint: str) -> dict[str, str]:
    """Component name -> digest; empty for ABSENT."""
    parsed: dict[str, str] = {}
    for line in fingerprint.splitlines():
        name, tab, digest = line.rpartition("\t")
        if tab:
            parsed[name] = digest
    return parsed


def differences(expected: str, live: str) -> list[str]:
    """What differs between two fingerprints, in words, most telling first."""
    before, after = parse(expected), parse(live)
    missing = [name for name in before if name not in after]
    containers = [name for name in missing if name.startswith(_CONTAINER_PREFIX)]
    if containers:
        return [f"{name} missing" for name in containers]
    found = [f"{name} missing" for name in missing]
    found += [_changed(name) for name in before if name in after and before[name] != after[name]]
    found += [f"unexpected {name}" for name in after if name not in before]
    return found


def _changed(name: str) -> str:
    if name.startswith("chain ") or " chain " in name:
        return f"{name}: rules differ"
    return f"{name} changed"


def describe(expected: str, live: str, limit: int = 4) -> str:
    """One line for operators: the first few differences and how many more there are."""
    found = differences(expected, live) or ["state changed"]
    shown = "; ".join(found[:limit])
    return shown if len(found) <= limit else f"{shown}; and {len(found) - limit} more"
