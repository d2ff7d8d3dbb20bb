"""Parsing `bulkhead label` arguments: `key=value` sets a label, `key-` removes it.

Only the syntax is checked here; the controller decides which keys are allowed.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field

from controller.cli.errors import BadInputError

_KEY = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_./-]*")
# Values are matched against selectors like `env == 'prod'`: no blanks, quotes or '='.
_VALUE = re.compile(r"[^\s='\"]+")
_USAGE = "expected key=value to set a label or key- to remove one"


@dataclass(frozen=True)
class LabelChanges:
    """Labels to set or overwrite, and label keys to remove."""

    set: dict[str, str] = field(default_factory=dict)
    remove: list[str] = field(default_factory=list)


def parse_label_args(args: Sequence[str], *, allow_empty: bool = False) -> LabelChanges:
    """Parse `key=value` and `key-` arguments; raise BadInputError naming a bad one."""
    if not args and not allow_empty:
        raise BadInputError(f"no labels given: {_USAGE}")
    changes = LabelChanges()
    for arg in args:
        if "=" in arg:
            key, value = _parse_assignment(arg)
            if key in changes.remove:
                raise BadInputError(f"label {key!r} is both set and removed")
            if changes.set.get(key, value) != value:
                raise BadInputError(f"label {key!r} is given two different values")
            changes.set[key] = value
        elif arg.endswith("-"):
            key = arg[:-1]
            _check_key(arg, key)
            if key in changes.set:
                raise BadInputError(f"label {key!r} is both set and removed")
            if key not in changes.remove:
                changes.remove.append(key)
        else:
            raise BadInputError(f"label argument {arg!r}: {_USAGE}")
    return changes


def _parse_assignment(arg: str) -> tuple[str, str]:
    key, _, value = arg.partition("=")
    _check_key(arg, key)
    if not value:
        raise BadInputError(f"label argument {arg!r}: the value is empty (use {key}- to remove)")
    if "=" in value:
        raise BadInputError(f"label argument {arg!r}: a value cannot contain '='")
    if not _VALUE.fullmatch(value):
        raise BadInputError(f"label argument {arg!r}: the value cannot contain blanks or quotes")
    return key, value


def _check_key(arg: str, key: str) -> None:
    if not key:
        raise BadInputError(f"label argument {arg!r}: the key is empty; {_USAGE}")
    if not _KEY.fullmatch(key):
        raise BadInputError(
            f"label argument {arg!r}: key {key!r} may hold only letters, digits and _ . / - "
            "and cannot start with . / -"
        )


def parse_label_list(text: str, option: str) -> dict[str, str]:
    """Parse `k=v,k2=v2` (the value of OPTION); raise BadInputError naming a bad item."""
    labels: dict[str, str] = {}
    for item in text.split(","):
        if "=" not in item:
            raise BadInputError(f"{option} item {item!r}: expected key=value (comma separated)")
        if item.endswith("="):
            raise BadInputError(f"{option} item {item!r}: the value is empty")
        key, value = _parse_assignment(item)
        if key in labels:
            raise BadInputError(f"{option}: label {key!r} is given twice")
        labels[key] = value
    return labels
