"""Who a process is: name, exe, cmdline, user, start time and systemd unit, by pid, cached.

A pid is reused once its process has ended, so the cache is keyed by pid *and* the
process's start time (field 22 of /proc/<pid>/stat, clock ticks since boot, which never
changes for a process): a lookup costs one small read, a new process one psutil query.
"""

from __future__ import annotations

import functools
import pwd
from collections.abc import Callable
from collections.abc import Set as AbstractSet
from typing import Final, TypeVar

import psutil  # type: ignore[import-untyped]  # no types-psutil in the dev set yet

from agent.observe.model import ProcessInfo

PROC: Final = "/proc"
# The unit types a process can run in; slices only group other units.
UNIT_SUFFIXES: Final = (".service", ".scope", ".socket", ".mount", ".swap")
_GONE: Final = (FileNotFoundError, ProcessLookupError, PermissionError)
_STARTTIME_AFTER_COMM: Final = 19  # field 22 of stat, counted from field 3 (after "comm")
_UNIFIED_PREFIX: Final = "0::"  # cgroup v2 line
_SYSTEMD_V1_CONTROLLER: Final = "name=systemd"

T = TypeVar("T")


def systemd_unit(cgroup: str) -> str:
    """The systemd unit a process runs in, from the text of its /proc/<pid>/cgroup: the
    innermost path component that names a unit ("" when none does).

    cgroup v2 has one line "0::/system.slice/nginx.service"; v1 and hybrid hierarchies
    have one line per controller, of which systemd's own ("name=systemd") is the one to
    trust, the unified line of a hybrid set-up before it."""
    unified, systemd, others = [], [], []
    for line in cgroup.splitlines():
        hierarchy, _, path = line.partition(":")
        controllers, colon, path = path.partition(":")
        if not colon:
            continue
        if hierarchy == "0" and not controllers:
            unified.append(path)
        elif _SYSTEMD_V1_CONTROLLER in controllers.split(","):
            systemd.append(path)
        else:
            others.append(path)
    for path in (*unified, *systemd, *others):
        for component in reversed(path.split("/")):
            if component.endswith(UNIT_SUFFIXES):
                return component
    return ""


def start_ticks(pid: int, proc: str = PROC) -> int | None:
    """When the process started, in clock ticks since boot; None if there is no such process."""
    try:
        with open(f"{proc}/{pid}/stat", "rb", buffering=0) as file:
            stat = file.readall()
    except _GONE:
        return None
    # comm (field 2) may hold spaces and parentheses: count the fields after its last ")".
    fields = stat[stat.rfind(b")") + 2 :].split()
    try:
        return int(fields[_STARTTIME_AFTER_COMM])
    except (IndexError, ValueError) as exc:
        raise ValueError(f"{proc}/{pid}/stat: no start time in {stat[:200]!r}") from exc


@functools.lru_cache(maxsize=4096)
def user_name(uid: int) -> str:
    """The login name of a uid, or the number as text when the user database has none."""
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def _or_default(read: Callable[[], T], default: T) -> T:
    # exe needs ptrace access to the process, which an unprivileged agent lacks for
    # other users' processes; a zombie has neither exe nor cmdline.
    try:
        return read()
    except (psutil.AccessDenied, psutil.ZombieProcess):
        return default


def read_unit(pid: int, proc: str = PROC) -> str:
    try:
        with open(f"{proc}/{pid}/cgroup", "rb", buffering=0) as file:
            return systemd_unit(file.readall().decode("utf-8", "replace"))
    except _GONE:
        return ""


def describe_process(pid: int, proc: str = PROC) -> ProcessInfo | None:
    """Everything we report about a process, through psutil; None if it is gone."""
    try:
        process = psutil.Process(pid)
        with process.oneshot():
            name = process.name()
            start_time = process.create_time()
            # The effective uid: whom the process acts as (ps's USER column).
            user = user_name(process.uids().effective)
            exe = _or_default(process.exe, "")
            cmdline: tuple[str, ...] = tuple(_or_default(process.cmdline, []))
    except psutil.NoSuchProcess:  # ended, or a zombie
        return None
    return ProcessInfo(
        pid=pid,
        name=name,
        exe=exe,
        cmdline=cmdline,
        user=user,
        start_time=start_time,
        unit=read_unit(pid, proc),
    )


class ProcessCache:
    """ProcessInfo by pid, asked of `describe` once per process (pid and start time)."""

    def __init__(
        self,
        proc: str = PROC,
        *,
        describe: Callable[[int], ProcessInfo | None] | None = None,
    ) -> None:
        self._proc = proc
        self._describe = (
            describe if describe is not None else functools.partial(describe_process, proc=proc)
        )
        self._known: dict[int, tuple[int, ProcessInfo]] = {}  # pid -> (start ticks, info)

    def __len__(self) -> int:
        return len(self._known)

    def get(self, pid: int) -> ProcessInfo | None:
        """The process now running as `pid`, or None if there is none."""
        ticks = start_ticks(pid, self._proc)
        if ticks is None:
            return None
        known = self._known.get(pid)
        if known is not None and known[0] == ticks:
            return known[1]
        info = self._describe(pid)
        # Ended, or ended and the pid reused, while we asked: what we got is not ticks'.
        if info is None or start_ticks(pid, self._proc) != ticks:
            self._known.pop(pid, None)
            return None
        self._known[pid] = (ticks, info)
        return info

    def retain(self, pids: AbstractSet[int]) -> None:
        """Forget the processes not in `pids` (the ones still running)."""
        for pid in self._known.keys() - pids:
            del self._known[pid]
