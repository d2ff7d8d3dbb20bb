"""Which process holds each socket: socket inode -> pid, from the /proc/<pid>/fd links.

A full scan (every fd of every process, one readlink each) is what psutil does on every
call, and it costs about as much as the rest of a snapshot together. So this map is kept
between calls and refreshed lazily, driven by the socket table:

* an inode of the table whose owner is known, in a process still alive, keeps its owner:
  no fd is read at all when nothing changed (the steady state);
* an inode that is not known is searched for, cheapest and likeliest places first, and
  the search stops as soon as every unknown inode is found: (1) the fds whose socket
  has just left the table (the kernel hands out the lowest free fd number, so a closed
  socket's fd is the usual home of the next one), (2) processes not seen before, (3) fds
  new to the processes we know, busiest processes first, (4) fds already read that hold
  it (a shared socket whose recorded owner went away), (5) fds that held something else
  when last read, since an fd number can be closed and reused between two refreshes;
* an inode still unknown after that belongs to no process we can see (another pid
  namespace, hidden /proc, a socket in flight): it is not searched for again while it
  stays in the table.

A recorded owner can go stale only when a socket shared by several processes (fork,
SCM_RIGHTS) is closed by the one recorded while another keeps it; a full rescan every
`rescan_interval` seconds bounds that. Processes come and go during a scan: a pid or fd
that vanishes, or that we may not read, is skipped.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable, Mapping
from collections.abc import Set as AbstractSet
from typing import Final

PROC: Final = "/proc"
RESCAN_INTERVAL: Final = 60.0  # seconds between full scans: bounds a stale shared-socket owner
NOT_A_SOCKET: Final = 0  # what the map records for an fd that is no socket
_GONE: Final = (FileNotFoundError, ProcessLookupError, PermissionError)
_FD_GONE: Final = (*_GONE, NotADirectoryError)
_SOCKET_PREFIX: Final = "socket:["
_INIT: Final = 1


def _link_inode(name: str, directory: int) -> int | None:
    """The socket inode an fd (by name, in an open fd directory) points at, NOT_A_SOCKET
    for any other file, None if the fd is gone."""
    try:
        target = os.readlink(name, dir_fd=directory)
    except _FD_GONE:
        return None
    if target.startswith(_SOCKET_PREFIX):
        return int(target[len(_SOCKET_PREFIX) : -1])
    return NOT_A_SOCKET


def _preferred(current: int, candidate: int) -> bool:
    """Whether a second holder of a shared socket names it better than the first: not
    pid 1 (systemd passes activated sockets on), else the lower pid (a pre-forking
    server's parent)."""
    if (current == _INIT) != (candidate == _INIT):
        return current == _INIT
    return candidate < current


def open_fd_dir(proc: str, pid: int) -> int | None:
    """An fd of /proc/<pid>/fd, None if the process is gone (or hidden from us)."""
    try:
        return os.open(f"{proc}/{pid}/fd", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except _FD_GONE:
        return None


def read_all_fds(proc: str, pid: int) -> dict[str, int] | None:
    """fd name -> socket inode (NOT_A_SOCKET for other files) of every fd of a process;
    None if it is gone."""
    directory = open_fd_dir(proc, pid)
    if directory is None:
        return None
    try:
        fds = {}
        readlink = os.readlink  # _link_inode inlined: a full scan reads every fd
        for name in os.listdir(directory):
            try:
                target = readlink(name, dir_fd=directory)
            except _FD_GONE:
                continue
            if target.startswith(_SOCKET_PREFIX):
                fds[name] = int(target[len(_SOCKET_PREFIX) : -1])
            else:
                fds[name] = NOT_A_SOCKET
        return fds
    except _GONE:
        return None
    finally:
        os.close(directory)


class FdScan:
    """Every fd of every process alive when it started, read by whichever threads call
    run() (no table needed: it can run while the table is read). Each process is read by
    one thread only."""

    def __init__(self, proc: str, live: frozenset[int], started: float) -> None:
        self.live = live
        self.started = started  # clock time
        self._proc = proc
        # A list iterator: next() is one step under the GIL, so threads sharing it never
        # get the same pid (a generator would raise "already executing").
        self._queue = iter(sorted(live))
        self._fds: dict[int, dict[str, int]] = {}

    def run(self) -> None:
        """Read the processes no thread has taken yet, until none is left."""
        proc, fds = self._proc, self._fds
        for pid in self._queue:
            read = read_all_fds(proc, pid)
            if read is not None:
                fds[pid] = read

    def fds(self) -> dict[int, dict[str, int]]:
        """pid -> {fd name: inode or NOT_A_SOCKET}, by pid (whichever thread read it)."""
        return dict(sorted(self._fds.items()))


def _least_preferred_first(pids: Iterable[int]) -> list[int]:
    """Pids in the reverse of _preferred's order: init, then the others from the highest."""
    ordered = sorted(pids, reverse=True)
    if ordered and ordered[-1] == _INIT:
        ordered.insert(0, ordered.pop())
    return ordered


class SocketOwners:
    """Socket inode -> (pid, fd) for the sockets of a socket table, kept between refreshes."""

    def __init__(
        self,
        proc: str = PROC,
        *,
        rescan_interval: float = RESCAN_INTERVAL,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._proc = proc
        self._rescan_interval = rescan_interval
        self._clock = clock
        self._fds: dict[int, dict[str, int]] = {}  # pid -> {fd name: inode or NOT_A_SOCKET}
        self._owners: dict[int, tuple[int, str]] = {}  # inode -> (pid, fd name)
        self._orphans: set[int] = set()  # table inodes no visible process holds
        self._busy: dict[int, int] = {}  # pid -> refresh number when a socket was last found
        self._refreshes = 0
        self._table: AbstractSet[int] = frozenset()
        self._last_full: float | None = None
        self._live: frozenset[int] = frozenset()

    @property
    def live_pids(self) -> frozenset[int]:
        """The processes that existed at the last refresh."""
        return self._live

    def owner(self, inode: int) -> int | None:
        entry = self._owners.get(inode)
        return None if entry is None else entry[0]

    def pids(self, inodes: Iterable[int]) -> list[int | None]:
        """The owner of each of these inodes (None where it is not known), in order."""
        return [None if entry is None else entry[0] for entry in map(self._owners.get, inodes)]

    def owners(self) -> dict[int, int]:
        """inode -> pid for every socket whose owner is known."""
        return {inode: pid for inode, (pid, _) in self._owners.items()}

    def refresh(self, table: AbstractSet[int], *, scan: FdScan | None = None) -> set[int]:
        """Bring the map up to date for the inodes of the socket table just read; return
        the inodes of the table whose owner was found, lost or changed.

        With a `scan` (of start_full_scan(), run while the table was read), this is a
        full scan from what that read."""
        self._refreshes += 1
        if scan is not None:
            changed = self._full_scan(table, scan)
            # The fds were read beside the table, not after it: a socket made meanwhile
            # may be on an fd read before it existed. Looked for as any new socket is.
            if self._orphans:
                self._orphans = set()
                self._live = self._list_pids()
                for pid in self._fds.keys() - self._live:
                    self._forget_pid(pid, table, changed)
                self._search(set(table - self._owners.keys()), [], changed)
            return changed
        if self.full_scan_due():
            scan = self.start_full_scan()
            scan.run()
            return self._full_scan(table, scan)
        changed = set()
        self._live = self._list_pids()
        for pid in self._fds.keys() - self._live:
            self._forget_pid(pid, table, changed)
        same_table = table is self._table or table == self._table
        if same_table and not changed:
            # Every inode of this table was owned or given up on by the last refresh,
            # and no owner has gone since: nothing to look for.
            return changed
        suspects: list[tuple[int, str]] = []
        if not same_table:
            for inode in self._owners.keys() - table:
                suspects.append(self._owners.pop(inode))
            self._orphans &= table
            self._table = table
        unknown = table - self._owners.keys() - self._orphans
        if unknown:
            self._search(unknown, suspects, changed)
        return changed

    def full_scan_due(self) -> bool:
        """Whether the next refresh() reads every fd of every process."""
        return self._last_full is None or self._clock() - self._last_full >= self._rescan_interval

    def start_full_scan(self) -> FdScan:
        """A full scan to run (FdScan.run(), on as many threads as wanted) and then give
        to refresh(); one dropped unused changes nothing."""
        return FdScan(self._proc, self._list_pids(), self._clock())

    # -- reading /proc ------------------------------------------------------------------

    def _list_pids(self) -> frozenset[int]:
        return frozenset(int(name) for name in os.listdir(self._proc) if name.isdigit())

    def _open_fd_dir(self, pid: int) -> int | None:
        return open_fd_dir(self._proc, pid)

    # -- the full scan ------------------------------------------------------------------

    def _full_scan(self, table: AbstractSet[int], scan: FdScan) -> set[int]:
        before = self._owners
        self._last_full = scan.started
        self._live = scan.live
        self._fds = scan.fds()
        owners: dict[int, tuple[int, str]] = {}
        # The preferred holder of a shared socket is written last (see _preferred).
        for pid in _least_preferred_first(self._fds):
            owners.update(
                {inode: (pid, name) for name, inode in self._fds[pid].items() if inode in table}
            )
        self._owners = owners
        self._table = table
        self._orphans = set(table - owners.keys())
        self._busy = {pid: busy for pid, busy in self._busy.items() if pid in self._fds}
        if not before:  # the first scan: every owner found is news
            return set(owners)
        # The sockets whose (inode, pid) pair came or went.
        was = {inode: pid for inode, (pid, _) in before.items()}
        return {inode for inode, _ in was.items() ^ self.owners().items()}.intersection(table)

    # -- the search for unknown inodes --------------------------------------------------

    def _search(
        self, unknown: set[int], suspects: list[tuple[int, str]], changed: set[int]
    ) -> None:
        # In the order of the module docstring; each step stops once nothing is unknown.
        self._relink(suspects, unknown, changed)
        if unknown:
            self._read_new_processes(unknown, changed)
        if unknown:
            self._read_new_fds(unknown, changed)
        if unknown:
            self._match_known_fds(unknown, changed)
        if unknown:
            self._relink(self._fds_holding_others(), unknown, changed)
        self._orphans |= unknown

    def _found(self, inode: int, pid: int, name: str, unknown: set[int], changed: set[int]) -> None:
        if inode in unknown:
            unknown.discard(inode)
            self._owners[inode] = (pid, name)
            self._busy[pid] = self._refreshes
            changed.add(inode)

    def _relink(self, fds: Iterable[tuple[int, str]], unknown: set[int], changed: set[int]) -> None:
        """Read these fds again, whatever they held before."""
        by_pid: dict[int, list[str]] = {}
        for pid, name in fds:
            by_pid.setdefault(pid, []).append(name)
        for pid, names in by_pid.items():
            known = self._fds.get(pid)
            directory = None if known is None else self._open_fd_dir(pid)
            if known is None or directory is None:
                continue
            try:
                for name in names:
                    inode = _link_inode(name, directory)
                    self._set_fd(pid, known, name, inode, changed)
                    if inode:
                        self._found(inode, pid, name, unknown, changed)
                    if not unknown:
                        return
            finally:
                os.close(directory)

    def _read_new_processes(self, unknown: set[int], changed: set[int]) -> None:
        for pid in sorted(self._live - self._fds.keys(), reverse=True):  # newest first
            fds = read_all_fds(self._proc, pid)
            if fds is None:
                continue
            self._fds[pid] = fds
            for name, inode in fds.items():
                self._found(inode, pid, name, unknown, changed)
            if not unknown:
                return

    def _read_new_fds(self, unknown: set[int], changed: set[int]) -> None:
        """List each known process's fds: read the new ones, drop the closed ones."""
        for pid in self._by_activity():
            known = self._fds[pid]
            directory = self._open_fd_dir(pid)
            if directory is None:
                continue
            try:
                names = set(os.listdir(directory))
                for name in known.keys() - names:
                    self._set_fd(pid, known, name, None, changed)
                for name in names - known.keys():
                    inode = _link_inode(name, directory)
                    self._set_fd(pid, known, name, inode, changed)
                    if inode:
                        self._found(inode, pid, name, unknown, changed)
            except _GONE:
                continue
            finally:
                os.close(directory)
            if not unknown:
                return

    def _match_known_fds(self, unknown: set[int], changed: set[int]) -> None:
        for pid, fds in self._fds.items():
            for name, inode in fds.items():
                if inode in unknown:
                    self._found(inode, pid, name, unknown, changed)

    def _fds_holding_others(self) -> list[tuple[int, str]]:
        """Fds last seen holding no socket of the table: one may have been reused since."""
        table = self._table
        return [
            (pid, name)
            for pid in self._by_activity()
            for name, inode in self._fds[pid].items()
            if inode not in table
        ]

    def _by_activity(self) -> list[int]:
        busy = self._busy
        return sorted(self._fds, key=lambda pid: busy.get(pid, 0), reverse=True)

    # -- bookkeeping ------------------------------------------------------------------

    def _set_fd(
        self, pid: int, known: dict[str, int], name: str, inode: int | None, changed: set[int]
    ) -> None:
        """Record what fd `name` of `pid` holds now (None: closed), un-owning what it held."""
        before = known.get(name)
        if before and self._owners.get(before) == (pid, name) and before != inode:
            del self._owners[before]
            if before in self._table:
                changed.add(before)
        if inode is None:
            known.pop(name, None)
        else:
            known[name] = inode

    def _forget_pid(self, pid: int, table: AbstractSet[int], changed: set[int]) -> None:
        for name, inode in self._fds.pop(pid).items():
            if inode and self._owners.get(inode) == (pid, name):
                del self._owners[inode]
                if inode in table:
                    changed.add(inode)
        self._busy.pop(pid, None)


def owners_of(table: AbstractSet[int], proc: str = PROC) -> Mapping[int, int]:
    """One full scan: inode -> pid for the inodes of `table` (no cache kept)."""
    owners = SocketOwners(proc)
    owners.refresh(table)
    return owners.owners()
