"""Host specifications (`NAME:key=value,...`) and the addresses each lab host gets.

Pure logic, no side effects: parsing errors name the argument and the reason.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field

from lab.errors import SpecError

# The benchmarking range and the documentation range: never routed on the internet.
LAB_NET_V4 = ipaddress.IPv4Network("198.18.0.0/24")
LAB_NET_V6 = ipaddress.IPv6Network("2001:db8::/64")
# The operator's console (root namespace) sits on the lab network at .1 / ::1.
OPS_V4 = ipaddress.IPv4Address("198.18.0.1")
OPS_V6 = ipaddress.IPv6Address("2001:db8::1")
OPS_NAME = "ops"
FIRST_HOST_OCTET = 10
MAX_HOSTS = 254 - FIRST_HOST_OCTET + 1

_NAME = re.compile(r"^[a-z][a-z0-9]{0,9}$")
# Same rules as the controller applies to labels, so a lab host is never refused there.
_LABEL_KEY = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-/]{0,62}$")
_LABEL_VALUE = re.compile(r"^[A-Za-z0-9._-]{1,63}$")
# Keys a policy peer reserves for itself (selector, iplist, cidr) are not label names.
RESERVED_LABEL_KEYS = frozenset({"selector", "iplist", "cidr"})


@dataclass(frozen=True)
class HostSpec:
    """One lab host as the operator asked for it."""

    name: str
    labels: dict[str, str] = field(default_factory=dict)

    @property
    def netns(self) -> str:
        return netns_name(self.name)


def netns_name(host: str) -> str:
    return f"bh-{host}"


def validate_host_name(name: str, *, where: str = "host name") -> str:
    if name == OPS_NAME:
        raise _bad(where, f"'{OPS_NAME}' is reserved for the operator's console")
    if not _NAME.match(name):
        raise _bad(
            where,
            f"'{name}' must be 1-10 characters: a lowercase letter, then lowercase letters "
            "or digits",
        )
    return name


def _bad(where: str, reason: str) -> SpecError:
    return SpecError(f"{where}: {reason}")


def parse_host_spec(text: str) -> HostSpec:
    """`web` or `web:app=web,env=prod` -> HostSpec; SpecError names the part at fault."""
    where = f"--host '{text}'"
    name, sep, label_text = text.partition(":")
    validate_host_name(name, where=f"{where}: host name")
    labels: dict[str, str] = {}
    if sep and not label_text:
        raise _bad(where, "nothing after ':' (give key=value labels or drop the ':')")
    for item in label_text.split(",") if label_text else []:
        key, eq, value = item.partition("=")
        if not eq:
            raise _bad(where, f"label '{item}' is not key=value")
        if not _LABEL_KEY.match(key):
            raise _bad(
                where,
                f"label key '{key}' must start with a letter or digit and use only letters, "
                "digits, '_', '.', '-', '/' (at most 63)",
            )
        if key in RESERVED_LABEL_KEYS:
            raise _bad(where, f"label key '{key}' is reserved by the policy language")
        if not _LABEL_VALUE.match(value):
            raise _bad(
                where,
                f"label {key}: value '{value}' must be 1-63 letters, digits, '_', '.' or '-'",
            )
        if key in labels:
            raise _bad(where, f"label key '{key}' given twice")
        labels[key] = value
    return HostSpec(name=name, labels=labels)


def parse_host_specs(texts: list[str] | tuple[str, ...]) -> list[HostSpec]:
    """Parse every --host; at least one, at most MAX_HOSTS, names unique."""
    hosts = [parse_host_spec(text) for text in texts]
    check_hosts(hosts)
    return hosts


def check_hosts(hosts: list[HostSpec]) -> None:
    """The rules a whole lab's host list must follow (also for hosts built in code)."""
    if not hosts:
        raise _bad("--host", "give at least one host (NAME:key=value,...)")
    if len(hosts) > MAX_HOSTS:
        raise _bad("--host", f"at most {MAX_HOSTS} hosts fit on the lab network")
    seen: set[str] = set()
    for host in hosts:
        validate_host_name(host.name, where="--host")
        if host.name in seen:
            raise _bad("--host", f"host '{host.name}' given twice")
        seen.add(host.name)


def host_ipv4(index: int) -> ipaddress.IPv4Address:
    """Address of the index-th host (0-based): 198.18.0.10, .11, ..."""
    _check_index(index)
    return LAB_NET_V4.network_address + FIRST_HOST_OCTET + index


def host_ipv6(index: int) -> ipaddress.IPv6Address:
    """IPv6 twin of host_ipv4: the last group reads like the IPv4 octet (198.18.0.12 ->
    2001:db8::12), which is easier on operators than the hex of the same number."""
    _check_index(index)
    return ipaddress.IPv6Address(f"{LAB_NET_V6.network_address}{FIRST_HOST_OCTET + index}")


def _check_index(index: int) -> None:
    if not 0 <= index < MAX_HOSTS:
        raise _bad("host index", f"{index} is outside 0..{MAX_HOSTS - 1}")
