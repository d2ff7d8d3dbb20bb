"""Thin wrapper over the `ip` command: one place that runs it and maps failures to errors.

The `ip` tool is used rather than a netlink library because its commands are what an
operator would type to inspect or repair the lab by hand.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

from lab.errors import PlumbingError

NETNS_DIR = Path("/run/netns")
# Every `ip` call is local netlink work; anything slower than this is stuck.
_IP_TIMEOUT = 20.0


def ip_binary() -> str:
    found = shutil.which("ip") or shutil.which("ip", path="/usr/sbin:/sbin")
    if found is None:
        raise PlumbingError("the `ip` command (iproute2) is not installed")
    return found


def ip(*args: str, netns: str | None = None) -> str:
    """Run `ip [-n NETNS] ARGS`; PlumbingError with the command and its message on failure."""
    argv = [ip_binary(), *(["-n", netns] if netns else []), *args]
    try:
        done = subprocess.run(
            argv, capture_output=True, text=True, timeout=_IP_TIMEOUT, check=False
        )
    except subprocess.TimeoutExpired as exc:
        raise PlumbingError(f"`{_show(argv)}` did not finish in {_IP_TIMEOUT:.0f} s") from exc
    if done.returncode != 0:
        reason = done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "failed"
        raise PlumbingError(f"`{_show(argv)}`: {reason}")
    return done.stdout


def ip_json(*args: str, netns: str | None = None) -> list[dict[str, Any]]:
    out = ip("-j", *args, netns=netns).strip()
    if not out:
        return []
    parsed = json.loads(out)
    return parsed if isinstance(parsed, list) else []


def list_netns() -> list[str]:
    """Names of the named network namespaces (the files `ip netns add` creates)."""
    try:
        return sorted(os.listdir(NETNS_DIR))
    except FileNotFoundError:
        return []


def netns_exists(name: str) -> bool:
    return (NETNS_DIR / name).exists()


def netns_pids(name: str) -> list[int]:
    """Processes whose network namespace is NAME (`ip netns pids`)."""
    if not netns_exists(name):
        return []
    return [int(word) for word in ip("netns", "pids", name).split()]


def link_exists(name: str, netns: str | None = None) -> bool:
    try:
        ip("link", "show", "dev", name, netns=netns)
    except PlumbingError:
        return False
    return True


def write_sysctl(netns: str | None, key: str, value: str) -> None:
    """Set a sysctl in NETNS (or the root namespace) through `ip netns exec`'s /proc view."""
    path = "/proc/sys/" + key.replace(".", "/")
    if netns is None:
        Path(path).write_text(value)
        return
    ip("netns", "exec", netns, "sh", "-c", f'echo {value} > "{path}"')


def _show(argv: list[str]) -> str:
    return " ".join(["ip", *argv[1:]])
