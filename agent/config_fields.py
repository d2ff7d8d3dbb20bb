"""Checks of single configuration values, for agent/config.py.

Each takes what YAML produced and returns the value the setting holds, or raises
FieldError with the problem (the caller adds where). The messages and the conversions
follow what pydantic's lax mode, which the agent used before, accepted: numbers written as
strings, whole floats as integers, "yes"/"no" and 0/1 as booleans; never a number for a
string. Not pydantic itself: it and pydantic_core are about 15 MB of the agent's resident
memory (docs/benchmarks.md).
"""

from __future__ import annotations

import math
from collections.abc import Collection
from pathlib import Path
from typing import cast

_TRUE = frozenset({"1", "on", "t", "true", "y", "yes"})
_FALSE = frozenset({"0", "off", "f", "false", "n", "no"})


class FieldError(ValueError):
    """One value is wrong. AT: where inside the value (a list index, a mapping key)."""

    def __init__(self, message: str, at: str = "") -> None:
        super().__init__(message)
        self.at = at


def string(value: object) -> str:
    if not isinstance(value, str):
        raise FieldError("Input should be a valid string")
    return value


def optional_string(value: object) -> str | None:
    return None if value is None else string(value)


def path(value: object) -> Path:
    if isinstance(value, Path):
        return value
    return Path(string(value))


def optional_path(value: object) -> Path | None:
    return None if value is None else path(value)


def boolean(value: object) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
        return value.strip().lower() in _TRUE
    raise FieldError("Input should be a valid boolean")


def number(
    value: object, *, ge: float | None = None, gt: float | None = None, le: float | None = None
) -> float:
    """A finite number within the bounds given."""
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise FieldError("Input should be a valid number")
    try:
        result = float(value)
    except ValueError:
        raise FieldError("Input should be a valid number") from None
    if not math.isfinite(result):
        raise FieldError("Input should be a finite number")
    _check_bounds(result, ge=ge, gt=gt, le=le)
    return result


def integer(value: object, *, ge: int, le: int) -> int:
    """A whole number (2.0 and "2" are 2) within GE..LE."""
    if isinstance(value, bool):
        raise FieldError("Input should be a valid integer")
    whole_float = isinstance(value, float) and value.is_integer()
    digits = isinstance(value, str) and value.strip().lstrip("+-").isdigit()
    if not (isinstance(value, int) or whole_float or digits):
        raise FieldError("Input should be a valid integer")
    result = int(cast(int | float | str, value))
    _check_bounds(result, ge=ge, le=le)
    return result


def choice(value: object, options: Collection[str]) -> str:
    if not isinstance(value, str) or value not in options:
        quoted = [repr(option) for option in options]
        listed = ", ".join(quoted[:-1]) + f" or {quoted[-1]}" if len(quoted) > 1 else quoted[0]
        raise FieldError(f"Input should be {listed}")
    return value


def string_list(value: object) -> list[str]:
    if not isinstance(value, list | tuple):
        raise FieldError("Input should be a valid list")
    for index, item in enumerate(value):
        if not isinstance(item, str):
            raise FieldError("Input should be a valid string", at=str(index))
    return list(value)


def string_map(value: object) -> dict[str, str]:
    if not isinstance(value, dict):
        raise FieldError("Input should be a valid dictionary")
    for key, item in value.items():
        if not isinstance(key, str):
            raise FieldError("Input should be a valid string", at=f"{key!r}")
        if not isinstance(item, str):
            raise FieldError("Input should be a valid string", at=key)
    return dict(value)


def _check_bounds(
    value: float, *, ge: float | None = None, gt: float | None = None, le: float | None = None
) -> None:
    if ge is not None and value < ge:
        raise FieldError(f"Input should be greater than or equal to {ge}")
    if gt is not None and value <= gt:
        raise FieldError(f"Input should be greater than {gt}")
    if le is not None and value > le:
        raise FieldError(f"Input should be less than or equal to {le}")
