"""Resource names, label keys and label values: one definition for resources, selectors
and whoever stores workload labels."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping

from bulkhead.v1.contract import LABEL_KEY_PATTERN, LABEL_VALUE_PATTERN, MAX_LABEL_KEY_LENGTH
from controller.policy.errors import FieldProblem

MAX_NAME_LENGTH = 63
# In a peer mapping these keys select how the peer is given; they are never label keys.
RESERVED_PEER_KEYS = frozenset({"selector", "iplist", "cidr"})
_MAX_SHOWN = 80  # characters of an offending value quoted back in a message

_LABEL_KEY = re.compile(LABEL_KEY_PATTERN)
_LABEL_VALUE = re.compile(LABEL_VALUE_PATTERN)
_NAME = re.compile(r"[a-z0-9]([a-z0-9-]*[a-z0-9])?")


def describe_value(value: object) -> str:
    """`value` as an operator would recognise it from a YAML/JSON document (shortened)."""
    if isinstance(value, str):
        text = repr(value)
    else:
        try:
            text = json.dumps(value)
        except (TypeError, ValueError):
            text = repr(value)
    return text if len(text) <= _MAX_SHOWN else text[: _MAX_SHOWN - 3] + "..."


def not_a_string(value: object, what: str) -> str:
    """The message for a non-string where a string belongs (YAML turns yes/1.0 into others)."""
    hint = "; quote it in YAML" if isinstance(value, bool | int | float) or value is None else ""
    return f"{what} must be a string, got {describe_value(value)}{hint}"


def name_problem(name: object) -> str | None:
    """Why `name` is not a valid resource name (a lowercase DNS label), or None."""
    if not isinstance(name, str):
        return not_a_string(name, "name")
    if len(name) > MAX_NAME_LENGTH:
        return f"{name!r}: names are at most {MAX_NAME_LENGTH} characters"
    if not _NAME.fullmatch(name):
        return (
            f"{name!r}: names use lowercase letters, digits and '-', "
            "and start and end with a letter or digit"
        )
    return None


def parse_name(value: object) -> str:
    """A validated resource name; FieldProblem otherwise."""
    problem = name_problem(value)
    if problem is not None:
        raise FieldProblem(problem)
    assert isinstance(value, str)
    return value


def label_key_problem(key: object) -> str | None:
    """Why `key` is not a valid label key, or None."""
    if not isinstance(key, str):
        return not_a_string(key, "label key")
    if len(key) > MAX_LABEL_KEY_LENGTH:
        return f"{key!r}: label keys are at most {MAX_LABEL_KEY_LENGTH} characters"
    if not _LABEL_KEY.fullmatch(key):
        return (
            f"{key!r}: label keys start with a letter or digit and contain only "
            "letters, digits, '_', '.', '-' and '/'"
        )
    return None


def label_value_problem(value: object) -> str | None:
    """Why `value` is not a valid label value, or None."""
    if not isinstance(value, str):
        return not_a_string(value, "label value")
    if not _LABEL_VALUE.fullmatch(value):
        return f"{value!r}: label values are up to 63 letters, digits, '.', '_' or '-'"
    return None


def parse_labels(raw: object) -> dict[str, str]:
    """A validated label mapping; FieldProblem.key names the offending label."""
    if not isinstance(raw, Mapping):
        raise FieldProblem(f"expected a mapping of labels, got {describe_value(raw)}")
    labels: dict[str, str] = {}
    for key, value in raw.items():
        problem = label_key_problem(key) or label_value_problem(value)
        if problem is None and key in RESERVED_PEER_KEYS:
            problem = f"{key!r} is reserved (selector, iplist, cidr) and cannot be a label key"
        if problem is not None:
            raise FieldProblem(problem, key=str(key))
        labels[key] = value
    return labels
