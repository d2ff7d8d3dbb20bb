"""Cut tracked connections that the current policy no longer allows.

The rules accept `ct state established` before any policy rule, so a connection opened
while a policy allowed it would stay open for hours after the policy stopped allowing
it. After applying a ruleset in enforce mode, the agent deletes the conntrack entries of
such flows; their next packet is then judged afresh by the policy rules and dropped.

An entry is named by its original tuple and its conntrack zone: one in a zone other
than 0 (`ct zone set`) is deleted only if the deletion names that zone. The messages are
the agent's own (agent/netlink/ctnetlink.py), not pyroute2's: importing pyroute2 costs a
long-running agent about 9 MB.
"""

from __future__ import annotations

import errno
import socket
from collections.abc import Collection
from typing import TYPE_CHECKING

from agent import netlink
from agent.dataplane.backend import DataplaneError
from agent.dataplane.baseline import Baseline
from agent.dataplane.evaluate import Flow, PolicyEvaluator
from agent.netlink import ctnetlink
from bulkhead.v1 import ruleset_pb2

if TYPE_CHECKING:
    from agent.dataplane.conntrack_mirror import ConntrackMirror


def cut_disallowed(
    ruleset: ruleset_pb2.Ruleset,
    baseline: Baseline,
    local_addresses: Collection[str],
    *,
    mirror: ConntrackMirror | None = None,
) -> int:
    """Delete the conntrack entries of flows the policy no longer allows; return how many.

    Works on the conntrack table of the calling process's network namespace, every zone:
    read from MIRROR (agent/dataplane/conntrack_mirror.py) if given, else dumped.
    """
    try:
        with netlink.open_socket(rcvbuf=0) as sock:
            entries = mirror.entries() if mirror is not None else dump_entries(sock)
            if not entries:
                return 0
            evaluator = PolicyEvaluator(ruleset, baseline)
            doomed = [e for e in entries if not evaluator.is_allowed(_flow(e), local_addresses)]
            return _delete(sock, doomed)
    except (OSError, netlink.NetlinkError, netlink.MalformedMessage) as exc:
        raise DataplaneError(f"conntrack: {exc}") from exc


def dump_entries(sock: socket.socket) -> list[ctnetlink.Entry]:
    """Every conntrack entry of this network namespace, of every zone, through SOCK (a
    NETLINK_NETFILTER socket)."""
    # One dump for both families: each dump walks the kernel's whole conntrack hash
    # table (shared by every namespace, 262,144 buckets here: ~10 ms) however few
    # entries this namespace has. Read to its end before deleting: deletions answered
    # in the middle of a dump would be mixed with its messages.
    request = ctnetlink.dump_request(sequence=1)
    return [
        ctnetlink.decode_entry(data, start, end)
        for data, msg_type, start, end in netlink.dump(sock, request, "dump")
        if msg_type == ctnetlink.NEW_TYPE
    ]


def _delete(sock: socket.socket, entries: Collection[ctnetlink.Entry]) -> int:
    """Delete ENTRIES, each named by its tuple and zone; how many went."""
    deleted = 0
    for sequence, entry in enumerate(entries, start=2):
        try:
            netlink.request(sock, ctnetlink.delete_request(entry, sequence), "delete")
        except netlink.NetlinkError as exc:
            if exc.code != errno.ENOENT:  # gone on its own meanwhile: nothing to cut
                raise
            continue
        deleted += 1
    return deleted


def _flow(entry: ctnetlink.Entry) -> Flow:
    orig = entry.orig
    return Flow(
        protocol=orig.protocol, src=orig.src, sport=orig.sport, dst=orig.dst, dport=orig.dport
    )
