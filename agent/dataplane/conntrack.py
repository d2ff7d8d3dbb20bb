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
    try:
        # One dump for both families: each dump walks the kernel's whole conntrack hash
        # table (shared by every namespace, 262,144 buckets here: ~10 ms) however few
        # entries this namespace has.
        entries = _dump()
        if not entries:
            return 0
        evaluator = PolicyEvaluator(ruleset, baseline)
        doomed = [
            e for e in entries if not evaluator.is_allowed(_flow(e.tuple_orig), local_addresses)
        ]
        return _delete(doomed)
    except NetlinkError as exc:
        raise DataplaneError(f"conntrack: {exc}") from exc


def _dump() -> list[Any]:
    table = Conntrack(nfgen_family=socket.AF_UNSPEC)
    try:
        # The dump must finish before deleting: pyroute2 cannot interleave the two.
        return list(table.dump_entries())
    finally:
        table.close()


def _delete(entries: Collection[Any]) -> int:
    """Delete ENTRIES (a deletion names the entry's own address family); how many went."""
    tables: dict[int, Conntrack] = {}
    deleted = 0
    try:
        for entry in entries:
            family = entry.tuple_orig.family
            table = tables.get(family)
            if table is None:
                table = tables[family] = Conntrack(nfgen_family=family)
            try:
                table.delete(entry)
            except NetlinkError as exc:
                if exc.code != errno.ENOENT:  # gone on its own meanwhile: nothing to cut
                    raise
                continue
            deleted += 1
    finally:
        for table in tables.values():
            table.close()
    return deleted


def _flow(orig: Any) -> Flow:
    return Flow(
        protocol=int(orig.proto),
        src=str(orig.saddr),
        sport=int(orig.sport or 0),
        dst=str(orig.daddr),
        dport=int(orig.dport or 0),
    )
