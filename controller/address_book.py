"""Who holds which address across the fleet, and who waits for one.

Each accepted address has exactly one holder. An agent whose claim was refused because
another live agent holds the address waits for it: when the holder lets it go (reports
other addresses, goes offline, is revoked), the waiter's claims are decided again. The
decisions themselves are controller/address_claims.py; this keeps the index they need,
so a hello costs a dictionary look-up per address, not a scan of the fleet.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from controller.address_claims import parse_ranges, resolve
from controller.policy.addresses import Network
from controller.store.sqlite_store import AgentRecord

HELD_BY = "held by agent "


@dataclass
class ClaimResult:
    """What deciding one agent's claims changed."""

    added: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    newly_refused: dict[str, str] = field(default_factory=dict)
    taken_over: dict[str, str] = field(default_factory=dict)  # address -> previous holder

    @property
    def accepted_changed(self) -> bool:
        return bool(self.added or self.removed)


class AddressBook:
    def __init__(self, agents: Iterable[AgentRecord]) -> None:
        self._holder: dict[str, str] = {}
        # Both ways, so deciding one agent's claims never walks the fleet's waiters.
        self._waiters: dict[str, set[str]] = {}  # address -> agents refused for it
        self._waiting: dict[str, set[str]] = {}  # agent -> addresses it was refused
        # Stores from before claims existed may hold an address twice: the agent seen
        # first keeps it, the others' claims are to be decided again (duplicated).
        self.duplicated: set[str] = set()
        for agent in sorted(agents, key=lambda a: (a.first_seen_ms, a.agent_id)):
            for address in agent.addresses:
                if self._holder.setdefault(address, agent.agent_id) != agent.agent_id:
                    self.duplicated.add(agent.agent_id)
            self._wait(agent.agent_id, agent.refused_addresses)

    def holder(self, address: str) -> str | None:
        return self._holder.get(address)

    def claim(self, agent: AgentRecord, is_live: Callable[[str], bool]) -> ClaimResult:
        """Decide AGENT's reported addresses and set its accepted and refused addresses
        (in place). IS_LIVE(agent_id) says whether another holder still counts."""

        def holder(address: str) -> tuple[str, bool] | None:
            found = self._holder.get(address)
            if found is None or found == agent.agent_id:
                return None
            return found, is_live(found)

        claim = resolve(
            agent.agent_id, agent.reported_addresses, _ranges(tuple(agent.allowed_ranges)), holder
        )
        before = set(agent.addresses)
        result = ClaimResult(
            added=sorted(set(claim.accepted) - before),
            removed=sorted(before - set(claim.accepted)),
            newly_refused={
                a: r for a, r in claim.refused.items() if agent.refused_addresses.get(a) != r
            },
            taken_over=dict(claim.taken_over),
        )
        for address in result.removed:
            if self._holder.get(address) == agent.agent_id:
                del self._holder[address]
        for address in claim.accepted:
            self._holder[address] = agent.agent_id
        self._wait(agent.agent_id, claim.refused)
        agent.addresses = list(claim.accepted)
        agent.refused_addresses = dict(claim.refused)
        return result

    def give_up(self, agent: AgentRecord, address: str, reason: str) -> None:
        """AGENT loses ADDRESS (taken over by another, or not compiled): it is refused
        with REASON, and no longer held by AGENT."""
        agent.addresses = [a for a in agent.addresses if a != address]
        agent.refused_addresses = {**agent.refused_addresses, address: reason}
        if self._holder.get(address) == agent.agent_id:
            del self._holder[address]

    def waiting_for(self, addresses: Iterable[str]) -> set[str]:
        """Agents refused one of ADDRESSES because another agent held it."""
        found: set[str] = set()
        for address in addresses:
            found |= self._waiters.get(address, set())
        return found

    def waiting_on(self, holders: Iterable[str]) -> set[str]:
        """Agents refused an address that one of HOLDERS holds (called when agents go
        offline or are revoked: rare, so a walk over the waited-for addresses is fine)."""
        wanted = set(holders)
        return self.waiting_for(a for a in self._waiters if self._holder.get(a) in wanted)

    def _wait(self, agent_id: str, refused: dict[str, str]) -> None:
        """Record which addresses AGENT_ID now waits for (refused as held by another)."""
        for address in self._waiting.pop(agent_id, set()):
            waiters = self._waiters.get(address)
            if waiters is not None:
                waiters.discard(agent_id)
                if not waiters:
                    del self._waiters[address]
        waited = {a for a, reason in refused.items() if reason.startswith(HELD_BY)}
        if waited:
            self._waiting[agent_id] = waited
            for address in waited:
                self._waiters.setdefault(address, set()).add(agent_id)


@functools.lru_cache(maxsize=1024)
def _ranges(texts: tuple[str, ...]) -> list[Network]:
    """Allowed ranges as networks (stored ranges are valid; a bad one is left out).
    Cached: most agents share their token's few ranges, and every hello asks."""
    networks, _ = parse_ranges(texts, "allowed_ranges")
    return networks
