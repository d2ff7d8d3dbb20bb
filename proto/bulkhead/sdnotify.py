"""systemd's notify protocol (sd_notify) without libsystemd: one datagram to $NOTIFY_SOCKET.

Shared by the agent and the controller (which never import each other), as the wire
contract is.
"""

from __future__ import annotations

import asyncio
import os
import socket


def notify(message: str) -> bool:
    """Send MESSAGE ("READY=1", ...) to the service manager; False if none listens."""
    path = os.environ.get("NOTIFY_SOCKET", "")
    if path.startswith("@"):
        address = "\0" + path[1:]  # the abstract namespace, spelled with '@'
    elif path.startswith("/"):
        address = path
    else:
        return False  # not started by systemd (or an address family we do not speak)
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto(message.encode(), address)
    except OSError:
        return False
    return True


def _with_status(first: str, status: str | None) -> str:
    return first if status is None else f"{first}\nSTATUS={status}"


def ready(status: str | None = None) -> bool:
    """Tell systemd the service is up (Type=notify units wait for this)."""
    return notify(_with_status("READY=1", status))


def stopping(status: str | None = None) -> bool:
    return notify(_with_status("STOPPING=1", status))


def watchdog_interval() -> float | None:
    """Seconds between WATCHDOG=1 pings (a third of WatchdogSec=), or None without one."""
    pid = os.environ.get("WATCHDOG_PID")
    if pid is not None and pid != str(os.getpid()):
        return None  # the watchdog belongs to another process, e.g. our parent
    try:
        usec = int(os.environ.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    return usec / 3_000_000 if usec > 0 else None


async def feed_watchdog(interval: float) -> None:
    """Ping the watchdog every INTERVAL seconds until cancelled.

    Run on the daemon's own event loop, so a wedged loop stops the pings and systemd
    restarts the daemon.
    """
    while True:
        notify("WATCHDOG=1")
        await asyncio.sleep(interval)


def start_watchdog() -> asyncio.Task[None] | None:
    """A task feeding the watchdog when systemd asked for one, else None."""
    interval = watchdog_interval()
    if interval is None:
        return None
    return asyncio.get_running_loop().create_task(feed_watchdog(interval))
