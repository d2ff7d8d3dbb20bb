"""Applies policy snapshots to the dataplane, persists them, cuts flows they no longer allow."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from agent.dataplane.backend import Backend, DataplaneError, RulesetError
from agent.dataplane.baseline import Baseline, Mode
from agent.dataplane.conntrack import cut_disallowed
from agent.state import (
    AppliedSnapshot,
    StateCorrupt,
    load_snapshot,
    save_snapshot,
)
from bulkhead.v1 import agent_pb2, ruleset_pb2
from bulkhead.v1.contract import DeltaError, delta_result, ruleset_hash

log = logging.getLogger(__name__)

VERIFY_AFTER_S = 5.0  # quiet after the last quick cut before the thorough one runs
VERIFY_WITHIN_S = 30.0  # ... or this long after the first unverified quick cut

FlowCutter = Callable[[ruleset_pb2.Ruleset, Baseline, Sequence[str]], int]


class Enforcer:
    def __init__(
        self,
        backend: Backend,
        baseline: Baseline,
        state_dir: Path,
        *,
        cut_flows: FlowCutter = cut_disallowed,
        verify_flows: FlowCutter | None = None,
        confirm: Callable[[], bool] = lambda: True,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """VERIFY_FLOWS: a thorough cut (a full conntrack dump) run once the cuts by the
        quicker CUT_FLOWS (from a mirror that could miss an entry) have settled; see
        verify_cut."""
        self._backend = backend
        self._baseline = baseline
        self._state_dir = state_dir
        self._cut_flows = cut_flows
        self._verify_flows = verify_flows
        self._clock = clock
        # The quick cuts not verified yet: when the first and the last of them happened,
        # and the host's addresses at the last.
        self._unverified: tuple[float, float, tuple[str, ...]] | None = None
        # Commit-confirm: can the agent still reach its controller after an apply?
        self._confirm = confirm
        self.current: AppliedSnapshot | None = None
        # Applied, acked later: the ruleset to judge established connections by, and the
        # host's addresses (see cut_pending).
        self._cut_due: tuple[ruleset_pb2.Ruleset, tuple[str, ...]] | None = None

    @property
    def applied_revision(self) -> int:
        return self.current.revision if self.current else 0

    @property
    def applied_hash(self) -> str:
        return self.current.hash if self.current else ""

    def restore(self) -> None:
        """Enforce the persisted snapshot, before any contact with the controller.

        With no snapshot the host gets the baseline alone (default-deny). With a corrupt
        one, rules already in the kernel are kept rather than opening the host.
        """
        try:
            saved = load_snapshot(self._state_dir)
        except StateCorrupt as exc:
            if self._backend.is_present():
                log.error("%s; keeping the rules in the kernel until the controller resyncs", exc)
                return
            log.error("%s; no rules in the kernel, enforcing the baseline alone", exc)
            saved = None
        if saved is not None:
            try:
                self._backend.apply(saved.ruleset, self._baseline)
            except RulesetError as exc:
                # E.g. stricter checks after an upgrade: the controller will resend it.
                if self._backend.is_present():
                    log.error("saved policy refused (%s); keeping the rules in the kernel", exc)
                    return
                log.error("saved policy refused (%s); enforcing the baseline alone", exc)
            else:
                self.current = saved
                log.info("re-applied saved policy revision %d", saved.revision)
                return
        self._backend.apply(ruleset_pb2.Ruleset(), self._baseline)
        log.info("no saved policy: enforcing the baseline (%s mode)", self._baseline.mode.value)

    def apply(
        self, snapshot: agent_pb2.PolicySnapshot, local_addresses: Sequence[str]
    ) -> agent_pb2.Ack:
        """Apply one snapshot atomically; the Ack says what happened."""
        digest = ruleset_hash(snapshot.ruleset)
        if digest != snapshot.hash:
            return self._failed(snapshot, f"snapshot hash mismatch (got {digest[:12]})")
        if digest == self.applied_hash and self._backend.is_present():
            return agent_pb2.Ack(revision=snapshot.revision, hash=digest, ok=True)
        try:
            self._backend.apply(snapshot.ruleset, self._baseline)
        except DataplaneError as exc:
            return self._failed(snapshot, str(exc))
        return self._settle(snapshot, local_addresses, cut=True)

    def _settle(
        self, snapshot: agent_pb2.PolicySnapshot, local_addresses: Sequence[str], *, cut: bool
    ) -> agent_pb2.Ack:
        """After the kernel took SNAPSHOT: confirm and persist; with CUT, note that the
        connections it no longer allows are to be cut (cut_pending)."""
        digest = snapshot.hash
        if not self._confirm():
            self._roll_back()
            return self._failed(
                snapshot,
                "rolled back: after applying it the controller could not be reached over a "
                "new connection (commit-confirm)",
            )
        self.current = AppliedSnapshot(snapshot.revision, digest, snapshot.ruleset)
        # Persisted only after the kernel accepted it: the file never runs ahead of reality.
        try:
            save_snapshot(self._state_dir, self.current)
        except OSError as exc:
            return self._failed(snapshot, f"applied but not saved to {self._state_dir}: {exc}")
        if (cut or self._cut_due is not None) and self._baseline.mode is Mode.ENFORCE:
            # Always against the latest ruleset: that is what the kernel enforces now.
            self._cut_due = (snapshot.ruleset, tuple(local_addresses))
        log.info("applied revision %d (%s)", snapshot.revision, digest[:12])
        return agent_pb2.Ack(revision=snapshot.revision, hash=digest, ok=True)

    def cut_pending(self) -> int:
        """Cut the established connections the last applied ruleset no longer allows; how
        many. Called after the apply's ack is sent: the kernel already judges every new
        connection by the new rules, and dumping conntrack (tens of ms, growing with the
        machine's conntrack table) need not delay the ack."""
        due, self._cut_due = self._cut_due, None
        if due is None:
            return 0
        ruleset, local_addresses = due
        if self._verify_flows is not None:
            now = self._clock()
            first = self._unverified[0] if self._unverified else now
            self._unverified = (first, now, local_addresses)
        count = self._cut(self._cut_flows, ruleset, local_addresses)
        if count:
            log.info("cut %d connection(s) no longer allowed", count)
        return count

    def verification_due(self) -> bool:
        """Whether the quick cuts have settled (none for VERIFY_AFTER_S, or the first
        VERIFY_WITHIN_S ago) and a thorough one should check them."""
        if self._unverified is None:
            return False
        first, last, _ = self._unverified
        now = self._clock()
        return now - last >= VERIFY_AFTER_S or now - first >= VERIFY_WITHIN_S

    def verify_cut(self) -> int:
        """Cut, from a full dump, what the last quick cuts missed; how many. Anything
        found means the quick cut's source missed an entry: logged as a warning."""
        unverified, self._unverified = self._unverified, None
        if self._verify_flows is None or unverified is None or self.current is None:
            return 0
        if self._baseline.mode is not Mode.ENFORCE:
            return 0
        # Against the ruleset in force now, like every cut.
        count = self._cut(self._verify_flows, self.current.ruleset, unverified[2])
        if count:
            log.warning("verification cut %d connection(s) the quick cut had missed", count)
        return count

    def _cut(
        self, cutter: FlowCutter, ruleset: ruleset_pb2.Ruleset, local_addresses: Sequence[str]
    ) -> int:
        try:
            return cutter(ruleset, self._baseline, local_addresses)
        except Exception:
            # The new rules are in force for new connections either way.
            log.exception("could not cut connections the new policy no longer allows")
            return 0

    def apply_delta(
        self, delta: agent_pb2.PolicyDelta, local_addresses: Sequence[str]
    ) -> agent_pb2.Ack:
        """Apply set changes to what is enforced. Anything that does not fit (another base,
        a result with another hash, no table in the kernel) asks for a snapshot instead."""

        def need_snapshot(reason: str) -> agent_pb2.Ack:
            log.warning("revision %d delta not applied, asking for a snapshot: %s",
                        delta.revision, reason)  # fmt: skip
            return agent_pb2.Ack(
                revision=delta.revision, hash=delta.hash, ok=False, error=reason,
                need_snapshot=True,
            )  # fmt: skip

        held = self.current or AppliedSnapshot(0, "", ruleset_pb2.Ruleset())
        try:
            ruleset = delta_result(held.ruleset, held.hash, delta)
        except DeltaError as exc:
            return need_snapshot(str(exc))
        if not self._backend.is_present():
            return need_snapshot("no Bulkhead rules in the kernel to change")
        snapshot = agent_pb2.PolicySnapshot(revision=delta.revision, hash=delta.hash)
        snapshot.ruleset.CopyFrom(ruleset)
        try:
            if not self._backend.update_elements(delta.sets, ruleset, self._baseline):
                self._backend.apply(ruleset, self._baseline)
        except DataplaneError as exc:
            return self._failed(snapshot, str(exc))
        # Only removed elements can end a connection the old ruleset allowed.
        removes = any(change.remove_hosts or change.remove_networks for change in delta.sets)
        return self._settle(snapshot, local_addresses, cut=removes)

    def set_baseline(self, baseline: Baseline) -> None:
        """A new local baseline (e.g. the mode changed): re-apply what is enforced with it."""
        self._baseline = baseline
        current = self.current.ruleset if self.current else ruleset_pb2.Ruleset()
        self._backend.apply(current, baseline)
        log.info("re-applied revision %d with the %s baseline", self.applied_revision,
                 baseline.mode.value)  # fmt: skip

    def _roll_back(self) -> None:
        """Put the previous ruleset back (the baseline alone if there was none)."""
        previous = self.current.ruleset if self.current else ruleset_pb2.Ruleset()
        try:
            self._backend.apply(previous, self._baseline)
        except DataplaneError as exc:
            log.critical("rollback failed, the new ruleset stays: %s", exc)

    def _failed(self, snapshot: agent_pb2.PolicySnapshot, reason: str) -> agent_pb2.Ack:
        log.error("revision %d not applied: %s", snapshot.revision, reason)
        return agent_pb2.Ack(revision=snapshot.revision, hash=snapshot.hash, ok=False, error=reason)
