"""The controller's core: resources, agents, compilation and push decisions.

It knows nothing of gRPC (the servicers in controller.server translate), so it
can be driven directly by tests and offline tools.
"""

from __future__ import annotations

import asyncio
import logging
import time
import weakref
from collections.abc import Iterable, Mapping, Sequence

from bulkhead.channel import MAX_RULESET_BYTES
from bulkhead.v1 import agent_pb2, ruleset_pb2
from controller.address_claims import canonical_ranges, parse_ranges
from controller.agent_events import AgentEvents
from controller.applied import AppliedRulesets
from controller.desired import DesiredRuleset
from controller.enrollment import Enrollment
from controller.errors import Conflict, InvalidArgument, NotFound, Unauthenticated, Unavailable
from controller.fleet_claims import FleetClaims, refusal_notice
from controller.host_reports import (
    DEFAULT_HOST_LIMITS,
    ERROR_TEXT_MAX,
    MAX_REVISION,
    HostLimits,
    address_problems,
    hello_problems,
    label_problems,
    ruleset_hash_problems,
)
from controller.log_limit import LogLimit, left_out
from controller.observations import Observations, Workloads
from controller.policy import Estate, Workload
from controller.policy.estate import SetVersion
from controller.policy.names import label_key_problem
from controller.resource_catalog import ResourceCatalog, ResourceChange
from controller.sessions import AgentSession, PushCounts
from controller.store.agent_event_store import AgentEventRecord
from controller.store.sqlite_store import AgentRecord, AuditRecord, SqliteStore, now_ms

log = logging.getLogger(__name__)

DEFAULT_OFFLINE_AFTER_S = 3600.0
# A connected agent that has not answered a ruleset (or not taken it off the stream) for
# this long is stuck: its stream is cut so it reconnects and resyncs.
DEFAULT_STUCK_AFTER_S = 30.0


class Controller:
    def __init__(
        self,
        store: SqliteStore,
        enrollment: Enrollment,
        *,
        offline_after_s: float = DEFAULT_OFFLINE_AFTER_S,
        offline_isolation: bool = False,
        coalesce_s: float = 0.0,
        stuck_after_s: float = DEFAULT_STUCK_AFTER_S,
        limits: HostLimits = DEFAULT_HOST_LIMITS,
        trusted_label_keys: frozenset[str] = frozenset(),
        max_ruleset_bytes: int = MAX_RULESET_BYTES,
    ) -> None:
        self._store = store
        self._limits = limits
        # Reported label keys compiled as if the operator had set them (off by default:
        # a host must not choose its own segment).
        self._trusted_keys = trusted_label_keys
        # No change may compile a ruleset larger than an agent accepts (bulkhead.channel).
        self._max_ruleset_bytes = max_ruleset_bytes
        self._stuck_after_s = stuck_after_s
        self._stuck: set[str] = set()  # marked until they acknowledge (or are in sync)
        # Changes agents report (hello, addresses, labels) are compiled together after this
        # many seconds, so a burst (a reconnect storm, a fleet relabelled by config
        # management) costs one recompile and one push per affected agent, not one per
        # change. 0: at once (operator changes are always compiled at once).
        self._coalesce_s = coalesce_s
        self._pending: set[str] = set()
        self._awaiting_sync: set[str] = set()  # connected while their recompile was pending
        self._flush_handle: asyncio.TimerHandle | None = None
        self.enrollment = enrollment
        self._offline_after_ms = int(offline_after_s * 1000)
        # With isolation, an offline agent's addresses leave its peers' sets: an address
        # that changes hands must not inherit the old workload's access.
        self._offline_isolation = offline_isolation
        self._isolated: frozenset[str] = frozenset()
        self._offline_seen: frozenset[str] = frozenset()  # as of the last check_offline
        # Every agent's rules and the address sets they share, as last compiled (None: not
        # yet), and per agent the revision at which its ruleset last changed. Desired state
        # lives here only: it is recompiled at start, so nothing per agent is written when
        # a change reaches thousands of agents.
        self._estate: Estate | None = None
        self._revisions: dict[str, int] = {}
        self._desired: dict[str, DesiredRuleset] = {}  # built on first use since a change
        # Agents with the same rules, sets and revision share one DesiredRuleset, so its
        # hash is computed once per group, not once per agent (kept while one is in use).
        self._shared: weakref.WeakValueDictionary[
            tuple[int, bytes, tuple[SetVersion, ...]], DesiredRuleset
        ] = weakref.WeakValueDictionary()
        self._sessions: dict[str, AgentSession] = {}
        self._closing = False
        self.pushes = PushCounts()  # for metrics
        self._seen_ms: dict[str, int] = {}  # last heard from, not yet written
        self._workloads_view: tuple[float, Workloads] | None = None
        self._log_limit = LogLimit()  # what one agent can make us log
        self._resources = ResourceCatalog(store)
        self._applied = AppliedRulesets(store)
        self.agent_events = AgentEvents(store.agent_event_store())
        self._claims = FleetClaims(
            store, self.agent_events, is_live=self._is_live, session=self._sessions.get
        )
        self.observations = Observations(
            store.flow_store(), self.workloads, holder_of=self._claims.holder
        )
        self._claims.settle()
        # Addresses or labels may have changed while we were down; bring desired state current.
        self._recompile()

    # -- operator API -------------------------------------------------------------

    def apply(
        self, documents: Sequence[str], *, actor: str, dry_run: bool = False
    ) -> tuple[list[ResourceChange], int]:
        """Validate and store every document or none; recompile affected agents. Nothing
        is stored that would compile a ruleset above the size cap (DRY_RUN says so too)."""
        plan = self._resources.plan(documents)
        if not plan.pending:
            return plan.changes, self._store.current_revision()
        workloads = self._estate.workloads() if self._estate is not None else []
        candidate = Estate(workloads, *self._resources.with_plan(plan))
        oversized = self._oversized(candidate, candidate.agent_ids)
        if oversized:
            raise InvalidArgument([self._oversize_problem(oversized)])
        if dry_run:
            return plan.changes, self._store.current_revision()
        revision = self._resources.commit(plan, actor=actor)
        self._recompile(built=candidate)
        return plan.changes, revision

    def delete(self, kind: str, name: str, *, actor: str) -> int:
        revision = self._resources.delete(kind, name, actor=actor)
        self._recompile()
        return revision

    def list_resources(self, kind: str) -> list[tuple[str, str, int]]:
        return self._resources.listed(kind)

    def label(
        self,
        agent_id: str,
        set_labels: Mapping[str, str],
        remove: Sequence[str],
        *,
        actor: str,
        accept_reported: bool = False,
        expected_reported: Mapping[str, str] | None = None,
    ) -> dict[str, str]:
        """Set or remove the agent's operator labels (the ones compiled); with
        ACCEPT_REPORTED, the labels the host reports become operator labels first."""
        agent = self._require_agent(agent_id)
        problems = label_problems(set_labels, "labels", self._limits.max_labels) + [
            f"labels: {problem}" for k in remove if (problem := label_key_problem(k))
        ]
        before = agent.labels
        overrides = dict(agent.label_overrides)
        if accept_reported:
            if dict(expected_reported or {}) != agent.reported_labels:
                raise Conflict(
                    f"agent '{agent_id}' now reports labels "
                    f"{_labels_text(agent.reported_labels)}, not the "
                    f"{_labels_text(expected_reported or {})} accepted; look again "
                    f"(bulkhead describe agent {agent_id})"
                )
            overrides.update(agent.reported_labels)
        for key in remove:
            overrides[key] = None
        overrides.update(set_labels)
        after = {k: v for k, v in overrides.items() if v is not None}
        if not problems and len(after) > self._limits.max_labels:
            problems.append(
                f"labels: the agent would have {len(after)} labels; at most "
                f"{self._limits.max_labels}"
            )
        if problems:
            raise InvalidArgument(problems)
        previous = dict(agent.label_overrides)
        agent.label_overrides = overrides
        with self._store.transaction():
            self._store.put_agent(agent)
        try:
            self._recompile([agent_id], refuse_oversize=True)
        except InvalidArgument:
            agent.label_overrides = previous  # the estate was left as it was
            with self._store.transaction():
                self._store.put_agent(agent)
            raise
        with self._store.transaction():
            self._store.add_audit(
                actor, "agent.labelled", f"agent/{agent_id}",
                {"set": dict(set_labels), "removed": list(remove), "before": before,
                 "after": agent.labels, "accepted_reported": accept_reported},
            )  # fmt: skip
        return self.compiled_labels(agent)

    def set_allowed_ranges(
        self, agent_id: str, ranges: Sequence[str], *, actor: str
    ) -> AgentRecord:
        """Set the CIDRs the agent's addresses must fall in (none: any workload address)
        and decide its reported addresses again."""
        agent = self._require_agent(agent_id)
        networks, problems = parse_ranges(ranges, "allowed_ranges")
        if problems:
            raise InvalidArgument(problems)
        before = list(agent.allowed_ranges)
        agent.allowed_ranges = canonical_ranges(networks)
        moved = self._claims.store(
            agent,
            audit=(actor, "agent.addresses.allowed",
                   {"before": before, "after": agent.allowed_ranges}),
        )  # fmt: skip
        self._recompile(moved)
        return self._require_agent(agent_id)

    def audit(
        self, since_ms: int, limit: int, *, include_agents: bool = False
    ) -> list[AuditRecord | AgentEventRecord]:
        """The latest LIMIT operator audit entries at or after SINCE_MS, oldest first; with
        INCLUDE_AGENTS, agents' events too (kept apart: controller/agent_events.py),
        merged with them by time."""
        limit = min(limit, 10_000)
        entries: list[AuditRecord | AgentEventRecord] = []
        entries += self._store.list_audit(since_ms, limit)
        if include_agents:
            entries += self.agent_events.list(since_ms, limit)
            entries.sort(key=lambda entry: entry.at_ms)  # stable: each list is in order
        return entries[-limit:]

    def is_revoked(self, agent_id: str) -> bool:
        """Certificates were issued to the agent and none of them is live any more."""
        return self.enrollment.is_agent_revoked(agent_id)

    def agents(self) -> list[AgentRecord]:
        return self._store.list_agents()

    def agent(self, agent_id: str) -> AgentRecord:
        return self._require_agent(agent_id)

    def connected_count(self) -> int:
        return len(self._sessions)

    def session(self, agent_id: str) -> AgentSession | None:
        """The agent's live stream, if it is connected."""
        return self._sessions.get(agent_id)

    def workloads(self) -> Workloads:
        """Labels and addresses of every workload, and the IP lists: for flow resolution.
        Read at most once a second: every agent's flow report asks."""
        at = time.monotonic()
        if self._workloads_view is not None and at - self._workloads_view[0] < 1.0:
            return self._workloads_view[1]
        agents = self._store.list_agents()
        view = Workloads(
            labels={a.agent_id: a.labels_with(self._trusted_keys) for a in agents},
            owners={address: a.agent_id for a in agents for address in a.addresses},
            iplists=[
                (network, iplist.metadata.labels)
                for iplist in self._resources.iplists.values()
                for network in iplist.spec.cidrs
            ],
        )
        self._workloads_view = (at, view)
        return view

    def is_connected(self, agent_id: str) -> bool:
        return agent_id in self._sessions

    def _require_agent(self, agent_id: str) -> AgentRecord:
        agent = self._store.get_agent(agent_id)
        if agent is None:
            raise NotFound(f"agent '{agent_id}' is not known to this controller")
        return agent

    # -- agent streams ---------------------------------------------------------------

    def connect(self, agent_id: str, hello: agent_pb2.Hello) -> AgentSession:
        """Register the stream of AGENT_ID (from its verified certificate, never from the
        hello); the session's first message brings it in sync."""
        if hello.agent_id and hello.agent_id != agent_id:
            log.warning(
                "agent %s sent a hello claiming to be %r; it is treated as %s",
                agent_id, hello.agent_id, agent_id,
            )  # fmt: skip
        hello.agent_id = agent_id
        problems = hello_problems(hello, self._limits)
        if problems:
            raise InvalidArgument(problems)
        known = self._store.get_agent(agent_id)
        agent = known or AgentRecord(agent_id=agent_id, first_seen_ms=now_ms())
        before = (self.compiled_labels(agent), agent.addresses)
        if known is not None and known.hostname != hello.hostname:
            log.warning(
                "agent %s now reports hostname %r (was %r): two hosts sharing one agent id "
                "would take turns replacing each other's addresses",
                agent.agent_id, hello.hostname, known.hostname,
            )  # fmt: skip
        agent.hostname = hello.hostname
        agent.reported_labels = dict(hello.labels)
        agent.reported_addresses = list(hello.addresses)
        agent.mode = hello.mode
        agent.baseline = hello.baseline.SerializeToString(deterministic=True)
        if hello.applied_hash != agent.applied_hash:
            agent.applied_parts = b""  # not what it acknowledged here: content unknown
        agent.applied_revision = hello.applied_revision
        agent.applied_hash = hello.applied_hash
        agent.last_seen_ms = now_ms()
        claims = self._claims.decide(agent)
        if claims.accepted_changed or claims.newly_refused or claims.taken_over:
            # Claims are the controller's decisions: written now, with their events.
            self._claims.write(agent, claims)
        else:
            # Written with the next batch: all of it is the agent's own report, which it
            # sends again on its next connect (a reconnect storm is 10,000 of these).
            self._store.put_agent_later(agent)
        previous = self._sessions.get(agent.agent_id)
        if previous is not None:
            log.warning("agent %s opened a new stream; closing the old one", agent.agent_id)
            previous.close()
        session = AgentSession(
            agent.agent_id,
            lambda: self.desired(agent_id),
            self._applied.held(agent),
            self.pushes,
        )
        self._sessions[agent.agent_id] = session
        if agent.refused_addresses:
            session.send(refusal_notice(agent))
        if agent.applied_hash == self.desired(agent_id).hash:
            self._stuck.discard(agent.agent_id)
        log.info("agent %s connected (applied revision %d)", agent.agent_id, hello.applied_revision)
        # Only labels and addresses (and, with isolation, being offline) feed the compiler;
        # an unchanged agent costs no recompile.
        others = self._claims.moved_by(agent.agent_id, claims)
        changed = (
            known is None
            or self._estate is None
            or agent.agent_id not in self._estate
            or before != (self.compiled_labels(agent), agent.addresses)
            or agent.agent_id in self._isolated
            or bool(others)
        )
        if changed and self._coalesce_s > 0:
            self._awaiting_sync.add(agent.agent_id)
            for agent_id_changed in (agent.agent_id, *others):
                self._agent_changed(agent_id_changed)
            return session
        pushed = self._recompile([agent.agent_id, *others]) if changed else set()
        if agent.agent_id not in pushed:
            self._sync(session, self._require_agent(agent.agent_id))
        return session

    def disconnect(self, session: AgentSession) -> None:
        session.close()
        if self._sessions.get(session.agent_id) is session:
            del self._sessions[session.agent_id]
            self._seen_ms[session.agent_id] = now_ms()  # written with the next batch
            # Connection state is not compiled: an agent's peers keep its addresses while it
            # is away, so a restart or a network blip causes no churn.
            if not self._closing:  # close_all says it once for all of them
                log.info("agent %s disconnected", session.agent_id)

    def close_all(self) -> int:
        """End every agent stream with UNAVAILABLE, so each agent reconnects (to whichever
        controller answers) with its backoff; for shutdown. Returns how many."""
        self._closing = True
        sessions = list(self._sessions.values())
        for session in sessions:
            session.failure = Unavailable("the controller is shutting down; reconnect")
            session.close()
        log.info("closing %d agent stream(s)", len(sessions))
        return len(sessions)

    def revoke_agent(self, agent_id: str, *, actor: str) -> int:
        """Revoke every certificate of the agent and cut its stream now."""
        count = self.enrollment.revoke_agent(agent_id, actor=actor)
        session = self._sessions.get(agent_id)
        if session is not None:
            session.failure = Unauthenticated(f"agent '{agent_id}': certificate revoked")
            session.close()
        log.warning("agent %s revoked by %s (%d certificate(s))", agent_id, actor, count)
        # Its addresses leave every peer's sets, and agents waiting for one may have it.
        self._recompile([agent_id, *self._claims.reclaim_from([agent_id])])
        return count

    def heartbeat(self, agent_id: str) -> None:
        # In memory, written in batches (flush_last_seen): one transaction per heartbeat
        # was a quarter of the controller's time with 10,000 agents.
        self._seen_ms[agent_id] = now_ms()

    def last_seen_ms(self, agent: AgentRecord) -> int:
        """When the agent was last heard from, including heartbeats not yet written."""
        return self._last_seen(agent.agent_id, agent.last_seen_ms)

    def _last_seen(self, agent_id: str, stored_ms: int) -> int:
        return max(stored_ms, self._seen_ms.get(agent_id, 0))

    def flush_last_seen(self) -> int:
        """Write the heartbeat and disconnect times gathered since the last flush, and the
        acknowledgements kept in memory; returns how many heartbeats and disconnects."""
        seen, self._seen_ms = self._seen_ms, {}
        with self._store.transaction():
            self._store.write_unwritten()
            if seen:
                self._store.touch_agents(seen)
        self._applied.prune_if_piled_up()
        return len(seen)

    def addresses_changed(self, agent_id: str, addresses: Sequence[str]) -> None:
        problems = address_problems(addresses, "addresses", self._limits)
        if problems:
            raise InvalidArgument(problems)
        agent = self._require_agent(agent_id)
        before = agent.addresses
        agent.reported_addresses = list(addresses)
        for changed in self._claims.store(agent):
            self._agent_changed(changed)
        if agent.addresses != before and (
            (skipped := self._log_limit.allow(agent_id, "addresses")) is not None
        ):
            log.info(
                "agent %s addresses now %s%s",
                agent_id, ", ".join(agent.addresses), left_out(skipped),
            )  # fmt: skip

    def config_changed(self, agent_id: str, change: agent_pb2.ConfigChange) -> None:
        """The host's own labels or mode changed (its config or labels drop-ins). Its
        labels are kept as reported; they drive policy only once an operator accepts them
        (or for the keys the controller trusts)."""
        problems = label_problems(change.labels, "config.labels", self._limits.max_labels)
        if problems:
            raise InvalidArgument(problems)
        agent = self._require_agent(agent_id)
        before = self.compiled_labels(agent)
        agent.reported_labels = dict(change.labels)
        agent.mode = change.mode
        with self._store.transaction():
            self._store.put_agent(agent)
        if (skipped := self._log_limit.allow(agent_id, "labels")) is not None:
            log.info(
                "agent %s reports labels %s%s", agent_id, agent.reported_labels, left_out(skipped)
            )
        if self.compiled_labels(agent) != before:
            self._agent_changed(agent_id)

    # -- address claims (controller/fleet_claims.py) ---------------------------------------

    def compiled_labels(self, agent: AgentRecord) -> dict[str, str]:
        """The labels the compiler sees for AGENT: the operator's, and reported ones of
        the keys this controller trusts."""
        return agent.labels_with(self._trusted_keys)

    def _is_live(self, agent_id: str) -> bool:
        """Another agent's hold on an address still counts: it is neither revoked nor
        offline. (Asked only when two agents claim one address.)"""
        record = self._store.get_agent(agent_id)
        if record is None or self.enrollment.is_agent_revoked(agent_id):
            return False
        return not self.is_offline(record)

    def acknowledged(self, agent_id: str, ack: agent_pb2.Ack) -> None:
        problems = ruleset_hash_problems(ack.hash, "ack.hash")
        if ack.revision > MAX_REVISION:
            problems.append(f"ack.revision: {ack.revision} is beyond {MAX_REVISION}")
        if problems:
            raise InvalidArgument(problems)
        ack.error = ack.error[:ERROR_TEXT_MAX]  # kept, shown and logged: bounded
        agent = self._require_agent(agent_id)
        session = self._sessions.get(agent_id)
        answered = session.acknowledged() if session is not None else None
        if ack.ok:
            self._stuck.discard(agent_id)
            agent.applied_revision = ack.revision
            agent.applied_hash = ack.hash
            # What it holds: the base of deltas after a restart.
            held = answered if answered is not None and answered.hash == ack.hash else None
            self._applied.keep(agent, held)
            agent.last_error = ""
            if ack.hash != self.desired(agent_id).hash and session is not None:
                # The ack is for a snapshot that was overtaken in flight (perhaps by an
                # InSync sent while the stored applied hash was still the older one).
                self._sync(session, agent)
        elif ack.need_snapshot:
            # It could not apply a delta (it holds something else): send the whole ruleset.
            if (skipped := self._log_limit.allow(agent_id, "ack")) is not None:
                log.warning(
                    "agent %s needs a snapshot for revision %d: %s%s",
                    agent_id, ack.revision, ack.error, left_out(skipped),
                )  # fmt: skip
            if session is not None:
                session.forget_base()
                self._sync(session, agent)
        else:
            agent.last_error = ack.error or "apply failed (no reason given)"
            if session is not None:
                session.forget_base()  # it still holds its older ruleset: snapshots only
            if (skipped := self._log_limit.allow(agent_id, "ack")) is not None:
                log.error(
                    "agent %s failed to apply revision %d: %s%s",
                    agent_id, ack.revision, agent.last_error, left_out(skipped),
                )  # fmt: skip
        agent.last_seen_ms = now_ms()
        # Written with the next batch (flush_last_seen): one transaction per ack was most
        # of the controller's time when a change reached thousands of agents. A crash
        # loses nothing the agents do not report again when they reconnect.
        self._store.put_applied_later(agent)

    def check_stuck(self) -> set[str]:
        """Cut the streams of agents that have not answered what they were sent for the
        stuck threshold (called periodically): each reconnects and resyncs, and stays
        marked stuck until it acknowledges a ruleset. Returns the agents cut now."""
        cut: dict[str, float] = {}  # agent id -> seconds it kept us waiting
        for agent_id, session in list(self._sessions.items()):
            waited = session.waiting_s()
            if waited <= self._stuck_after_s or session.closed:
                continue
            log.warning(
                "agent %s has not answered its ruleset for %.0f s: closing its stream so it "
                "reconnects and resyncs", agent_id, waited,
            )  # fmt: skip
            session.failure = Unavailable(
                f"agent '{agent_id}': no answer to its ruleset for {waited:.0f} s; reconnect "
                "to resync"
            )
            session.close()
            self._stuck.add(agent_id)
            cut[agent_id] = round(waited, 1)
        if cut:
            with self._store.transaction():
                for agent_id, waited in sorted(cut.items()):
                    self._store.add_audit(
                        "controller", "agent.stuck", f"agent/{agent_id}", {"waited_s": waited}
                    )
        return set(cut)

    def stuck_count(self) -> int:
        return len(self._stuck)

    def is_stuck(self, agent_id: str) -> bool:
        """Its stream was cut for not answering, and it has not acknowledged since."""
        return agent_id in self._stuck

    # -- compilation -------------------------------------------------------------------

    def is_offline(self, agent: AgentRecord, at_ms: int | None = None) -> bool:
        """Not connected and silent for longer than the offline threshold."""
        at = at_ms if at_ms is not None else now_ms()
        return self._offline(agent.agent_id, agent.last_seen_ms, at)

    def _offline(self, agent_id: str, stored_last_seen_ms: int, at_ms: int) -> bool:
        silent_ms = at_ms - self._last_seen(agent_id, stored_last_seen_ms)
        return not self.is_connected(agent_id) and silent_ms > self._offline_after_ms

    def check_offline(self) -> set[str]:
        """Re-evaluate which agents are offline (called periodically); with isolation,
        recompile when that changes. Returns the offline agents."""
        at = now_ms()
        seen = self._store.agents_last_seen()  # every 5 s: no copies of the records
        offline = {agent_id for agent_id, ms in seen.items() if self._offline(agent_id, ms, at)}
        newly_offline = offline - self._offline_seen
        self._offline_seen = frozenset(offline)
        if newly_offline:  # agents waiting for their addresses may have them now
            reclaimed = self._claims.reclaim_from(newly_offline)
            if reclaimed:
                self._recompile(reclaimed)
        if self._offline_isolation and frozenset(offline) != self._isolated:
            log.warning("offline agents now %s; recompiling their peers", sorted(offline) or "none")
            self._recompile(offline ^ self._isolated)
        return offline

    def _recompile(
        self,
        changed: Iterable[str] | None = None,
        *,
        built: Estate | None = None,
        refuse_oversize: bool = False,
    ) -> set[str]:
        """Bring the estate current and push to the agents whose ruleset changed; returns
        them.

        With CHANGED (agents whose labels, addresses, isolation or existence changed) the
        estate is updated in place, at a cost that follows what changed; policies and IP
        lists changing rebuild it (or BUILT, an estate already compiled from them).

        A change that would give some agent a ruleset above the size cap is undone in the
        estate: with REFUSE_OVERSIZE (an operator's change) it raises InvalidArgument,
        otherwise (a host's report) the workloads keep their last compiled state."""
        at = now_ms()
        # Revoked agents always lose their peers' access; offline ones with isolation on.
        # (One query for the revoked: this runs on every change.)
        revoked = self.enrollment.revoked_agents()
        if changed is None or self._estate is None:
            previous = self._estate
            records: list[AgentRecord] = []
            if previous is None:  # starting
                records = self._store.list_agents()
                compiled = {a.agent_id: self._workload(a, revoked, at) for a in records}
                workloads = [workload for workload, _ in compiled.values()]
                isolated = {i for i, (_, cut_off) in compiled.items() if cut_off}
            else:  # policies or IP lists changed: the workloads did not
                workloads = previous.workloads()
                isolated = set(self._isolated)
            before = {i: self.desired(i).hash for i in previous.agent_ids} if previous else {}
            self._estate = estate = built or Estate(
                workloads, self._resources.iplists.values(), self._resources.policies.values()
            )
            self._desired.clear()
            targets = {i for i in estate.agent_ids if before.get(i) != estate.hash(i)}
            if previous is None:
                # Starting: an agent that holds what it should keeps that revision.
                for known in records:
                    if known.applied_revision and known.applied_hash == estate.hash(known.agent_id):
                        self._revisions[known.agent_id] = known.applied_revision
                        targets.discard(known.agent_id)
        else:
            targets, isolated = self._update_estate(
                self._estate, changed, revoked, at, refuse_oversize=refuse_oversize
            )
        self._isolated = frozenset(isolated)
        targets = {i for i in targets if i in self._estate}  # not the ones that left
        if targets:
            with self._store.transaction():
                revision = self._store.next_revision()
            for agent_id in targets:
                self._revisions[agent_id] = revision
                self._desired.pop(agent_id, None)
            for agent_id in targets:
                session = self._sessions.get(agent_id)
                if session is not None:
                    # Built when sent: a delta or snapshot against what it will hold.
                    session.offer_desired()
        return targets

    def _update_estate(
        self,
        estate: Estate,
        changed: Iterable[str],
        revoked: set[str],
        at: int,
        *,
        refuse_oversize: bool,
    ) -> tuple[set[str], set[str]]:
        """Update ESTATE for the agents in CHANGED; returns the agents whose ruleset
        changed, and the agents cut off now (see _recompile for the size cap)."""
        changes: dict[str, Workload | None] = {}
        isolated = set(self._isolated) - set(changed)
        for agent_id in changed:
            record = self._store.get_agent(agent_id)
            if record is None:
                changes[agent_id] = None
                continue
            changes[agent_id], cut_off = self._workload(record, revoked, at)
            if cut_off:
                isolated.add(agent_id)
        previous_workloads = {i: estate.workload(i) for i in changes}
        targets = estate.update(changes)
        oversized = self._oversized(estate, targets)
        if oversized:
            estate.update(previous_workloads)
            if refuse_oversize:  # an operator's change: refused, nothing changed
                raise InvalidArgument([self._oversize_problem(oversized)])
            # Hosts' reports: compile them one by one, and refuse the addresses of a
            # report that alone would give some agent a ruleset above the cap.
            targets = self._compile_within_cap(estate, changes, previous_workloads)
        targets |= {i for i, w in changes.items() if w is not None and i not in self._revisions}
        return targets, isolated

    def _oversized(self, estate: Estate, agent_ids: Iterable[str]) -> dict[str, int]:
        """The agents among AGENT_IDS whose ruleset would exceed the size cap, and sizes.
        Agents with the same rules share their sets, so each skeleton is measured once,
        and exactly only when its quick upper bound is over the cap."""
        by_skeleton: dict[bytes, int] = {}
        oversized: dict[str, int] = {}
        for agent_id in sorted(agent_ids):
            if agent_id not in estate:
                continue
            digest = estate.skeleton(agent_id).digest
            size = by_skeleton.get(digest)
            if size is None:
                size = estate.size_bound(agent_id)
                if size > self._max_ruleset_bytes:
                    size = estate.size(agent_id)
                by_skeleton[digest] = size
            if size > self._max_ruleset_bytes:
                oversized[agent_id] = size
        return oversized

    def _oversize_problem(self, oversized: Mapping[str, int]) -> str:
        shown = ", ".join(f"{i} ({size:,} bytes)" for i, size in list(oversized.items())[:5])
        return (
            f"the change would give {len(oversized)} agent(s) a ruleset above the "
            f"{self._max_ruleset_bytes:,} bytes an agent accepts: {shown}; narrow the "
            "policy's peers or split the workloads"
        )

    def _compile_within_cap(
        self,
        estate: Estate,
        changes: Mapping[str, Workload | None],
        previous: Mapping[str, Workload | None],
    ) -> set[str]:
        """Update the estate with each of CHANGES alone, keeping those within the size
        cap; an agent whose change is not kept has its new addresses refused (stored, so
        the store and the estate agree). Returns the agents whose ruleset changed."""
        targets: set[str] = set()
        for agent_id, workload in sorted(changes.items()):
            reached = estate.update({agent_id: workload})
            oversized = self._oversized(estate, reached)
            if not oversized:
                targets |= reached
                continue
            before = previous[agent_id]
            estate.update({agent_id: before})
            problem = self._oversize_problem(oversized)
            if (skipped := self._log_limit.allow(agent_id, "oversize")) is not None:
                log.error(
                    "agent %s: its report is not compiled: %s%s",
                    agent_id, problem, left_out(skipped),
                )  # fmt: skip
            kept = before.addresses if before is not None else ()
            self._claims.refuse_beyond(agent_id, kept, problem)
        return targets

    def desired(self, agent_id: str) -> DesiredRuleset:
        """The ruleset the agent should hold (empty, at revision 0, if it is not known)."""
        found = self._desired.get(agent_id)
        if found is None:
            estate = self._estate
            if estate is None or agent_id not in estate:
                return DesiredRuleset.from_ruleset(0, ruleset_pb2.Ruleset())
            revision = self._revisions.get(agent_id, 0)
            skeleton = estate.skeleton(agent_id)
            versions = estate.versions(agent_id)
            key = (revision, skeleton.digest, versions)
            found = self._shared.get(key)
            if found is None:
                found = DesiredRuleset(revision, skeleton, versions)
                self._shared[key] = found
            self._desired[agent_id] = found
        return found

    def _agent_changed(self, agent_id: str) -> None:
        """Recompile for an agent-reported change: now, or with the next coalesced batch."""
        if self._coalesce_s <= 0:
            self._recompile([agent_id])
            return
        self._pending.add(agent_id)
        if self._flush_handle is None:
            loop = asyncio.get_running_loop()
            self._flush_handle = loop.call_later(self._coalesce_s, self.flush_pending)

    def flush_pending(self) -> set[str]:
        """Compile the pending agent-reported changes now; returns the agents pushed to."""
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        changed, self._pending = self._pending, set()
        awaiting, self._awaiting_sync = self._awaiting_sync, set()
        pushed = self._recompile(changed) if changed else set()
        for agent_id in awaiting - pushed:
            session = self._sessions.get(agent_id)
            agent = self._store.get_agent(agent_id)
            if session is not None and agent is not None:
                self._sync(session, agent)
        return pushed

    def _workload(self, agent: AgentRecord, revoked: set[str], at: int) -> tuple[Workload, bool]:
        """The compiler's view of an agent, and whether it is cut off (revoked, or offline
        with isolation on): then its addresses leave its peers' sets."""
        cut_off = agent.agent_id in revoked or (
            self._offline_isolation and self.is_offline(agent, at)
        )
        addresses = () if cut_off else tuple(agent.addresses)
        return Workload(agent.agent_id, self.compiled_labels(agent), addresses), cut_off

    def _sync(self, session: AgentSession, agent: AgentRecord) -> None:
        desired = self.desired(agent.agent_id)
        in_flight = session.base is not None and session.base.hash != agent.applied_hash
        if agent.applied_hash == desired.hash and not in_flight:
            session.offer(
                agent_pb2.ControllerMessage(
                    in_sync=agent_pb2.InSync(revision=desired.revision, hash=desired.hash)
                )
            )
            return
        # The session sends it as a delta against what the agent holds, or a snapshot.
        session.offer_desired()


def _labels_text(labels: Mapping[str, str]) -> str:
    return "{" + ", ".join(f"{k}={v}" for k, v in sorted(labels.items())) + "}"
