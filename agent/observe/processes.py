"""Who a process is: name, exe, cmdline, user, start time and systemd unit, by pid, cached.

A pid is reused once its process has ended, so the cache is keyed by pid *and* the
process's start time (field 22 of /proc/<pid>/stat, clock ticks since boot, which never
changes for a process): a lookup costs one small read, a new process four small reads.
"""

from __future__ import annotations

import functools
import os
import pwd
import sys
import time
from collections.abc import Callable
from collections.abc import Set as AbstractSet
from typing import Final

from agent.observe.model import ProcessInfo

PROC: Final = "/proc"
# The unit types a process can run in; slices only group other units.
UNIT_SUFFIXES: Final = (".service", ".scope", ".socket", ".mount", ".swap")
_GONE: Final = (FileNotFoundError, ProcessLookupError, PermissionError)
_STARTTIME_AFTER_COMM: Final = 19  # field 22 of stat, counted from field 3 (after "comm")
_UNIFIED_PREFIX: Final = "0::"  # cgroup v2 line
_SYSTEMD_V1_CONTROLLER: Final = "name=systemd"
CLOCK_TICKS: Final = os.sysconf("SC_CLK_TCK")
_COMM_LENGTH: Final = 15  # bytes of a name the kernel keeps (TASK_COMM_LEN - 1)
_DELETED: Final = " (deleted)"  # what the kernel appends to the link of a removed file
_BOOT_TIME_TTL: Final = 1.0  # seconds
_READ_SIZE: Final = 65_536
# How psutil decodes what /proc gives (and os.fsdecode does).
_FS_ENCODING: Final = sys.getfilesystemencoding()
_FS_ERRORS: Final = sys.getfilesystemencodeerrors()


def systemd_unit(cgroup: str) -> str:
    """The systemd unit a process runs in, from the text of its /proc/<pid>/cgroup: the
    innermost path component that names a unit ("" when none does).

    cgroup v2 has one line "0::/system.slice/nginx.service"; v1 and hybrid hierarchies
    have one line per controller, of which systemd's own ("name=systemd") is the one to
    trust, the unified line of a hybrid set-up before it."""
    if not any(suffix in cgroup for suffix in UNIT_SUFFIXES):
        return ""  # no unit anywhere (no systemd, a container): nothing to parse
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


def boot_time(proc: str = PROC) -> float:
    """When the system booted, in unix seconds: the btime line of /proc/stat, re-read
    at most once a second (a clock step moves it)."""
    now = time.monotonic()
    cached = _boot_times.get(proc)
    if cached is not None and now - cached[1] < _BOOT_TIME_TTL:
        return cached[0]
    with open(f"{proc}/stat", "rb") as file:
        for line in file:
            if line.startswith(b"btime "):
                value = float(line.split()[1])
                _boot_times[proc] = (value, now)
                return value
    raise ValueError(f"{proc}/stat: no btime line")


_boot_times: dict[str, tuple[float, float]] = {}  # proc -> (boot time, monotonic when read)


def describe_process(pid: int, proc: str = PROC) -> ProcessInfo | None:
    """Everything we report about a process; None if it is gone."""
    described = read_process(pid, proc)
    return None if described is None else described[1]


def read_process(pid: int, proc: str = PROC) -> tuple[int, ProcessInfo] | None:
    """The process running as `pid`: its start ticks and description; None if it is gone.

    Read from /proc/<pid> directly, at a third of what psutil.Process costs, with the
    values psutil gives (its name, exe and cmdline rules are followed here). Every file
    is opened from one /proc/<pid> directory fd, so all of them describe one process even
    if its pid is reused meanwhile."""
    try:
        directory = os.open(f"{proc}/{pid}", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except _GONE:
        return None
    try:
        stat = _read_at(directory, "stat")
        cmdline = _cmdline(_read_at(directory, "cmdline"))
        # The owner of /proc/<pid> is the effective uid (whom the process acts as: ps's
        # USER column), which the kernel keeps so for that very use, while reading it
        # from status, as psutil does, costs ten times as much.
        effective_uid = os.fstat(directory).st_uid
        cgroup = _read_at(directory, "cgroup")
        rpar = stat.rfind(b")")
        fields = stat[rpar + 2 :].split()
        exe = _exe(directory, cmdline, zombie=fields[:1] == [b"Z"])
    except _GONE:
        return None
    finally:
        os.close(directory)
    name = stat[stat.find(b"(") + 1 : rpar].decode(_FS_ENCODING, _FS_ERRORS)
    if len(name) >= _COMM_LENGTH and cmdline:
        # The kernel keeps 15 bytes of a name; psutil takes the program's name from the
        # command line when it starts with them.
        extended = os.path.basename(cmdline[0])
        if extended.startswith(name):
            name = extended
    try:
        ticks = int(fields[_STARTTIME_AFTER_COMM])
    except (IndexError, ValueError) as exc:
        raise ValueError(f"{proc}/{pid}/stat: no start time in {stat[:200]!r}") from exc
    return ticks, ProcessInfo(
        pid=pid,
        name=name,
        exe=exe,
        cmdline=cmdline,
        user=user_name(effective_uid),
        start_time=float(ticks) / CLOCK_TICKS + boot_time(proc),  # as psutil computes it
        unit=systemd_unit(cgroup.decode("utf-8", "replace")),
    )


def _read_at(directory: int, name: str) -> bytes:
    fd = os.open(name, os.O_RDONLY | os.O_CLOEXEC, dir_fd=directory)
    try:
        chunks = []
        while chunk := os.read(fd, _READ_SIZE):
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def _cmdline(raw: bytes) -> tuple[str, ...]:
    """The arguments, split as psutil splits them."""
    # psutil reads the file in text mode, whose universal newlines turn \r into \n.
    data = raw.decode(_FS_ENCODING, _FS_ERRORS)
    if "\r" in data:
        data = data.replace("\r\n", "\n").replace("\r", "\n")
    if not data:  # a zombie or a kernel thread
        return ()
    # Arguments end with a NUL each, but a program that rewrote its command line
    # (setproctitle) may have put spaces between them.
    separator = "\0" if data.endswith("\0") else " "
    arguments = data.removesuffix(separator).split(separator)
    if separator == "\0" and len(arguments) == 1 and " " in data:
        arguments = data.split(" ")
    return tuple(arguments)


def _exe(directory: int, cmdline: tuple[str, ...], *, zombie: bool) -> str:
    """The executable's path, or where psutil guesses it from the command line."""
    try:
        path = os.readlink("exe", dir_fd=directory).split("\0")[0]
    except PermissionError:  # an unprivileged agent may not look at others' processes
        return _guess_exe(cmdline)
    except (FileNotFoundError, ProcessLookupError):  # a zombie, or a kernel thread
        return "" if zombie else _guess_exe(cmdline)
    if path.endswith(_DELETED):
        try:
            os.stat(path)
        except PermissionError:
            return _guess_exe(cmdline)
        except OSError:  # really deleted (or replaced, as by a package upgrade)
            path = path.removesuffix(_DELETED)
    return path or _guess_exe(cmdline)


def _guess_exe(cmdline: tuple[str, ...]) -> str:
    if cmdline:
        exe = cmdline[0]
        if os.path.isabs(exe) and os.path.isfile(exe) and os.access(exe, os.X_OK):
            return exe
    return ""


class ProcessCache:
    """ProcessInfo by pid, asked of `describe` once per process (pid and start time);
    read_process() when no `describe` is given."""

    def __init__(
        self,
        proc: str = PROC,
        *,
        describe: Callable[[int], ProcessInfo | None] | None = None,
    ) -> None:
        self._proc = proc
        self._read: Callable[[int], tuple[int, ProcessInfo] | None] = (
            functools.partial(read_process, proc=proc)
            if describe is None
            else functools.partial(self._read_between_ticks, describe)
        )
        self._known: dict[int, tuple[int, ProcessInfo]] = {}  # pid -> (start ticks, info)

    def __len__(self) -> int:
        return len(self._known)

    def get(self, pid: int) -> ProcessInfo | None:
        """The process now running as `pid`, or None if there is none."""
        known = self._known.get(pid)
        if known is not None:
            ticks = start_ticks(pid, self._proc)
            if ticks == known[0]:
                return known[1]
            if ticks is None:
                del self._known[pid]
                return None
        described = self._read(pid)
        if described is None:
            self._known.pop(pid, None)
            return None
        self._known[pid] = described
        return described[1]

    def _read_between_ticks(
        self, describe: Callable[[int], ProcessInfo | None], pid: int
    ) -> tuple[int, ProcessInfo] | None:
        # `describe` asks by pid: the process may end, and its pid be reused, meanwhile.
        ticks = start_ticks(pid, self._proc)
        if ticks is None:
            return None
        info = describe(pid)
        if info is None or start_ticks(pid, self._proc) != ticks:
            return None
        return ticks, info

    def retain(self, pids: AbstractSet[int]) -> None:
        """Forget the processes not in `pids` (the ones still running)."""
        for pid in self._known.keys() - pids:
            del self._known[pid]
