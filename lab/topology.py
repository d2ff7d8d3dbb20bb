"""The lab network: one namespace per host, all on one bridge, the operator's console on it.

    root namespace                 bh-lab-sw (switch)                 bh-NAME (one per host)
    bh-lab0 198.18.0.1/24 ──veth── uplink ─┐
            2001:db8::1/64                 br0 ── p-NAME ──veth── eth0 198.18.0.(10+i)/24
                                                                       2001:db8::(10+i)/64

Why the bridge has a namespace of its own: when the br_netfilter module is loaded and
net.bridge.bridge-nf-call-iptables is 1 (Docker and Kubernetes hosts), bridged frames
traverse the *bridge's* namespace's iptables/nftables FORWARD hooks. A bridge in the root
namespace would put lab traffic through the host's own firewall, and the per-bridge
nf_call_iptables option cannot help: the kernel ORs it with the sysctl. The sysctl is per
namespace, so in the switch namespace we turn it off without touching the host's firewall
or its settings. The console stays in the root namespace (bh-lab0), so the controller and
the `bulkhead` CLI reach every host; that traffic is local delivery, not forwarding.

Hosts get no default route: nothing leaves the lab network.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from pathlib import Path

from lab.errors import PlumbingError, StateError
from lab.iproute import ip, ip_json, link_exists, list_netns, netns_exists, write_sysctl
from lab.spec import LAB_NET_V4, LAB_NET_V6, OPS_V4, OPS_V6, HostSpec, host_ipv4, host_ipv6
from lab.state import HostRecord

SWITCH_NS = "bh-lab-sw"  # the '-' keeps it apart from any host namespace (bh-NAME)
UPLINK = "bh-lab0"  # root-namespace end of the console's veth
UPLINK_PEER = "uplink"
BRIDGE = "br0"
HOST_IF = "eth0"
# Set as the alias of `lo` in every namespace we create and of bh-lab0: `down` after a
# crash removes exactly the marked ones, never another tool's bh-* namespace.
MARKER = "bulkhead-lab"
_BRIDGE_NF_SYSCTLS = (
    "net.bridge.bridge-nf-call-iptables",
    "net.bridge.bridge-nf-call-ip6tables",
    "net.bridge.bridge-nf-call-arptables",
)


def preflight(hosts: list[HostSpec]) -> None:
    """Refuse, before changing anything, if our names or addresses are already in use."""
    leftovers = find_lab_namespaces()
    if leftovers or link_exists(UPLINK):
        found = ", ".join([*leftovers, *([UPLINK] if link_exists(UPLINK) else [])])
        raise StateError(
            f"leftovers of an earlier lab exist ({found}); remove them with `bulkhead-lab down`"
        )
    taken = [h.netns for h in hosts if netns_exists(h.netns)]
    if taken:
        raise StateError(
            f"network namespace {', '.join(taken)} already exists and was not made by "
            "bulkhead-lab; choose other host names or remove it (`ip netns del`)"
        )
    for entry in ip_json("addr", "show"):
        for info in entry.get("addr_info", []):
            net = ipaddress.ip_interface(f"{info['local']}/{info['prefixlen']}").network
            lab_net = LAB_NET_V4 if net.version == 4 else LAB_NET_V6
            if net.overlaps(lab_net):
                raise StateError(
                    f"{entry['ifname']} already has {info['local']}/{info['prefixlen']}, "
                    f"which overlaps the lab network {lab_net}; the lab cannot use it"
                )


def host_record(index: int, spec: HostSpec) -> HostRecord:
    return HostRecord(
        name=spec.name,
        netns=spec.netns,
        ipv4=str(host_ipv4(index)),
        ipv6=str(host_ipv6(index)),
        labels=dict(spec.labels),
    )


Created = Callable[[str, str], None]  # (kind "netns" | "link", name)


def build_network(hosts: list[HostRecord], created: Created) -> None:
    """Create switch, console link and hosts; `created(kind, name)` once each namespace or
    link exists, so a failure part-way can remove exactly what was made."""
    _add_netns(SWITCH_NS, created)
    for key in _BRIDGE_NF_SYSCTLS:
        if Path("/proc/sys/" + key.replace(".", "/")).exists():  # only with br_netfilter
            write_sysctl(SWITCH_NS, key, "0")
    ip(
        "link", "add", BRIDGE, "type", "bridge",
        "nf_call_iptables", "0", "nf_call_ip6tables", "0", "nf_call_arptables", "0",
        # Without a multicast querier, snooping can starve IPv6 neighbour discovery.
        "mcast_snooping", "0",
        netns=SWITCH_NS,
    )  # fmt: skip
    ip("link", "set", BRIDGE, "up", netns=SWITCH_NS)

    ip("link", "add", UPLINK, "type", "veth", "peer", "name", UPLINK_PEER, "netns", SWITCH_NS)
    created("link", UPLINK)
    ip("link", "set", UPLINK, "alias", MARKER)
    ip("link", "set", UPLINK_PEER, "master", BRIDGE, "up", netns=SWITCH_NS)
    _enable_ipv6(None, UPLINK)
    ip("addr", "add", f"{OPS_V4}/{LAB_NET_V4.prefixlen}", "dev", UPLINK)
    ip("addr", "add", f"{OPS_V6}/{LAB_NET_V6.prefixlen}", "dev", UPLINK, "nodad")
    ip("link", "set", UPLINK, "up")

    for host in hosts:
        _add_host(host, created)


def _add_host(host: HostRecord, created: Created) -> None:
    _add_netns(host.netns, created)
    port = f"p-{host.name}"
    ip("link", "add", port, "type", "veth", "peer", "name", HOST_IF, "netns", host.netns,
       netns=SWITCH_NS)  # fmt: skip
    ip("link", "set", port, "master", BRIDGE, "up", netns=SWITCH_NS)
    _enable_ipv6(host.netns, HOST_IF)
    ip("addr", "add", f"{host.ipv4}/{LAB_NET_V4.prefixlen}", "dev", HOST_IF, netns=host.netns)
    ip("addr", "add", f"{host.ipv6}/{LAB_NET_V6.prefixlen}", "dev", HOST_IF, "nodad",
       netns=host.netns)  # fmt: skip
    ip("link", "set", HOST_IF, "up", netns=host.netns)


def _add_netns(name: str, created: Created) -> None:
    ip("netns", "add", name)
    created("netns", name)
    ip("link", "set", "dev", "lo", "up", "alias", MARKER, netns=name)


def _enable_ipv6(netns: str | None, ifname: str) -> None:
    # Hosts with IPv6 disabled by default would refuse the address; this touches only our link.
    key = f"net.ipv6.conf.{ifname}.disable_ipv6"
    if netns is None and Path("/proc/sys/" + key.replace(".", "/")).read_text().strip() == "0":
        return
    write_sysctl(netns, key, "0")


def is_lab_netns(name: str) -> bool:
    if name == SWITCH_NS:
        return True
    if not name.startswith("bh-"):
        return False
    try:
        links = ip_json("link", "show", "dev", "lo", netns=name)
    except PlumbingError:
        return False
    return any(link.get("ifalias") == MARKER for link in links)


def find_lab_namespaces() -> list[str]:
    """Every namespace this tool made and has not removed (switch + marked hosts)."""
    return [name for name in list_netns() if is_lab_netns(name)]


def find_bh_namespaces() -> list[str]:
    return [name for name in list_netns() if name.startswith("bh-")]


def find_root_links(*, every_bh: bool) -> list[str]:
    """Root-namespace links of the lab (bh-lab0, or with every_bh any link named bh-*)."""
    found = []
    for link in ip_json("link", "show"):
        name = str(link.get("ifname", ""))
        ours = name == UPLINK or link.get("ifalias") == MARKER
        if name.startswith("bh-") and (ours or every_bh):
            found.append(name)
    return found


def remove_netns(name: str) -> None:
    try:
        ip("netns", "del", name)
    except PlumbingError:
        if netns_exists(name):
            raise


def remove_link(name: str) -> None:
    # Removing a namespace destroys the veth ends in it, and their peers shortly after:
    # a link that vanished meanwhile is removed, not an error.
    try:
        ip("link", "del", "dev", name)
    except PlumbingError:
        if link_exists(name):
            raise
