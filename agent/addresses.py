"""Discovery of the host's own addresses through netlink (pyroute2)."""

from __future__ import annotations

import ipaddress

from pyroute2 import IPRoute


def _reportable(text: str) -> bool:
    # Loopback and link-local addresses are never reachable from other workloads.
    address = ipaddress.ip_address(text)
    return not (address.is_loopback or address.is_link_local)


def discover_addresses() -> list[str]:
    """Every global/site address on the host's interfaces, sorted, deduplicated."""
    found: set[str] = set()
    with IPRoute() as ipr:
        for message in ipr.get_addr():
            # On point-to-point links IFA_ADDRESS is the far end; IFA_LOCAL is ours.
            text = message.get_attr("IFA_LOCAL") or message.get_attr("IFA_ADDRESS")
            if text and _reportable(text):
                found.add(str(ipaddress.ip_address(text)))
    return sorted(found, key=lambda a: (ipaddress.ip_address(a).version, a))
