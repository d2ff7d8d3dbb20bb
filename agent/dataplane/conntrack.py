"""Cut tracked connections that the current policy no longer allows.

The rules accept `ct state established` before any policy rule, so a connection opened
while a policy allowed it would stay open for hours after the policy stopped allowing
it. After applying a ruleset in enforce mode, the agent deletes the conntrack entries of
such flows; their next packet is then judged afresh by the policy rules and dropped.
"""

from __future__ import annotations

import errno
import socket
from collections.abc import Collection
from typing import Any

from pyroute2 import Conntrack
from pyroute2.netlink.exceptions import NetlinkError

from agent.dataplane.backend import DataplaneError
from agent.dataplane.baseline import Baseline
from agent.dataplane.evaluate import Flow, PolicyEvaluator
from bulkhead.v1 import ruleset_pb2


def cut_disallowed(
    ruleset: ruleset_pb2.Ruleset,
    baseline: Baseline,
    local_addresses: Collection[str],
) -> int:
    """Delete the conntrack entries of flows the policy no longer allows; return how many.

    Works on the conntrack table of the calling process's network namespace.
    """
    evaluator = PolicyEvaluator(ruleset, baseline)
    deleted = 0
    for family in (socket.AF_INET, socket.AF_INET6):
        try:
            deleted += _cut_family(family, evaluator, local_addresses)
        except NetlinkError as exc:
            raise DataplaneError(f"conntrack: {exc}") from exc
    return deleted


def _cut_family(family: int, evaluator: PolicyEvaluator, local_addresses: Collection[str]) -> int:
    table = Conntrack(nfgen_family=family)
    try:
        # The dump must finish before deleting: pyroute2 cannot interleave the two.
        entries: list[Any] = list(table.dump_entries())
        deleted = 0
        for entry in entries:
            if evaluator.is_allowed(_flow(entry.tuple_orig), local_addresses):
                continue
            try:
                table.delete(entry)
            except NetlinkError as exc:
                if exc.code != errno.ENOENT:  # gone on its own meanwhile: nothing to cut
                    raise
                continue
            deleted += 1
        return deleted
    finally:
        table.close()


def _flow(orig: Any) -> Flow:
    return Flow(
        protocol=int(orig.proto),
        src=str(orig.saddr),
        sport=int(orig.sport or 0),
        dst=str(orig.daddr),
        dport=int(orig.dport or 0),
    )
