"""Tamper detection and self-heal: notice when someone changes what the agent owns in the
kernel (a flushed table or chain, a deleted or emptied set, an inserted accept rule), put it
back at once, and report it.

The guard wraps the backend the Enforcer writes through (`TamperGuard.backend`), so every
apply, whichever path makes it (restore, a snapshot, a mode change, a rollback), records
the ruleset and baseline it loaded and the kernel's fingerprint after it, under a lock the
checks share: a check never runs during our own apply and never mistakes it for tampering.
A check compares the live fingerprint with the recorded one and, on a difference,
re-applies what was recorded. With nftables, `nft -j monitor` wakes a check on any event
touching our table, with a slow periodic check as a backstop; iptables has no monitor, so
it is checked often. Events only wake checks; fingerprints decide.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from contextlib import suppress
from dataclasses import dataclass

from agent.dataplane.backend import Backend, DataplaneError
from agent.dataplane.baseline import Baseline
from agent.dataplane.fingerprint import describe
from agent.dataplane.nftables import FAMILY, TABLE
from bulkhead.v1 import agent_pb2, ruleset_pb2

log = logging.getLogger(__name__)

NFT_MONITOR = ("nft", "-j", "monitor", "ruleset")
NFT_BACKSTOP_S = 5.0  # the monitor wakes checks at once; this catches a missed event
IPTABLES_INTERVAL_S = 0.5  # no monitor for x_tables: detection takes up to this long
MONITOR_LINE_LIMIT = 1 << 20  # bytes; longer event lines (huge element lists) are skipped
MONITOR_RESTART_S = 5.0

Report = Callable[[agent_pb2.TamperEvent], Awaitable[None]]


@dataclass(frozen=True)
class _Applied:
    """What our last successful apply loaded, and the kernel's fingerprint right after it."""

    ruleset: ruleset_pb2.Ruleset
    baseline: Baseline
    fingerprint: str | None  # None: could not be read; the next check adopts what it sees


class TamperGuard:
    """Keeps what the agent loaded in the kernel the way it loaded it."""

    def __init__(
        self,
        backend: Backend,
        *,
        interval: float,
        monitor: Sequence[str] | None = None,
        elements_owned_by_kernel: bool = False,
    ) -> None:
        """ELEMENTS_OWNED_BY_KERNEL: the backend updates set elements only where the kernel
        lets no other process change anything (an owned nftables table), so an element
        update needs no reading back. Otherwise (iptables) one is guarded like an apply."""
        self._backend = backend
        self._interval = interval
        self._monitor = tuple(monitor) if monitor else None
        self._elements_owned_by_kernel = elements_owned_by_kernel
        self._lock = threading.Lock()
        self._applied: _Applied | None = None
        # The live fingerprint a failed repair left: reported once, retried silently.
        self._unrepaired: str | None = None
        self._report: Report | None = None
        self.backend: Backend = GuardedBackend(self, backend)

    @classmethod
    def for_dataplane(cls, dataplane: str, backend: Backend) -> TamperGuard:
        """The guard for DATAPLANE ('nftables' or 'iptables') with its detection settings."""
        if dataplane == "nftables":
            # NftablesBackend.update_elements refuses unless it owns the table.
            return cls(
                backend, interval=NFT_BACKSTOP_S, monitor=NFT_MONITOR, elements_owned_by_kernel=True
            )
        return cls(backend, interval=IPTABLES_INTERVAL_S)

    @property
    def expected_fingerprint(self) -> str | None:
        """The fingerprint the kernel should have; None while there is nothing to guard."""
        applied = self._applied
        return applied.fingerprint if applied else None

    def remember(self, ruleset: ruleset_pb2.Ruleset, baseline: Baseline) -> None:
        """Record that RULESET with BASELINE was just applied other than through
        `backend` (which records its own applies), and that the kernel now holds it."""
        with self._lock:
            self._remember(ruleset, baseline)

    def check(self) -> agent_pb2.TamperEvent | None:
        """Compare the kernel with what we loaded; repair and describe any difference.

        Returns None when nothing differs, nothing is guarded yet, an apply of ours is in
        progress (it records what it leaves), or a repair that already failed and was
        reported fails again. Raises DataplaneError if the kernel cannot be read.
        """
        if not self._lock.acquire(blocking=False):
            return None
        try:
            return self._check()
        finally:
            self._lock.release()

    def report_to(self, report: Report) -> None:
        """Pass each later TamperEvent to REPORT (e.g. once the controller link exists)."""
        self._report = report

    async def watch(self, report: Report | None = None) -> None:
        """Check and repair until cancelled, passing each TamperEvent to REPORT (or to the
        one given to report_to; with neither, the event is only logged)."""
        if report is not None:
            self._report = report
        wake = asyncio.Event()
        follower = asyncio.create_task(self._follow_monitor(wake)) if self._monitor else None
        failing = False
        try:
            while True:
                with suppress(TimeoutError):
                    await asyncio.wait_for(wake.wait(), self._interval)
                wake.clear()
                try:
                    event = await asyncio.to_thread(self.check)
                except DataplaneError as exc:
                    # Logged once per streak: a broken kernel read would repeat every interval.
                    log.log(logging.DEBUG if failing else logging.ERROR, "tamper check: %s", exc)
                    failing = True
                    continue
                failing = False
                if event is not None and self._report is not None:
                    try:
                        await self._report(event)
                    except Exception:
                        log.exception("could not report a tamper event")
        finally:
            if follower is not None:
                follower.cancel()
                with suppress(asyncio.CancelledError):
                    await follower

    # -- for GuardedBackend --------------------------------------------------------------

    def _apply_and_remember(self, ruleset: ruleset_pb2.Ruleset, baseline: Baseline) -> None:
        with self._lock:
            try:
                self._backend.apply(ruleset, baseline)
            except DataplaneError:
                previous = self._applied
                if previous is not None:
                    # A failed apply of ours is not tampering: what it left is expected until
                    # the next apply (with nftables the kernel is as it was anyway).
                    self._remember(previous.ruleset, previous.baseline)
                raise
            self._remember(ruleset, baseline)

    def _update_and_remember(
        self,
        changes: Sequence[agent_pb2.SetChange],
        result: ruleset_pb2.Ruleset,
        baseline: Baseline,
    ) -> bool:
        with self._lock:
            if not self._elements_owned_by_kernel:
                return self._update_unowned(changes, result, baseline)
            # One batch: refused, the kernel holds what it held, which stays expected.
            if not self._backend.update_elements(changes, result, baseline):
                return False
            # Not read back now (a 100k-element table lists in ~0.4 s, on the ack's path):
            # element updates happen only in a table the kernel lets no one else change
            # (nft owner flag), so the next check adopts what it finds.
            self._applied = _Applied(result, baseline, None)
            self._unrepaired = None
            return True

    def _update_unowned(
        self,
        changes: Sequence[agent_pb2.SetChange],
        result: ruleset_pb2.Ruleset,
        baseline: Baseline,
    ) -> bool:
        # Anyone may have changed our rules or sets since the last check, and an element
        # update keeps what it does not touch: read first, and leave a changed (or
        # unreadable) kernel to the full apply, which rewrites all of it. Afterwards read
        # again, as after an apply, so a change made later is noticed.
        applied = self._applied
        if applied is None or applied.fingerprint is None:
            return False
        try:
            live = self._backend.state_fingerprint()
        except DataplaneError:
            return False
        if live != applied.fingerprint:
            log.warning("%s: the delta goes in whole", describe(applied.fingerprint, live))
            return False
        try:
            if not self._backend.update_elements(changes, result, baseline):
                return False
        except DataplaneError:
            # What it left is expected until the next apply, as after a failed apply.
            self._remember(applied.ruleset, applied.baseline)
            raise
        self._remember(result, baseline)
        return True

    def _remove_and_forget(self) -> None:
        with self._lock:
            self._backend.remove()
            self._applied = None
            self._unrepaired = None

    # -- internals (callers hold self._lock) -------------------------------------------

    def _remember(self, ruleset: ruleset_pb2.Ruleset, baseline: Baseline) -> None:
        self._applied = _Applied(ruleset, baseline, self._fingerprint_or_none())
        self._unrepaired = None

    def _fingerprint_or_none(self) -> str | None:
        try:
            return self._backend.state_fingerprint()
        except DataplaneError as exc:
            log.error("cannot read back what was applied (%s); the next check adopts it", exc)
            return None

    def _check(self) -> agent_pb2.TamperEvent | None:
        applied = self._applied
        if applied is None:
            return None
        live = self._backend.state_fingerprint()
        if applied.fingerprint is None:
            self._applied = _Applied(applied.ruleset, applied.baseline, live)
            return None
        if live == applied.fingerprint:
            return None
        detected_ms, started = int(time.time() * 1000), time.monotonic()
        description = describe(applied.fingerprint, live)
        try:
            self._backend.apply(applied.ruleset, applied.baseline)
        except DataplaneError as exc:
            seconds = time.monotonic() - started
            if live == self._unrepaired:
                log.debug("repair failed again: %s", exc)
                return None
            self._unrepaired = live
            log.error("tamper detected (%s); the repair failed: %s", description, exc)
            return _event(detected_ms, description, repaired=False, seconds=seconds)
        seconds = time.monotonic() - started
        self._remember(applied.ruleset, applied.baseline)
        log.warning("tamper detected and repaired in %.3f s: %s", seconds, description)
        return _event(detected_ms, description, repaired=True, seconds=seconds)

    async def _follow_monitor(self, wake: asyncio.Event) -> None:
        """Run the monitor for as long as we watch, restarting it if it stops."""
        assert self._monitor is not None
        while True:
            try:
                process = await asyncio.create_subprocess_exec(
                    *self._monitor,
                    stdin=asyncio.subprocess.DEVNULL,
                    stdout=asyncio.subprocess.PIPE,
                    stderr=asyncio.subprocess.DEVNULL,
                    limit=MONITOR_LINE_LIMIT,
                )
            except OSError as exc:
                log.warning("cannot run %s (%s)", " ".join(self._monitor), exc)
            else:
                wake.set()  # whatever happened while no monitor ran
                try:
                    assert process.stdout is not None
                    await _wake_on_our_events(process.stdout, wake)
                finally:
                    if process.returncode is None:
                        process.kill()
                    await process.wait()
                log.warning("%s exited with status %s", self._monitor[0], process.returncode)
            log.warning(
                "tamper checks every %.1f s only; retrying the monitor in %.0f s",
                self._interval,
                MONITOR_RESTART_S,
            )
            await asyncio.sleep(MONITOR_RESTART_S)


class GuardedBackend:
    """The Backend the Enforcer writes through: applies take the guard's lock and record
    what they loaded, so the guard never fights them and always repairs to the latest."""

    def __init__(self, guard: TamperGuard, inner: Backend) -> None:
        self._guard = guard
        self._inner = inner

    def apply(self, ruleset: ruleset_pb2.Ruleset, baseline: Baseline) -> None:
        self._guard._apply_and_remember(ruleset, baseline)

    def update_elements(
        self,
        changes: Sequence[agent_pb2.SetChange],
        result: ruleset_pb2.Ruleset,
        baseline: Baseline,
    ) -> bool:
        return self._guard._update_and_remember(changes, result, baseline)

    def remove(self) -> None:
        self._guard._remove_and_forget()

    def is_present(self) -> bool:
        return self._inner.is_present()

    def state_fingerprint(self) -> str:
        return self._inner.state_fingerprint()


def touches_our_table(line: bytes) -> bool:
    """Whether one `nft -j monitor` line is about table inet bulkhead or anything in it."""
    if TABLE.encode() not in line:  # cheap: most lines of a busy host are about other tables
        return False
    try:
        event = json.loads(line)
    except ValueError:
        return False
    if not isinstance(event, dict):
        return False
    for change in event.values():  # {"add": {"rule": {...}}}, {"delete": {"table": {...}}}
        if not isinstance(change, dict):
            continue
        for kind, body in change.items():
            if not isinstance(body, dict) or body.get("family") != FAMILY:
                continue
            if body.get("table") == TABLE or (kind == "table" and body.get("name") == TABLE):
                return True
    return False


async def _wake_on_our_events(stream: asyncio.StreamReader, wake: asyncio.Event) -> None:
    while True:
        try:
            line = await stream.readline()
        except ValueError:
            wake.set()  # a line over the limit (and dropped): check rather than guess
            continue
        if not line:
            return
        if touches_our_table(line):
            wake.set()


def _event(
    detected_ms: int, description: str, *, repaired: bool, seconds: float
) -> agent_pb2.TamperEvent:
    return agent_pb2.TamperEvent(
        detected_unix_ms=detected_ms,
        description=description,
        repaired=repaired,
        repair_seconds=seconds,
    )
