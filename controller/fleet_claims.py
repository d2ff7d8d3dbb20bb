"""Deciding and recording which reported addresses each agent holds, across the fleet.

The decisions are controller/address_claims.py and the index of holders is
controller/address_book.py; this writes the outcome (the agent record, its events, the
operator's audit entry when an operator caused it), tells the agent what was refused, and
finds the other agents a change moves: the holder an address was taken from, and agents
waiting for an address that was let go. Recompiling them is the caller's job.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable

from bulkhead.v1 import agent_pb2
from controller.address_book import AddressBook, ClaimResult
from controller.agent_events import AgentEvents
from controller.log_limit import LogLimit, left_out
from controller.sessions import AgentSession
from controller.store.sqlite_store import AgentRecord, SqliteStore

log = logging.getLogger(__name__)

# An operator action to audit with the outcome: (actor, action, detail).
OperatorAction = tuple[str, str, dict[str, object]]


class FleetClaims:
    def __init__(
        self,
        store: SqliteStore,
        events: AgentEvents,
        *,
        is_live: Callable[[str], bool],
        session: Callable[[str], AgentSession | None],
    ) -> None:
        self._store = store
        self._events = events
        self._is_live = is_live  # another holder's hold still counts
        self._session = session
        self._book = AddressBook(store.list_agents())
        self._log_limit = LogLimit()

    def settle(self) -> set[str]:
        """At start: decide again the claims of agents whose accepted addresses another
        agent holds (a store from before claims); returns those that changed."""
        duplicated, self._book.duplicated = self._book.duplicated, set()
        return self.reclaim(duplicated)

    def holder(self, address: str) -> str | None:
        """The agent that holds ADDRESS (canonical text) now, if any."""
        return self._book.holder(address)

    def decide(self, agent: AgentRecord) -> ClaimResult:
        """Decide AGENT's reported addresses (its record is changed, not yet stored)."""
        return self._book.claim(agent, self._is_live)

    def store(self, agent: AgentRecord, *, audit: OperatorAction | None = None) -> list[str]:
        """Decide, store and announce AGENT's claims (AUDIT: the operator action that
        caused the change). Returns every agent whose accepted addresses may have changed,
        AGENT first."""
        claims = self.decide(agent)
        self.write(agent, claims, audit=audit)
        if claims.newly_refused or claims.accepted_changed:
            self._notify(agent)
        return [agent.agent_id, *self.moved_by(agent.agent_id, claims)]

    def write(
        self, agent: AgentRecord, claims: ClaimResult, *, audit: OperatorAction | None = None
    ) -> None:
        """Store AGENT with the outcome of CLAIMS, in one transaction with its events."""
        with self._store.transaction():
            self._store.put_agent(agent)
            if audit is not None:
                actor, action, detail = audit
                self._store.add_audit(
                    actor, action, f"agent/{agent.agent_id}",
                    {**detail, "addresses": agent.addresses, "refused": agent.refused_addresses},
                )  # fmt: skip
            # What the host's report changed is an agent event, kept apart from operator
            # actions and merged while it repeats (controller/agent_events.py).
            if claims.accepted_changed:
                self._events.record(
                    agent.agent_id, "agent.addresses",
                    {"added": claims.added, "removed": claims.removed,
                     "addresses": agent.addresses},
                )  # fmt: skip
            if claims.newly_refused:
                self._events.record(
                    agent.agent_id, "agent.addresses.refused", {"refused": claims.newly_refused}
                )
                if (skipped := self._log_limit.allow(agent.agent_id, "refused")) is not None:
                    log.warning(
                        "agent %s: addresses refused: %s%s", agent.agent_id,
                        "; ".join(f"{a} {r}" for a, r in sorted(claims.newly_refused.items())),
                        left_out(skipped),
                    )  # fmt: skip
            for address, previous in sorted(claims.taken_over.items()):
                self._take_from(previous, address, agent.agent_id)

    def _take_from(self, previous: str, address: str, by: str) -> None:
        record = self._store.get_agent(previous)
        if record is None:
            return
        self._book.give_up(
            record, address, f"taken over by agent {by} while this agent was offline or revoked"
        )
        self._store.put_agent(record)
        self._events.record(by, "agent.address.taken_over", {"address": address, "from": previous})

    def refuse_beyond(self, agent_id: str, kept: Iterable[str], reason: str) -> None:
        """AGENT_ID's report was not compiled (REASON): refuse its accepted addresses but
        KEPT, the ones it had compiled before, so that the store says what peers hold."""
        record = self._store.get_agent(agent_id)
        if record is None:
            return
        keep = set(kept)
        dropped = [a for a in record.addresses if a not in keep]
        for address in dropped:
            self._book.give_up(record, address, reason)
        with self._store.transaction():
            self._store.put_agent(record)
            self._events.record(
                agent_id, "agent.addresses.refused", {"refused": dict.fromkeys(dropped, reason)}
            )
        self._notify(record)

    def moved_by(self, agent_id: str, claims: ClaimResult) -> list[str]:
        """Other agents whose accepted addresses change with AGENT_ID's CLAIMS: the ones
        an address was taken from, and the ones that were waiting for a released one."""
        others = set(claims.taken_over.values())
        others |= self.reclaim(self._book.waiting_for(claims.removed) - {agent_id})
        return sorted(others - {agent_id})

    def reclaim_from(self, holders: Iterable[str]) -> set[str]:
        """Decide again the claims of agents waiting for an address one of HOLDERS holds
        (those went offline or were revoked); returns the agents that changed."""
        return self.reclaim(self._book.waiting_on(holders))

    def reclaim(self, agent_ids: Iterable[str]) -> set[str]:
        """Decide the claims of AGENT_IDS again (a holder let go); returns the agents whose
        accepted addresses changed."""
        changed: set[str] = set()
        for agent_id in sorted(agent_ids):
            record = self._store.get_agent(agent_id)
            if record is None:
                continue
            claims = self.decide(record)
            if claims.accepted_changed or claims.newly_refused:
                self.write(record, claims)
                self._notify(record)
                changed.add(agent_id)
                # An agent it took an address from (offline or revoked) loses it too.
                changed |= set(claims.taken_over.values())
        return changed

    def _notify(self, agent: AgentRecord) -> None:
        session = self._session(agent.agent_id)
        if session is not None:
            session.send(refusal_notice(agent))


def refusal_notice(agent: AgentRecord) -> agent_pb2.ControllerMessage:
    """Tell the agent which of its addresses are not compiled, and why (empty: none)."""
    refused = [
        agent_pb2.RefusedAddress(address=address, reason=reason)
        for address, reason in sorted(agent.refused_addresses.items())
    ]
    return agent_pb2.ControllerMessage(
        addresses_refused=agent_pb2.AddressesRefused(refused=refused)
    )
