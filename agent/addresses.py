"""Discovery of the host's own addresses: an rtnetlink dump (agent/netlink/rtnetlink.py)."""

from __future__ import annotations

from agent import netlink
from agent.netlink import rtnetlink


def discover_addresses() -> list[str]:
    """Every global/site address on the host's interfaces, sorted, deduplicated.

    Raises OSError if no netlink socket can be opened, NetlinkError if the kernel
    refuses or does not finish the dump, MalformedMessage if its answer is broken.
    """
    found = {entry.own for entry in dump_addresses()}
    # Loopback and link-local addresses are never reachable from other workloads.
    reportable = {a for a in found if a and not (a.is_loopback or a.is_link_local)}
    return [str(a) for a in sorted(reportable, key=lambda a: (a.version, str(a)))]


def dump_addresses() -> list[rtnetlink.InterfaceAddress]:
    """Every IPv4 and IPv6 address of every interface, as the kernel lists them."""
    with netlink.open_socket(rcvbuf=0, protocol=netlink.NETLINK_ROUTE) as sock:
        request = rtnetlink.dump_request(sequence=1)
        decoded = (
            rtnetlink.decode_address(data, start, end)
            for data, msg_type, start, end in netlink.dump(sock, request, "address dump")
            if msg_type == rtnetlink.RTM_NEWADDR
        )
        return [entry for entry in decoded if entry is not None]
