"""What a simulated fleet looks like: agent ids, labels from patterns, fake addresses.

Agent i of a fleet is `<prefix>-<i:06d>`, carries for each label pattern the value at
i modulo the number of values, and has the address 198.18.0.0 + i + 1 (the benchmarking
range, so nothing real is ever named).
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

from bulkhead.v1.contract import AGENT_ID_RULE, is_valid_agent_id
from controller.policy.names import RESERVED_PEER_KEYS, label_key_problem, label_value_problem
from controller.sim.errors import SimError

# 198.18.0.0/15 minus its network and broadcast addresses.
MAX_AGENTS = 2**17 - 2
MAX_PATTERN_VALUES = 100_000
_FIRST_ADDRESS = ipaddress.IPv4Address("198.18.0.0")
_RANGE = re.compile(r"\{(\d+)\.\.(\d+)\}")


@dataclass(frozen=True)
class LabelPattern:
    """One label key and the values it cycles through across the fleet."""

    key: str
    values: tuple[str, ...]

    def value_for(self, index: int) -> str:
        return self.values[index % len(self.values)]


def parse_label_pattern(text: str, option: str = "--labels-from") -> LabelPattern:
    """`KEY=VALUE` where VALUE may hold one `{FIRST..LAST}` range: `app=app{0..9}` gives
    app0 ... app9. SimError naming OPTION and the problem otherwise."""
    key, sep, template = text.partition("=")
    if not sep:
        raise SimError(f"{option} {text!r}: expected KEY=VALUE, e.g. app=app{{0..9}}")
    if problem := label_key_problem(key):
        raise SimError(f"{option} {text!r}: {problem}")
    if key in RESERVED_PEER_KEYS:
        raise SimError(f"{option} {text!r}: {key!r} is reserved in policies, not a label key")
    ranges = list(_RANGE.finditer(template))
    if len(ranges) > 1:
        raise SimError(f"{option} {text!r}: at most one {{FIRST..LAST}} range per pattern")
    head, tail = (template, "") if not ranges else _around(template, ranges[0])
    if any(brace in head + tail for brace in "{}"):
        raise SimError(f"{option} {text!r}: a range is written {{FIRST..LAST}}, e.g. {{0..9}}")
    if not ranges:
        values: tuple[str, ...] = (template,)
    else:
        first, last = int(ranges[0].group(1)), int(ranges[0].group(2))
        if first > last:
            raise SimError(f"{option} {text!r}: range {ranges[0].group(0)} runs backwards")
        if last - first + 1 > MAX_PATTERN_VALUES:
            raise SimError(
                f"{option} {text!r}: range {ranges[0].group(0)} has more than "
                f"{MAX_PATTERN_VALUES} values"
            )
        values = tuple(f"{head}{n}{tail}" for n in range(first, last + 1))
    # The longest value is the one that can break the length limit.
    longest = max(values, key=len)
    if problem := label_value_problem(longest):
        raise SimError(f"{option} {text!r}: {problem}")
    return LabelPattern(key, values)


def _around(template: str, match: re.Match[str]) -> tuple[str, str]:
    return template[: match.start()], template[match.end() :]


@dataclass(frozen=True)
class FleetSpec:
    """N simulated agents: their ids, labels and addresses, derived from their index."""

    count: int
    id_prefix: str = "sim"
    labels: tuple[LabelPattern, ...] = ()

    def __post_init__(self) -> None:
        if not 0 < self.count <= MAX_AGENTS:
            raise SimError(
                f"--agents: {self.count} must be between 1 and {MAX_AGENTS} "
                "(one address each from 198.18.0.0/15)"
            )
        keys = [pattern.key for pattern in self.labels]
        if len(set(keys)) != len(keys):
            raise SimError(f"--labels-from: a label key is given twice ({', '.join(keys)})")
        if not is_valid_agent_id(self.agent_id(0)):
            raise SimError(f"--id-prefix {self.id_prefix!r}: agent ids must be {AGENT_ID_RULE}")

    def agent_id(self, index: int) -> str:
        return f"{self.id_prefix}-{index:06d}"

    def labels_for(self, index: int) -> dict[str, str]:
        return {pattern.key: pattern.value_for(index) for pattern in self.labels}

    def address_for(self, index: int) -> str:
        return str(_FIRST_ADDRESS + index + 1)

    def agent_ids(self) -> list[str]:
        return [self.agent_id(index) for index in range(self.count)]
