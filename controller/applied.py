"""What each agent acknowledged, kept as shared parts in the store: the base of policy
deltas after a controller restart.

An acknowledged ruleset is stored as the digests of its parts (skeleton, then each set,
controller.desired); each part is written once for every agent holding it, and parts
that nobody holds any more are dropped at start and whenever they outnumber those in use.
"""

from __future__ import annotations

import logging

from controller.desired import DesiredRuleset, part_digests_of
from controller.store.sqlite_store import AgentRecord, SqliteStore

log = logging.getLogger(__name__)

PARTS_SLACK = 1000  # stored parts beyond twice those in use before pruning


class AppliedRulesets:
    def __init__(self, store: SqliteStore) -> None:
        self._store = store
        self._in_use = 0
        self._stored = self.prune()  # digests of the parts in the store

    def held(self, agent: AgentRecord) -> DesiredRuleset | None:
        """What AGENT enforces, if the store has its parts and they hash as it says."""
        if not agent.applied_hash or not agent.applied_parts:
            return None
        parts = self._store.get_parts(part_digests_of(agent.applied_parts))
        held = DesiredRuleset.from_parts(agent.applied_revision, agent.applied_parts, parts)
        return held if held is not None and held.hash == agent.applied_hash else None

    def keep(self, agent: AgentRecord, held: DesiredRuleset | None) -> None:
        """Record that AGENT holds HELD (None: content unknown), writing its new parts now,
        before any agent row names them; the row itself is the caller's to write."""
        agent.applied_parts = held.part_digests() if held is not None else b""
        if held is None:
            return
        new = {d: b for d, b in held.parts().items() if d not in self._stored}
        if new:
            with self._store.transaction():
                self._store.put_parts(new)
            self._stored.update(new)

    def prune_if_piled_up(self) -> None:
        """Every change leaves the parts of the rulesets it replaced: drop them once they
        outnumber twice those in use, so a long-running controller's store does not grow."""
        if len(self._stored) > 2 * self._in_use + PARTS_SLACK:
            self._stored = self.prune()

    def prune(self) -> set[bytes]:
        """Drop stored parts no agent's acknowledged ruleset uses; the digests kept."""
        used = {d for a in self._store.list_agents() for d in part_digests_of(a.applied_parts)}
        with self._store.transaction():
            dropped = self._store.prune_parts(used)
        if dropped:
            log.info("dropped %d stored ruleset part(s) no agent holds any more", dropped)
        kept = self._store.part_digests()
        self._in_use = len(kept)
        return kept
