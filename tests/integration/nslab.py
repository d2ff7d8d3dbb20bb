"""A small network-namespace lab for integration tests.

Namespaces are named ``bh-t-<tag>-<random>``, hold only 198.18.0.0/15 and 2001:db8::/32
addresses, get no route out, and are always removed (with any process still inside)
when their context manager exits. The test process never enters a namespace: commands
run inside one through ``ip netns exec``.
"""

from __future__ import annotations

import ipaddress
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass

PREFIX = "bh-t-"
PYTHON = sys.executable  # the venv interpreter that runs the tests
COMMAND_TIMEOUT = 60.0
LINK_UP_TIMEOUT = 10.0
_LAB_NETWORKS = (
    ipaddress.ip_network("198.18.0.0/15"),
    ipaddress.ip_network("2001:db8::/32"),
)


def lab_unavailable_reason() -> str | None:
    """Why namespace tests cannot run here, or None if they can."""
    if os.geteuid() != 0:
        return "needs root to create network namespaces"
    for tool in ("ip", "nft"):
        if shutil.which(tool) is None:
            return f"needs the {tool!r} command"
    return None


@dataclass(frozen=True)
class Namespace:
    """A network namespace created by `namespace()`."""

    name: str

    def command(self, argv: Sequence[str]) -> list[str]:
        """argv prefixed to run inside this namespace."""
        return ["ip", "netns", "exec", self.name, *argv]

    def run(
        self,
        argv: Sequence[str],
        *,
        stdin: str | None = None,
        check: bool = True,
        timeout: float = COMMAND_TIMEOUT,
    ) -> subprocess.CompletedProcess[str]:
        """Run argv inside the namespace and wait for it (bounded by timeout)."""
        return subprocess.run(
            self.command(argv),
            input=stdin,
            capture_output=True,
            text=True,
            check=check,
            timeout=timeout,
        )

    def popen(self, argv: Sequence[str]) -> subprocess.Popen[str]:
        """Start argv inside the namespace with text pipes on stdin and stdout."""
        return subprocess.Popen(
            self.command(argv),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            bufsize=1,
        )

    def python(self, code: str, *args: str, timeout: float = COMMAND_TIMEOUT) -> str:
        """Run a Python snippet inside the namespace; return its stdout."""
        return self.run([PYTHON, "-c", code, *args], timeout=timeout).stdout


def _ip(*argv: str) -> None:
    subprocess.run(["ip", *argv], check=True, capture_output=True, text=True, timeout=30)


def _kill_processes_inside(name: str) -> None:
    # Only processes in a namespace this lab created, so only ones a test started.
    listing = subprocess.run(
        ["ip", "netns", "pids", name], check=False, capture_output=True, text=True, timeout=30
    )
    for pid in listing.stdout.split():
        with suppress(ProcessLookupError):
            os.kill(int(pid), signal.SIGKILL)


@contextmanager
def namespace(tag: str) -> Iterator[Namespace]:
    """A fresh namespace with loopback up; removed on exit, even after a failure."""
    name = f"{PREFIX}{tag}-{secrets.token_hex(3)}"
    _ip("netns", "add", name)
    try:
        _ip("-n", name, "link", "set", "lo", "up")
        # Without duplicate address detection, IPv6 (link-local too) works at once.
        subprocess.run(
            ["ip", "netns", "exec", name, "sysctl", "-q", "-w"]
            + [f"net.ipv6.conf.{conf}.accept_dad=0" for conf in ("all", "default")],
            check=True,
            capture_output=True,
            timeout=30,
        )
        yield Namespace(name)
    finally:
        _kill_processes_inside(name)
        _ip("netns", "del", name)


def _check_lab_address(address: str) -> None:
    network = ipaddress.ip_interface(address).network
    if not any(
        network.network_address in lab and network.broadcast_address in lab for lab in _LAB_NETWORKS
    ):
        raise ValueError(f"{address}: lab addresses must be in 198.18.0.0/15 or 2001:db8::/32")


def link(
    left: Namespace,
    right: Namespace,
    left_addresses: Sequence[str],
    right_addresses: Sequence[str],
) -> None:
    """Join two namespaces with a veth pair (veth0 left, veth1 right) and address it.

    Addresses are given with a prefix length ("198.18.0.1/24", "2001:db8::1/64");
    IPv6 ones skip duplicate address detection so they are usable at once.
    """
    for address in (*left_addresses, *right_addresses):
        _check_lab_address(address)
    _ip(
        "-n",
        left.name,
        "link",
        "add",
        "veth0",
        "type",
        "veth",
        "peer",
        "veth1",
        "netns",
        right.name,
    )
    for ns, device, addresses in (
        (left, "veth0", left_addresses),
        (right, "veth1", right_addresses),
    ):
        for address in addresses:
            extra = ["nodad"] if ":" in address else []
            _ip("-n", ns.name, "address", "add", address, "dev", device, *extra)
        _ip("-n", ns.name, "link", "set", device, "up")
    for ns, device in ((left, "veth0"), (right, "veth1")):
        _wait_until_up(ns, device)


def _wait_until_up(ns: Namespace, device: str, timeout: float = LINK_UP_TIMEOUT) -> None:
    # The kernel turns carrier on asynchronously (link watch, up to ~1 s); until then
    # the device drops what it is given, so the first connection would be lost.
    deadline = time.monotonic() + timeout
    while True:
        shown = subprocess.run(
            ["ip", "-n", ns.name, "-j", "link", "show", "dev", device],
            check=True,
            capture_output=True,
            text=True,
            timeout=30,
        )
        if json.loads(shown.stdout)[0].get("operstate") == "UP":
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"{device} in {ns.name} is not up after {timeout} s")
        time.sleep(0.05)
