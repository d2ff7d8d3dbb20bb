"""Who holds which address across the fleet, and who waits for one.

Each accepted address has exactly one holder. An agent whose claim was refused because
another live agent holds the address waits for it: when the holder lets it go (reports
other addresses, goes offline, is revoked), the waiter's claims are decided again. The
decisions themselves are controller/address_claims.py; this keeps the index they need,
so a hello costs a dictionary look-up per address, not a scan of the fleet.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from controller.address_claims import parse_ranges, resolve
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
        self._waiting: dict[str, set[str]] = {}  # address -> agents refused for it
        # Stores from before claims existed may hold an address twice: the agent seen
        # first keeps it, the others' claims are to be decided again (duplicated).
        self.duplicated: set[str] = set()
        for agent in sorted(agents, key=lambda a: (a.first_seen_ms, a.agent_id)):
            self._index(agent)

    def _index(self, agent: AgentRecord) -> None:
        for address in agent.addresses:
            if self._holder.setdefault(address, agent.agent_id) != agent.agent_id:
                self.duplicated.add(agent.agent_id)
        for address, reason in agent.refused_addresses.items():
            if reason.startswith(HELD_BY):
                self._waiting.setdefault(address, set()).add(agent.agent_id)

    def holder(self, address: str) -> str | None:
        return self._holder.get(address)

    def held_by(self) -> dict[str, str]:
        """address -> holder, a copy (for tests and invariants)."""
        return dict(self._holder)

    def claim(self, agent: AgentRecord, is_live: Callable[[str], bool]) -> ClaimResult:
        """Decide AGENT's reported addresses and set its accepted and refused addresses
        (in place). IS_LIVE(agent_id) says whether another holder still counts."""
        allowed, _ = parse_ranges(agent.allowed_ranges, "allowed_ranges")

        def holder(address: str) -> tuple[str, bool] | None:
            found = self._holder.get(address)
            if found is None or found == agent.agent_id:
                return None
            return found, is_live(found)

        claim = resolve(agent.agent_id, agent.reported_addresses, allowed, holder)
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
        for waiters in self._waiting.values():
            waiters.discard(agent.agent_id)
        for address, reason in claim.refused.items():
            if reason.startswith(HELD_BY):
                self._waiting.setdefault(address, set()).add(agent.agent_id)
        agent.addresses = list(claim.accepted)
        agent.refused_addresses = dict(claim.refused)
        return result

    def give_up(self, agent: AgentRecord, address: str, reason: str) -> None:
        """AGENT loses ADDRESS (taken over by another): it is refused with REASON."""
        agent.addresses = [a for a in agent.addresses if a != address]
        agent.refused_addresses = {**agent.refused_addresses, address: reason}

    def forget(self, agent_id: str) -> None:
        """The agent is gone from the store."""
        for address in [a for a, h in self._holder.items() if h == agent_id]:
            del self._holder[address]
        for waiters in self._waiting.values():
            waiters.discard(agent_id)

    def waiting_for(self, addresses: Iterable[str]) -> set[str]:
        """Agents refused one of ADDRESSES because another agent held it."""
        found: set[str] = set()
        for address in addresses:
            found |= self._waiting.get(address, set())
        return found

    def waiting_on(self, holders: Iterable[str]) -> set[str]:
        """Agents refused an address that one of HOLDERS holds."""
        wanted = set(holders)
        return self.waiting_for(a for a, h in self._holder.items() if h in wanted)

    def addresses_of(self, agent_id: str) -> list[str]:
        return sorted(
            (a for a, h in self._holder.items() if h == agent_id),
            key=lambda a: (ipaddress.ip_address(a).version, int(ipaddress.ip_address(a))),
        )
