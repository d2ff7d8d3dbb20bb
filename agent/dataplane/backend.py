"""The interface every dataplane backend implements, and the dataplane's errors.

Exception tree::

    DataplaneError          anything the dataplane could not do
    ├── RulesetError        the ruleset or baseline is invalid; nothing was changed
    └── NftError            libnftables refused a command (in libnftables.py)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from agent.dataplane.baseline import Baseline
from bulkhead.v1 import agent_pb2, ruleset_pb2


class DataplaneError(Exception):
    """The dataplane could not carry out a request."""


class RulesetError(DataplaneError, ValueError):
    """A ruleset or baseline is invalid; the message names the field and the problem."""


class Backend(Protocol):
    """Renders a compiled ruleset into the kernel; apply is the only writer."""

    def apply(self, ruleset: ruleset_pb2.Ruleset, baseline: Baseline) -> None:
        """Replace everything the agent owns with this ruleset, atomically."""

    def update_elements(
        self,
        changes: Sequence[agent_pb2.SetChange],
        result: ruleset_pb2.Ruleset,
        baseline: Baseline,
    ) -> bool:
        """Apply a policy delta's set CHANGES to the ruleset applied last, atomically,
        without reloading it; RESULT is the ruleset they make. False (nothing changed) if
        the backend cannot; the caller then applies RESULT whole."""

    def remove(self) -> None:
        """Delete everything the agent owns; no error if nothing is there."""

    def is_present(self) -> bool:
        """Whether the agent's rules are currently loaded."""

    def state_fingerprint(self) -> str:
        """A digest of what the kernel holds for the agent right now, blind to what changes
        legitimately (counters); fingerprint.ABSENT if nothing. Two equal fingerprints mean
        nobody changed anything in between (see agent/dataplane/fingerprint.py)."""
