"""bulkhead-sim: the reconnect backoff (full jitter, doubling ceiling, capped, reset)."""

from __future__ import annotations

import random

import pytest

from controller.sim.fleet import Backoff


def test_delays_stay_between_half_the_initial_and_the_doubling_ceiling() -> None:
    backoff = Backoff(0.5, 30.0, rng=random.Random(7))
    for attempt in range(12):
        delay = backoff.next_delay()
        assert 0.25 <= delay <= min(30.0, 0.5 * 2**attempt)


def test_the_ceiling_grows_until_the_maximum() -> None:
    rng = random.Random(1)
    late = Backoff(0.5, 4.0, rng=rng)
    delays = [late.next_delay() for _ in range(200)]
    assert max(delays[10:]) <= 4.0
    assert max(delays[10:]) > 2.0  # jitter reaches well beyond the early ceilings


def test_reset_starts_from_the_initial_ceiling_again() -> None:
    backoff = Backoff(0.5, 30.0, rng=random.Random(3))
    for _ in range(10):
        backoff.next_delay()
    backoff.reset()
    assert backoff.next_delay() <= 0.5


def test_many_attempts_do_not_overflow() -> None:
    backoff = Backoff(0.5, 30.0, rng=random.Random(5))
    for _ in range(5000):
        assert backoff.next_delay() <= 30.0


def test_jitter_spreads_a_fleet() -> None:
    # A thousand agents failing together must not all retry at one instant.
    delays = {
        round(Backoff(0.5, 30.0, rng=random.Random(seed)).next_delay(), 3) for seed in range(1000)
    }
    assert len(delays) > 100


@pytest.mark.parametrize(("initial", "maximum"), [(0.0, 1.0), (2.0, 1.0), (-1.0, 1.0)])
def test_bad_bounds_are_refused(initial: float, maximum: float) -> None:
    with pytest.raises(ValueError, match="backoff"):
        Backoff(initial, maximum)
