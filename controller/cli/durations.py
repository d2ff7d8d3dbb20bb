"""Durations the operator types (`90s`, `10m`, `1h`, `2d`, or plain seconds), and their
rendering as short spans (`1h30m`) next to absolute times."""

from __future__ import annotations

import re

from controller.cli.errors import BadInputError

_UNIT_SECONDS = {"d": 86_400, "h": 3_600, "m": 60, "s": 1}
_DURATION = re.compile(r"(?P<count>[0-9]{1,9})(?P<unit>[smhd]?)")
EXAMPLES = "90s, 10m, 1h, 2d or a number of seconds"


def parse_duration(text: str, option: str, *, maximum_seconds: int | None = None) -> int:
    """Seconds in TEXT, above 0 and at most MAXIMUM_SECONDS; BadInputError names OPTION."""
    match = _DURATION.fullmatch(text.strip().lower())
    if match is None:
        raise BadInputError(f"{option} {text!r}: expected a duration like {EXAMPLES}")
    seconds = int(match["count"]) * _UNIT_SECONDS[match["unit"] or "s"]
    if seconds <= 0:
        raise BadInputError(f"{option} {text!r}: the duration must be longer than 0 seconds")
    if maximum_seconds is not None and seconds > maximum_seconds:
        limit = span_text(maximum_seconds)
        raise BadInputError(f"{option} {text!r}: the duration can be at most {limit}")
    return seconds


def span_text(seconds: int) -> str:
    """`2d3h`, `59m`, `1m30s`: the two largest non-zero units, the rest dropped."""
    if seconds <= 0:
        return "0s"
    parts = []
    for unit, size in _UNIT_SECONDS.items():
        count, seconds = divmod(seconds, size)
        if count:
            parts.append(f"{count}{unit}")
    return "".join(parts[:2])
