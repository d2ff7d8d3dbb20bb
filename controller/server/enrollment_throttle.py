"""Failed enrollments per source: throttled, counted, logged and audited within bounds.

Each source (sources.py) has a bucket of `failures_per_minute` failures that refills at
that rate. A failed Enroll takes one; with the bucket empty the source's attempts are
refused with RESOURCE_EXHAUSTED before the store is touched, until it refills. Successes
take nothing, and other sources have their own buckets.

Nothing here may grow with the attacker's effort:
* the log gets the first failure (or throttle) of a source in full, then one summary line
  per source per interval; at most `MAX_LINES_PER_INTERVAL` of each kind, then one line
  for the other sources;
* the audit log gets at most one `enrollment.throttled` entry per source per interval,
  for at most `MAX_AUDITED_SOURCES` sources;
* at most `max_sources` buckets are kept; the least recently seen goes first.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

DEFAULT_FAILURES_PER_MINUTE = 60
DEFAULT_REPORT_INTERVAL_S = 60.0
DEFAULT_MAX_SOURCES = 10_000
MAX_LINES_PER_INTERVAL = 20
MAX_AUDITED_SOURCES = 20

# Writes one audit entry for a throttled source: (source, detail).
AuditThrottled = Callable[[str, Mapping[str, object]], None]


@dataclass
class FailureStats:
    """Plain counters, read by the metrics collector at scrape time."""

    # gRPC status name -> failed Enroll calls that reached the enrollment check
    failures: Counter[str] = field(default_factory=Counter)
    throttled: int = 0


@dataclass
class _Bucket:
    tokens: float
    updated: float


@dataclass
class _Interval:
    """One source's events since the last report."""

    failures: int = 0
    throttled: int = 0
    logged: bool = False  # its first failure or throttle went to the log in full
    audited: bool = False


class EnrollmentThrottle:
    def __init__(
        self,
        failures_per_minute: int = DEFAULT_FAILURES_PER_MINUTE,
        *,
        report_interval_s: float = DEFAULT_REPORT_INTERVAL_S,
        max_sources: int = DEFAULT_MAX_SOURCES,
        audit: AuditThrottled | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if failures_per_minute < 1:
            raise ValueError(f"failures_per_minute: {failures_per_minute} must be at least 1")
        self._capacity = float(failures_per_minute)
        self._refill_per_s = failures_per_minute / 60.0
        self._report_interval_s = report_interval_s
        self._max_sources = max_sources
        self._audit = audit
        self._clock = clock
        self._buckets: OrderedDict[str, _Bucket] = OrderedDict()
        self._interval: dict[str, _Interval] = {}
        self._unlisted = _Interval()  # events of sources beyond max_sources this interval
        self._lines = 0
        self._audits = 0
        self.stats = FailureStats()

    # -- the servicer's questions ----------------------------------------------------------

    def retry_after_s(self, source: str) -> float:
        """0 if SOURCE may try to enroll now, else the seconds until it may."""
        bucket = self._bucket(source)
        if bucket.tokens >= 1:
            return 0.0
        return (1 - bucket.tokens) / self._refill_per_s

    def refused(self, source: str) -> None:
        """An attempt from SOURCE was refused because its bucket is empty."""
        self.stats.throttled += 1
        events = self._events(source)
        if events is None:
            self._unlisted.throttled += 1
            return
        events.throttled += 1
        if events.throttled > 1:
            return
        if self._line_allowed():
            log.warning(
                "enrollment from %s throttled after %d failed attempts within a minute: its "
                "attempts get RESOURCE_EXHAUSTED until it slows down (summary every %.0f s)",
                source, int(self._capacity), self._report_interval_s,
            )  # fmt: skip
        if self._audit is not None and not events.audited and self._audits < MAX_AUDITED_SOURCES:
            events.audited = True
            self._audits += 1
            self._audit(
                source,
                {"failures_per_minute": int(self._capacity),
                 "interval_s": self._report_interval_s},
            )  # fmt: skip

    def failed(self, source: str, code: str, reason: str) -> None:
        """An Enroll from SOURCE failed with CODE (a gRPC status name) for REASON."""
        self.stats.failures[code] += 1
        bucket = self._bucket(source)
        bucket.tokens = max(0.0, bucket.tokens - 1)
        events = self._events(source)
        if events is None:
            self._unlisted.failures += 1
            return
        events.failures += 1
        if not events.logged and self._line_allowed():
            events.logged = True
            log.warning("enrollment from %s failed: %s %.200r", source, code, reason)

    # -- reporting --------------------------------------------------------------------------

    def report(self) -> None:
        """Summarise the interval that ends now and start the next."""
        others = self._unlisted
        listed = 0
        for source, events in self._interval.items():
            unlogged = events.failures - (1 if events.logged else 0)
            if unlogged <= 0 and events.throttled == 0:
                continue
            if listed >= MAX_LINES_PER_INTERVAL:
                others.failures += events.failures
                others.throttled += events.throttled
                continue
            listed += 1
            log.warning(
                "enrollment from %s: %d failed and %d throttled attempts in the last %.0f s",
                source, events.failures, events.throttled, self._report_interval_s,
            )  # fmt: skip
        if others.failures or others.throttled:
            log.warning(
                "enrollment: %d failed and %d throttled attempts from other sources in the "
                "last %.0f s",
                others.failures, others.throttled, self._report_interval_s,
            )  # fmt: skip
        self._interval.clear()
        self._unlisted = _Interval()
        self._lines = 0
        self._audits = 0
        self._forget_refilled()

    async def report_every_interval(self) -> None:
        while True:
            await asyncio.sleep(self._report_interval_s)
            self.report()

    # -- internals --------------------------------------------------------------------------

    def _bucket(self, source: str) -> _Bucket:
        now = self._clock()
        bucket = self._buckets.get(source)
        if bucket is None:
            bucket = self._buckets[source] = _Bucket(self._capacity, now)
            if len(self._buckets) > self._max_sources:
                self._buckets.popitem(last=False)
        else:
            self._buckets.move_to_end(source)
            elapsed = max(0.0, now - bucket.updated)
            bucket.tokens = min(self._capacity, bucket.tokens + elapsed * self._refill_per_s)
            bucket.updated = now
        return bucket

    def _events(self, source: str) -> _Interval | None:
        """SOURCE's events this interval; None once the interval lists enough sources."""
        events = self._interval.get(source)
        if events is None:
            if len(self._interval) >= self._max_sources:
                return None
            events = self._interval[source] = _Interval()
        return events

    def _line_allowed(self) -> bool:
        if self._lines >= MAX_LINES_PER_INTERVAL:
            return False
        self._lines += 1
        return True

    def _forget_refilled(self) -> None:
        """Drop the buckets that are full again: they hold nothing a new one would not."""
        now = self._clock()
        for source in [
            source
            for source, bucket in self._buckets.items()
            if bucket.tokens + (now - bucket.updated) * self._refill_per_s >= self._capacity
        ]:
            del self._buckets[source]
