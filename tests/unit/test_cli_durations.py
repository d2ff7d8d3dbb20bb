"""Durations the operator types, and the short spans shown next to absolute times."""

from __future__ import annotations

import pytest

from controller.cli.durations import parse_duration, span_text
from controller.cli.errors import BadInputError
from controller.cli.output import moment_text, relative_text


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("90s", 90), ("10m", 600), ("1h", 3_600), ("2d", 172_800), ("45", 45), (" 2H ", 7_200)],
)
def test_durations_parse(text: str, seconds: int) -> None:
    assert parse_duration(text, "--ttl") == seconds


@pytest.mark.parametrize("text", ["", "1.5h", "-1h", "1w", "h", "1h30m", "1234567890s"])
def test_malformed_durations_name_the_option(text: str) -> None:
    with pytest.raises(BadInputError, match=r"^--since .*expected a duration like 90s"):
        parse_duration(text, "--since")


def test_the_maximum_is_inclusive_and_named() -> None:
    assert parse_duration("30d", "--ttl", maximum_seconds=30 * 86_400) == 30 * 86_400
    with pytest.raises(BadInputError, match=r"at most 30d$"):
        parse_duration("721h", "--ttl", maximum_seconds=30 * 86_400)


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0, "0s"), (59, "59s"), (90, "1m30s"), (3_600, "1h"), (3_661, "1h1m"), (93_784, "1d2h")],
)
def test_spans_keep_the_two_largest_units(seconds: int, text: str) -> None:
    assert span_text(seconds) == text


def test_relative_times_point_forward_or_back() -> None:
    now_ms = 1_700_000_000_000
    assert relative_text(now_ms + 3_600_000, now_ms) == "in 1h"
    assert relative_text(now_ms - 90_000, now_ms) == "1m30s ago"
    assert relative_text(now_ms + 2 * 86_400_000 - 300, now_ms) == "in 2d"
    assert moment_text(0, now_ms) == "never"
    assert moment_text(now_ms + 60_000, now_ms) == "in 1m (2023-11-14 22:14:20 UTC)"
