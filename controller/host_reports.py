"""Bounds on what a host says about itself: hello, address updates, config changes and the
hostname it enrolls with.

A message beyond a bound is refused whole, with every problem named, and changes nothing:
the caps keep one host from growing everyone's rulesets, the controller's memory or the
operator's listings (a hello with 268,949 addresses grew a peer's ruleset to 8.1 MB; one
with 150,000 labels made `get agents` 600 times slower).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from bulkhead.v1 import agent_pb2
from bulkhead.v1.contract import AGENT_ID_RULE, is_valid_agent_id
from controller.address_claims import DEFAULT_MAX_AGENT_ADDRESSES, classify
from controller.policy.names import label_key_problem, label_value_problem

DEFAULT_MAX_AGENT_LABELS = 64
MAX_REVISION = 2**63 - 1  # revisions are SQLite integers
HOSTNAME_MAX = 253  # a DNS name's limit
HOSTNAME_RULE = f"at most {HOSTNAME_MAX} letters, digits, '.', '-' and '_'"
_HOSTNAME = re.compile(r"[A-Za-z0-9._-]*")
# A ruleset hash is sha256 in lowercase hex (contract.ruleset_hash); "" for none.
_RULESET_HASH = re.compile(r"(?:[0-9a-f]{64})?")
# The baseline a hello reports is shown to operators, never compiled: bounded all the same.
BASELINE_PORTS_MAX = 64
BASELINE_TEXT_MAX = 300
AGENT_VERSION_MAX = 64
ERROR_TEXT_MAX = 1000  # characters of an agent's apply error kept and logged


@dataclass(frozen=True)
class HostLimits:
    max_addresses: int = DEFAULT_MAX_AGENT_ADDRESSES
    max_labels: int = DEFAULT_MAX_AGENT_LABELS


DEFAULT_HOST_LIMITS = HostLimits()


def hostname_problem(hostname: str, field: str) -> str | None:
    """Why HOSTNAME may not be stored and shown to operators, or None."""
    if len(hostname) > HOSTNAME_MAX or not _HOSTNAME.fullmatch(hostname):
        return f"{field}: {_shown(hostname)} is not a hostname ({HOSTNAME_RULE})"
    return None


def address_problems(addresses: Sequence[str], field: str, limits: HostLimits) -> list[str]:
    """Problems that refuse a whole address report: too many, or not addresses at all.
    (Addresses of the wrong kind, outside the allowed ranges or held by another agent are
    refused one by one: controller/address_claims.py.)"""
    if len(addresses) > limits.max_addresses:
        return [
            f"{field}: {len(addresses)} addresses; an agent may report at most "
            f"{limits.max_addresses} (controller option --max-agent-addresses)"
        ]
    problems = []
    for index, text in enumerate(addresses):
        try:
            classify(text)
        except ValueError:
            problems.append(f"{field}[{index}]: {_shown(text)} is not an IP address")
    return problems


def label_problems(labels: Mapping[str, str], field: str, max_labels: int) -> list[str]:
    if len(labels) > max_labels:
        return [f"{field}: {len(labels)} labels; at most {max_labels}"]
    problems = []
    for key, value in labels.items():
        if problem := label_key_problem(key):
            problems.append(f"{field}: {_shown_problem(problem)}")
        elif problem := label_value_problem(value):
            problems.append(f"{field}.{key}: {_shown_problem(problem)}")
    return problems


def hello_problems(hello: agent_pb2.Hello, limits: HostLimits) -> list[str]:
    problems = []
    if not is_valid_agent_id(hello.agent_id):
        problems.append(f"hello.agent_id: {_shown(hello.agent_id)} must be {AGENT_ID_RULE}")
    problems += label_problems(hello.labels, "hello.labels", limits.max_labels)
    problems += address_problems(hello.addresses, "hello.addresses", limits)
    if hello.applied_revision > MAX_REVISION:
        problems.append(
            f"hello.applied_revision: {hello.applied_revision} is beyond {MAX_REVISION}"
        )
    if problem := hostname_problem(hello.hostname, "hello.hostname"):
        problems.append(problem)
    problems += ruleset_hash_problems(hello.applied_hash, "hello.applied_hash")
    problems += _baseline_problems(hello)
    return problems[:20]  # enough to act on; the rest would only flood the log


def ruleset_hash_problems(text: str, field: str) -> list[str]:
    if _RULESET_HASH.fullmatch(text):
        return []
    return [f"{field}: {_shown(text)} is not a ruleset hash (64 lowercase hex digits)"]


def _baseline_problems(hello: agent_pb2.Hello) -> list[str]:
    baseline, problems = hello.baseline, []
    for name in ("failsafe_inbound", "failsafe_outbound"):
        ports = getattr(baseline, name)
        if len(ports) > BASELINE_PORTS_MAX or any(len(p) > BASELINE_TEXT_MAX for p in ports):
            problems.append(
                f"hello.baseline.{name}: at most {BASELINE_PORTS_MAX} entries of at most "
                f"{BASELINE_TEXT_MAX} characters"
            )
    for name in ("controller", "dataplane"):
        if len(getattr(baseline, name)) > BASELINE_TEXT_MAX:
            problems.append(f"hello.baseline.{name}: longer than {BASELINE_TEXT_MAX} characters")
    if len(hello.agent_version) > AGENT_VERSION_MAX:
        problems.append(f"hello.agent_version: longer than {AGENT_VERSION_MAX} characters")
    return problems


def _shown(text: str) -> str:
    """TEXT quoted for a message: escaped, and cut to a readable length."""
    quoted = repr(text)
    return quoted if len(quoted) <= 80 else quoted[:77] + "..."


def _shown_problem(problem: str) -> str:
    return problem if len(problem) <= 200 else problem[:197] + "..."
