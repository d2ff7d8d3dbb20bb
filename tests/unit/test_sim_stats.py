"""bulkhead-sim: latency statistics (nearest-rank percentiles, missing arrivals)."""

from __future__ import annotations

import math

import pytest

from controller.sim.stats import percentile, summarize


def test_nearest_rank_percentiles_of_one_to_a_hundred() -> None:
    values = [float(n) for n in range(1, 101)]
    assert percentile(values, 0.5) == 50.0
    assert percentile(values, 0.9) == 90.0
    assert percentile(values, 0.99) == 99.0
    assert percentile(values, 1.0) == 100.0


def test_a_percentile_is_always_one_of_the_values() -> None:
    assert percentile([1.0, 2.0, 3.0], 0.5) == 2.0
    assert percentile([1.0, 2.0, 3.0], 0.99) == 3.0
    assert percentile([7.0], 0.01) == 7.0


@pytest.mark.parametrize("fraction", [0.0, -0.1, 1.5])
def test_fractions_outside_zero_to_one_are_refused(fraction: float) -> None:
    with pytest.raises(ValueError, match="fraction"):
        percentile([1.0], fraction)


def test_percentile_of_nothing_is_refused() -> None:
    with pytest.raises(ValueError, match="no values"):
        percentile([], 0.5)


def test_summary_counts_missing_arrivals_apart() -> None:
    summary = summarize([0.3, None, 0.1, 0.2, None])
    assert (summary.count, summary.missing) == (3, 2)
    assert (summary.minimum, summary.p50, summary.maximum) == (0.1, 0.2, 0.3)
    assert "missing 2" in summary.describe()
    assert "p50 200 ms" in summary.describe()


def test_summary_of_nothing_arrived() -> None:
    summary = summarize([None, None])
    assert (summary.count, summary.missing) == (0, 2)
    assert math.isnan(summary.p99)
    assert summary.describe() == "no arrivals (2 missing)"


def test_unsorted_input_is_sorted_first() -> None:
    summary = summarize([5.0, 1.0, 3.0, 2.0, 4.0])
    assert (summary.p50, summary.p90, summary.maximum) == (3.0, 5.0, 5.0)
