"""Connectivity probes between lab hosts, from inside the source host's namespace.

The socket is created by a short-lived thread that first joins the source namespace
(setns applies to the calling thread only), so a probe costs no process start and the
rest of the program stays in its own namespace. `ops` is the operator's console: the root
namespace, 198.18.0.1 / 2001:db8::1 on the lab network.
"""

from __future__ import annotations

import ctypes
import ipaddress
import json
import os
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from lab.errors import PlumbingError, SpecError
from lab.iproute import NETNS_DIR
from lab.spec import OPS_NAME, OPS_V4, OPS_V6
from lab.state import LabState, lab_dir, load_state
from lab.topology import UPLINK

_CLONE_NEWNET = 0x40000000
_BANNER_BYTES = 256
MAX_TIMEOUT = 30.0
DEFAULT_TIMEOUT = 1.0
_T = TypeVar("_T")


@dataclass(frozen=True)
class ProbeResult:
    connected: bool
    reason: str  # "ok", "timed out", "connection refused", ...
    banner: str = ""


def _join_netns(netns: str) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(NETNS_DIR / netns, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if libc.setns(fd, _CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise PlumbingError(f"cannot enter namespace {netns}: {os.strerror(err)}")
    finally:
        os.close(fd)


def in_netns(netns: str | None, work: Callable[[], _T]) -> _T:
    """Run WORK in NETNS (None: here). Sockets it creates stay in that namespace."""
    if netns is None:
        return work()
    results: list[_T] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            _join_netns(netns)
            results.append(work())
        except BaseException as exc:  # re-raised in the caller's thread
            errors.append(exc)

    # A fresh thread per probe: its namespace dies with it, none leaks into a pool.
    thread = threading.Thread(target=run, name=f"probe-{netns}", daemon=True)
    thread.start()
    thread.join()
    if errors:
        raise errors[0]
    return results[0]


def _check_timeout(timeout: float) -> None:
    if not 0 < timeout <= MAX_TIMEOUT:
        raise SpecError(f"--timeout: {timeout} must be above 0 and at most {MAX_TIMEOUT:.0f} s")


def require_lab_route(address: str) -> None:
    """Refuse to send from the root namespace unless ADDRESS is reached through the lab's
    uplink. Without the lab (or with its uplink down) the machine's default route would
    carry lab addresses off the machine, and test traffic must never leave it."""
    try:
        done = subprocess.run(
            ["ip", "-j", "route", "get", address], capture_output=True, text=True, timeout=5,
            check=False,
        )  # fmt: skip
        routes = json.loads(done.stdout or "[]")
    except (OSError, subprocess.TimeoutExpired, json.JSONDecodeError) as exc:
        raise PlumbingError(f"cannot check the route to {address}: {exc}") from exc
    device = routes[0].get("dev") if routes else None
    if device != UPLINK:
        raise PlumbingError(
            f"refusing to probe {address} from the root namespace: it would go out via "
            f"{device or 'no route'}, not the lab's {UPLINK} (is the lab up?)"
        )


def probe_tcp_address(
    netns: str | None, address: str, port: int, *, timeout: float = DEFAULT_TIMEOUT
) -> ProbeResult:
    """Connect from NETNS (None: the root namespace) to ADDRESS:PORT within TIMEOUT."""
    _check_timeout(timeout)
    family = socket.AF_INET6 if ipaddress.ip_address(address).version == 6 else socket.AF_INET

    def connect() -> socket.socket:
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        return sock

    if netns is None:
        require_lab_route(address)
    sock = in_netns(netns, connect)
    deadline = time.monotonic() + timeout
    with sock:
        try:
            sock.connect((address, port))
        except TimeoutError:
            return ProbeResult(False, "timed out")
        except OSError as exc:
            return ProbeResult(False, (exc.strerror or str(exc)).lower())
        # The listener's one-line answer says who accepted; its absence changes nothing.
        sock.settimeout(max(0.05, min(0.5, deadline - time.monotonic())))
        try:
            banner = sock.recv(_BANNER_BYTES).decode(errors="replace").strip()
        except OSError:
            banner = ""
    return ProbeResult(True, "ok", banner)


def probe_udp_address(
    netns: str | None, address: str, port: int, *, timeout: float = DEFAULT_TIMEOUT
) -> ProbeResult:
    """Send one datagram from NETNS to ADDRESS:PORT; connected if an answer comes back."""
    _check_timeout(timeout)
    family = socket.AF_INET6 if ipaddress.ip_address(address).version == 6 else socket.AF_INET

    def open_socket() -> socket.socket:
        sock = socket.socket(family, socket.SOCK_DGRAM)
        sock.settimeout(timeout)
        return sock

    if netns is None:
        require_lab_route(address)
    with in_netns(netns, open_socket) as sock:
        try:
            sock.connect((address, port))
            sock.send(b"probe\n")
            answer = sock.recv(_BANNER_BYTES)
        except TimeoutError:
            return ProbeResult(False, "no answer")
        except OSError as exc:
            return ProbeResult(False, (exc.strerror or str(exc)).lower())
    return ProbeResult(True, "ok", answer.decode(errors="replace").strip())


def host_address(state: LabState, name: str, *, ipv6: bool) -> str:
    """Address of a lab host, or of the console for `ops`."""
    if name == OPS_NAME:
        return str(OPS_V6 if ipv6 else OPS_V4)
    host = state.host(name)
    return host.ipv6 if ipv6 else host.ipv4


def host_netns(state: LabState, name: str) -> str | None:
    return None if name == OPS_NAME else state.host(name).netns


def probe_hosts(
    state: LabState,
    source: str,
    target: str,
    port: int,
    *,
    ipv6: bool = False,
    udp: bool = False,
    timeout: float = DEFAULT_TIMEOUT,
) -> ProbeResult:
    """Probe from lab host SOURCE (or `ops`) to lab host TARGET (or `ops`) on PORT."""
    if not 0 < port < 65536:
        raise SpecError(f"PORT: {port} is not between 1 and 65535")
    netns = host_netns(state, source)
    address = host_address(state, target, ipv6=ipv6)
    probe = probe_udp_address if udp else probe_tcp_address
    return probe(netns, address, port, timeout=timeout)


def tcp_probe(
    source: str,
    target: str,
    port: int,
    *,
    ipv6: bool = False,
    timeout: float = DEFAULT_TIMEOUT,
    directory: Path | None = None,
) -> bool:
    """True if SOURCE can open a TCP connection to TARGET:PORT (names of the running lab,
    or `ops`); the lab is read from DIRECTORY (default: the lab directory)."""
    state = load_state(directory or lab_dir())
    return probe_hosts(state, source, target, port, ipv6=ipv6, timeout=timeout).connected
