"""Interface addresses in rtnetlink messages: the dump request and its answers.

Layouts from <linux/if_addr.h>: a message is a struct ifaddrmsg {u8 family, prefixlen,
flags, scope; u32 index} (host byte order), then attributes; IFA_ADDRESS and IFA_LOCAL
hold the address bytes (4 or 16). On a point-to-point link IFA_ADDRESS is the far end
and IFA_LOCAL ours; elsewhere both are ours, and IPv6 addresses usually carry
IFA_ADDRESS only.
"""

from __future__ import annotations

import ipaddress
import socket
import struct
from dataclasses import dataclass

from agent import netlink
from agent.netlink import MalformedMessage

RTM_NEWADDR = 20
RTM_GETADDR = 22
IFA_ADDRESS = 1
IFA_LOCAL = 2

IFADDRMSG = struct.Struct("=BBBBI")  # family, prefix length, flags, scope, interface index
_FAMILIES = {socket.AF_INET: 4, socket.AF_INET6: 6}

Address = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True, slots=True)
class InterfaceAddress:
    """One address of one interface, as the kernel lists it."""

    index: int  # the interface's
    prefixlen: int
    address: Address | None  # IFA_ADDRESS: the far end on a point-to-point link
    local: Address | None  # IFA_LOCAL: ours, where the kernel distinguishes

    @property
    def own(self) -> Address | None:
        """This host's address: IFA_LOCAL where there is one."""
        return self.local or self.address


def dump_request(sequence: int) -> bytes:
    """A dump of every address of every interface, of both families at once."""
    payload = IFADDRMSG.pack(socket.AF_UNSPEC, 0, 0, 0, 0)
    return netlink.message(
        RTM_GETADDR,
        flags=netlink.NLM_F_REQUEST | netlink.NLM_F_DUMP,
        sequence=sequence,
        payload=payload,
    )


def decode_address(data: bytes, start: int, end: int) -> InterfaceAddress | None:
    """The address in one RTM_NEWADDR payload (START to END), None if it is not IP."""
    if end - start < IFADDRMSG.size:
        raise MalformedMessage("no ifaddrmsg header")
    family, prefixlen, _flags, _scope, index = IFADDRMSG.unpack_from(data, start)
    if family not in _FAMILIES:
        return None
    found = netlink.attributes(data, start + IFADDRMSG.size, end)
    try:
        return InterfaceAddress(
            index=index,
            prefixlen=prefixlen,
            address=_address(found.get(IFA_ADDRESS)),
            local=_address(found.get(IFA_LOCAL)),
        )
    except ValueError as exc:  # not 4 or 16 bytes
        raise MalformedMessage(str(exc)) from exc


def _address(packed: bytes | None) -> Address | None:
    return ipaddress.ip_address(packed) if packed else None
