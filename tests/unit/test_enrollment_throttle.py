"""The failed-enrollment throttle on a fake clock, and how sources are told apart."""

from __future__ import annotations

import logging
from collections.abc import Mapping

import pytest

from controller.server.enrollment_throttle import (
    MAX_AUDITED_SOURCES,
    MAX_LINES_PER_INTERVAL,
    EnrollmentThrottle,
)
from controller.server.sources import RelayNames, peer_source, source_key

LOGGER = "controller.server.enrollment_throttle"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Audit:
    def __init__(self) -> None:
        self.entries: list[tuple[str, Mapping[str, object]]] = []

    def __call__(self, source: str, detail: Mapping[str, object]) -> None:
        self.entries.append((source, detail))


def attempt(throttle: EnrollmentThrottle, source: str) -> bool:
    """What the servicer does for a failing attempt; True if it reached the check."""
    if throttle.retry_after_s(source) > 0:
        throttle.refused(source)
        return False
    throttle.failed(source, "UNAUTHENTICATED", "token: not issued by this controller")
    return True


def test_a_source_gets_its_allowance_then_waits_for_it_to_refill() -> None:
    clock = Clock()
    throttle = EnrollmentThrottle(6, clock=clock)
    assert [attempt(throttle, "198.51.100.7") for _ in range(10)] == [True] * 6 + [False] * 4
    assert throttle.retry_after_s("198.51.100.7") == pytest.approx(10.0)
    assert throttle.retry_after_s("203.0.113.1") == 0  # another source
    clock.now += 9.9
    assert not attempt(throttle, "198.51.100.7")
    clock.now += 0.2
    assert attempt(throttle, "198.51.100.7")
    assert throttle.stats.failures == {"UNAUTHENTICATED": 7}
    assert throttle.stats.throttled == 5


def test_a_million_failures_make_a_few_log_lines(caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    throttle = EnrollmentThrottle(60, clock=clock)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        for _ in range(1_000_000 // 1000):
            for _ in range(1000):
                attempt(throttle, "198.51.100.7")
            clock.now += 0.06
        assert len(caplog.records) == 2  # the first failure, the throttle
        throttle.report()
    lines = [record.getMessage() for record in caplog.records]
    assert "failed: UNAUTHENTICATED 'token: not issued by this controller'" in lines[0]
    assert "throttled after 60 failed attempts" in lines[1]
    failed, throttled = throttle.stats.failures["UNAUTHENTICATED"], throttle.stats.throttled
    assert failed + throttled == 1_000_000
    assert failed <= 121  # the allowance, and one a second for the 60 s the flood lasted
    assert lines[2].startswith(
        f"enrollment from 198.51.100.7: {failed} failed and {throttled} throttled attempts"
    )
    assert len(lines) == 3


def test_many_sources_are_logged_and_audited_within_bounds(
    caplog: pytest.LogCaptureFixture,
) -> None:
    audit = Audit()
    throttle = EnrollmentThrottle(1, audit=audit, clock=Clock())
    sources = [f"198.51.100.{n}" for n in range(200)]
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        for _ in range(3):
            for source in sources:
                attempt(throttle, source)
        assert len(caplog.records) == MAX_LINES_PER_INTERVAL
        throttle.report()
        # A line per source up to the bound, then one for the others.
        assert len(caplog.records) == 2 * MAX_LINES_PER_INTERVAL + 1
        others = 200 - MAX_LINES_PER_INTERVAL
        summary = caplog.records[-1].getMessage()
        assert summary.startswith(f"enrollment: {others} failed and {2 * others} throttled")
        assert "from other sources" in summary
    assert [source for source, _ in audit.entries] == sources[:MAX_AUDITED_SOURCES]
    # Next interval: each still-throttled source may be audited once more.
    attempt(throttle, sources[0])
    attempt(throttle, sources[0])
    assert [source for source, _ in audit.entries].count(sources[0]) == 2


def test_sources_kept_are_bounded_and_the_oldest_is_forgotten() -> None:
    throttle = EnrollmentThrottle(1, max_sources=100, clock=Clock())
    attempt(throttle, "198.51.100.1")
    assert throttle.retry_after_s("198.51.100.1") > 0
    for n in range(200):
        attempt(throttle, f"203.0.113.{n}")
    assert throttle.retry_after_s("198.51.100.1") == 0  # forgotten: a fresh allowance


@pytest.mark.parametrize(
    ("address", "key"),
    [
        ("198.51.100.7", "198.51.100.7"),
        ("2001:db8:1:2:aaaa::1", "2001:db8:1:2::/64"),
        ("2001:db8:1:2:bbbb::9", "2001:db8:1:2::/64"),
        ("fe80::1%eth0", "fe80::/64"),
        ("::ffff:198.51.100.7", "198.51.100.7"),
        ("not an address", "not an address"),
    ],
)
def test_source_key(address: str, key: str) -> None:
    assert source_key(address) == key


def test_peer_source_reads_direct_and_relayed_peers() -> None:
    assert peer_source("ipv4:198.51.100.7:41000") == "198.51.100.7"
    assert peer_source("ipv6:[2001:db8::5]:41000") == "2001:db8::/64"
    name = RelayNames().next("2001:db8:0:7::5")
    assert peer_source("unix-abstract:" + name.lstrip("\0")) == "2001:db8:0:7::/64"
    assert peer_source("unix-abstract:bulkhead-enroll/x/zz") == "unix-abstract:bulkhead-enroll/x/zz"
    assert peer_source("unix:/run/other.sock") == "unix:/run/other.sock"


def test_relay_names_are_unique_and_fit_a_socket_address() -> None:
    names = RelayNames()
    made = {names.next("2001:db8:ffff:ffff:ffff:ffff:ffff:ffff") for _ in range(1000)}
    assert len(made) == 1000
    assert max(len(name.encode()) for name in made) <= 107
