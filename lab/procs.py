"""Starting, identifying and stopping the lab's background processes.

A bare pid is not an identity (pids are reused), so every process is recorded with its
start time in clock ticks since boot (/proc/PID/stat field 22): the pair is unique for
the life of the machine, and survives the exec of `ip netns exec`.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from lab.errors import DaemonError

_TERM_GRACE = 3.0
_KILL_GRACE = 2.0
_POLL = 0.05
# Popen objects of the processes started here: holding them keeps subprocess from warning
# that they still run; they are reaped by pid in terminate().
_children: list[subprocess.Popen[bytes]] = []


@dataclass(frozen=True)
class Started:
    pid: int
    start_ticks: int


def start_detached(
    argv: list[str],
    log: Path,
    *,
    env: Mapping[str, str] | None = None,
    pass_fds: tuple[int, ...] = (),
    cwd: Path | None = None,
) -> Started:
    """Start ARGV in its own session (outlives this command, immune to its Ctrl-C),
    stdin from /dev/null, stdout and stderr appended to LOG."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as out:
        try:
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env=None if env is None else {**os.environ, **env},
                pass_fds=pass_fds,
                cwd=cwd,
            )
        except OSError as exc:
            raise DaemonError(f"cannot start {argv[0]}: {exc.strerror}") from exc
    _children.append(proc)
    ticks = start_ticks(proc.pid)
    if ticks is None:  # exited already: still record it, it cannot match anyone
        ticks = -1
    return Started(pid=proc.pid, start_ticks=ticks)


def start_ticks(pid: int) -> int | None:
    """Start time of PID in clock ticks since boot, or None if it is gone or a zombie."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may contain spaces and parentheses: split after the last ')'.
    fields = text[text.rindex(")") + 2 :].split()
    if fields[0] in ("Z", "X"):
        return None
    return int(fields[19])


def is_alive(pid: int, ticks: int) -> bool:
    """True if PID is still the very process that was recorded."""
    return start_ticks(pid) == ticks


def cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


def find_processes(match: Callable[[list[str]], bool]) -> list[int]:
    """Pids of processes (other than this one) whose argument list satisfies MATCH."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        argv = cmdline(int(entry.name))
        if argv and match(argv):
            found.append(int(entry.name))
    return found


def terminate(pids: Iterable[int]) -> list[int]:
    """SIGTERM, wait a little, SIGKILL what is left, wait again (bounded). Returns the pids
    that were alive and are now gone."""
    targets = {pid: ticks for pid in set(pids) if (ticks := start_ticks(pid)) is not None}
    for pid in targets:
        _signal(pid, signal.SIGTERM)
    left = wait_gone(targets, _TERM_GRACE)
    for pid in left:
        _signal(pid, signal.SIGKILL)
    left = wait_gone(left, _KILL_GRACE)
    if left:
        raise DaemonError(f"processes {sorted(left)} survived SIGKILL (stuck in the kernel?)")
    return sorted(targets)


def _signal(pid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)


def wait_gone(targets: Mapping[int, int], grace: float) -> dict[int, int]:
    deadline = time.monotonic() + grace
    left = dict(targets)
    while left:
        for pid in list(left):
            _reap(pid)
            if start_ticks(pid) != left[pid]:
                del left[pid]
        if not left or time.monotonic() > deadline:
            break
        time.sleep(_POLL)
    return left


def _reap(pid: int) -> None:
    # Our own children (when the lab runs inside another program, e.g. the tests) would
    # stay zombies until waited for.
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)


def log_tail(log: Path, lines: int = 15) -> str:
    try:
        text = log.read_text(errors="replace")
    except OSError:
        return "(no log)"
    tail = text.rstrip().splitlines()[-lines:]
    return "\n".join(tail) if tail else "(log is empty)"
