"""Who holds a socket and who that process is: the /proc/<pid>/fd map kept between
refreshes (owners.py) and the process descriptions cached by pid and start time
(processes.py). The fd map runs on a directory laid out like /proc, whose fd entries are
real symlinks, so readlink sees exactly what it sees in /proc."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import psutil  # type: ignore[import-untyped]
import pytest

from agent.observe.model import ProcessInfo
from agent.observe.overlap import run_beside
from agent.observe.owners import SocketOwners, read_all_fds
from agent.observe.processes import (
    ProcessCache,
    describe_process,
    start_ticks,
    systemd_unit,
    user_name,
)


class FakeProc:
    """A directory laid out like /proc: net/<table>, <pid>/stat, <pid>/cgroup, <pid>/fd/<n>."""

    def __init__(self, root: Path) -> None:
        self.root = root
        (root / "net").mkdir(parents=True)

    @property
    def path(self) -> str:
        return str(self.root)

    def table(self, name: str, text: str) -> None:
        (self.root / "net" / name).write_text(text)

    def process(self, pid: int, *, start: int = 5000, comm: str = "worker") -> None:
        directory = self.root / str(pid)
        (directory / "fd").mkdir(parents=True, exist_ok=True)
        # Field 22 (start time) follows the 19 fields after "comm".
        after_comm = "S 1 1 1 0 -1 4194560 0 0 0 0 0 0 0 0 20 0 1 0"
        (directory / "stat").write_text(f"{pid} ({comm}) {after_comm} {start} 1000 10\n")
        (directory / "cgroup").write_text("0::/system.slice/fake.service\n")

    def link(self, pid: int, fd: int, target: str) -> None:
        path = self.root / str(pid) / "fd" / str(fd)
        path.unlink(missing_ok=True)
        path.symlink_to(target)

    def socket(self, pid: int, fd: int, inode: int) -> None:
        self.link(pid, fd, f"socket:[{inode}]")

    def close(self, pid: int, fd: int) -> None:
        (self.root / str(pid) / "fd" / str(fd)).unlink()

    def end(self, pid: int) -> None:
        shutil.rmtree(self.root / str(pid))


@pytest.fixture
def proc(tmp_path: Path) -> FakeProc:
    return FakeProc(tmp_path / "proc")


@pytest.fixture
def readlinks(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The fd names readlink is called on."""
    calls: list[str] = []
    real = os.readlink

    def counting(path: str, *, dir_fd: int | None = None) -> str:
        calls.append(path)
        return real(path, dir_fd=dir_fd)

    monkeypatch.setattr(os, "readlink", counting)
    return calls


def owners_at(proc: FakeProc) -> SocketOwners:
    return SocketOwners(proc.path, rescan_interval=3600)


# -- owners.py ------------------------------------------------------------------------


def test_full_scan_maps_inodes_of_the_table_to_pids(proc: FakeProc) -> None:
    proc.process(100)
    proc.socket(100, 3, 1001)
    proc.socket(100, 4, 1002)
    proc.link(100, 5, "/var/log/app.log")
    proc.process(200)
    proc.socket(200, 3, 2001)
    proc.socket(200, 4, 9999)  # a socket of another table (unix, other namespace)
    owners = owners_at(proc)

    changed = owners.refresh(frozenset({1001, 1002, 2001, 3001}))

    assert owners.owners() == {1001: 100, 1002: 100, 2001: 200}
    assert changed == {1001, 1002, 2001}
    assert owners.live_pids == {100, 200}


def test_shared_socket_is_named_after_a_holder_other_than_init(proc: FakeProc) -> None:
    for pid in (1, 300, 250):  # systemd passed the socket to a server that forked
        proc.process(pid)
        proc.socket(pid, 3, 7000)
    owners = owners_at(proc)
    owners.refresh(frozenset({7000}))
    assert owners.owner(7000) == 250


def test_nothing_changed_reads_no_fd(proc: FakeProc, readlinks: list[str]) -> None:
    proc.process(100)
    proc.socket(100, 3, 1001)
    owners = owners_at(proc)
    owners.refresh(frozenset({1001}))
    readlinks.clear()

    assert owners.refresh(frozenset({1001})) == set()
    assert readlinks == []
    assert owners.owner(1001) == 100


def test_a_closed_sockets_fd_reused_is_read_first(proc: FakeProc, readlinks: list[str]) -> None:
    proc.process(100)
    for fd in range(3, 40):
        proc.socket(100, fd, 1000 + fd)
    for fd in range(40, 60):  # files: read again only if the closed socket's fd is not
        proc.link(100, fd, f"/var/lib/app/data.{fd}")
    owners = owners_at(proc)
    owners.refresh(frozenset(range(1003, 1040)))
    readlinks.clear()
    proc.socket(100, 7, 5007)  # closed 1007, the next socket got the lowest free fd

    changed = owners.refresh(frozenset(range(1003, 1040)) - {1007} | {5007})

    assert owners.owner(5007) == 100
    assert changed == {5007}
    assert readlinks == ["7"]


def test_new_fds_and_new_processes_are_found(proc: FakeProc) -> None:
    proc.process(100)
    proc.socket(100, 3, 1001)
    owners = owners_at(proc)
    owners.refresh(frozenset({1001}))
    proc.socket(100, 4, 1002)
    proc.process(300)
    proc.socket(300, 3, 3001)

    changed = owners.refresh(frozenset({1001, 1002, 3001}))

    assert owners.owners() == {1001: 100, 1002: 100, 3001: 300}
    assert changed == {1002, 3001}


def test_an_fd_that_held_a_file_and_now_holds_a_socket_is_found(proc: FakeProc) -> None:
    proc.process(100)
    proc.socket(100, 3, 1001)
    proc.link(100, 4, "/etc/app.conf")
    owners = owners_at(proc)
    owners.refresh(frozenset({1001}))
    proc.socket(100, 4, 1002)  # the file was closed, the fd number reused

    owners.refresh(frozenset({1001, 1002}))

    assert owners.owner(1002) == 100


def test_a_shared_socket_passes_to_its_other_holder_when_the_owner_ends(proc: FakeProc) -> None:
    proc.process(100)
    proc.socket(100, 3, 1001)
    proc.process(101)  # its child, holding the same socket on another fd
    proc.socket(101, 5, 1001)
    owners = owners_at(proc)
    owners.refresh(frozenset({1001}))
    assert owners.owner(1001) == 100
    proc.end(100)

    assert owners.refresh(frozenset({1001})) == {1001}
    assert owners.owner(1001) == 101
    assert owners.live_pids == {101}


def test_a_socket_no_process_holds_is_not_searched_for_again(
    proc: FakeProc, readlinks: list[str]
) -> None:
    proc.process(100)
    proc.socket(100, 3, 1001)
    owners = owners_at(proc)
    owners.refresh(frozenset({1001}))
    owners.refresh(frozenset({1001, 4242}))  # held in another pid namespace, say
    readlinks.clear()

    assert owners.refresh(frozenset({1001, 4242})) == set()
    assert readlinks == []
    assert owners.owner(4242) is None


def test_a_full_rescan_every_interval_catches_stale_owners(proc: FakeProc) -> None:
    now = [0.0]
    proc.process(100)
    proc.socket(100, 3, 1001)
    proc.process(101)
    owners = SocketOwners(proc.path, rescan_interval=60, clock=lambda: now[0])
    owners.refresh(frozenset({1001}))
    proc.close(100, 3)  # handed to 101 (SCM_RIGHTS), which the table cannot show
    proc.socket(101, 3, 1001)

    owners.refresh(frozenset({1001}))
    assert owners.owner(1001) == 100  # nothing in the table changed: not looked at
    now[0] = 61.0
    assert owners.refresh(frozenset({1001})) == {1001}
    assert owners.owner(1001) == 101


def test_a_full_scan_read_on_two_threads_is_the_one_read_on_one(
    proc: FakeProc, readlinks: list[str]
) -> None:
    for pid in range(100, 140):
        own_sockets = [pid * 10 + fd for fd in range(3, 8)]
        proc.process(pid)
        for fd, inode in enumerate(own_sockets, start=3):
            proc.socket(pid, fd, inode)
        proc.link(pid, 9, "/var/log/app.log")
    table = frozenset(pid * 10 + fd for pid in range(100, 140) for fd in range(3, 8))
    serial = owners_at(proc)
    serial.refresh(table)
    readlinks.clear()
    owners = owners_at(proc)
    scan = owners.start_full_scan()

    run_beside(scan.run, scan.run, name="bh-test-scan")
    changed = owners.refresh(table, scan=scan)

    assert len(readlinks) == 40 * 6  # every fd once: no process read by both threads
    assert scan.fds() == {pid: read_all_fds(proc.path, pid) for pid in range(100, 140)}
    assert owners.owners() == serial.owners()
    assert changed == table
    assert not owners.full_scan_due()


def test_a_socket_made_after_its_process_was_scanned_is_still_found(proc: FakeProc) -> None:
    proc.process(100)
    proc.socket(100, 3, 1001)
    owners = owners_at(proc)
    scan = owners.start_full_scan()
    scan.run()  # beside the read of the table, which sees a socket made meanwhile
    proc.socket(100, 4, 1002)
    proc.process(200)
    proc.socket(200, 3, 2001)

    changed = owners.refresh(frozenset({1001, 1002, 2001}), scan=scan)

    assert owners.owners() == {1001: 100, 1002: 100, 2001: 200}
    assert changed == {1001, 1002, 2001}


def test_a_full_scan_started_and_dropped_changes_nothing(proc: FakeProc) -> None:
    proc.process(100)
    proc.socket(100, 3, 1001)
    owners = owners_at(proc)
    owners.start_full_scan().run()  # as when the read of the table beside it failed

    assert owners.full_scan_due()
    assert owners.refresh(frozenset({1001})) == {1001}


# -- processes.py ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cgroup", "unit"),
    [
        ("0::/system.slice/postgresql@15-main.service\n", "postgresql@15-main.service"),
        (
            "0::/user.slice/user-1000.slice/user@1000.service/app.slice/"
            "app-org.gnome.Terminal.slice/vte-spawn-5d1c.scope\n",
            "vte-spawn-5d1c.scope",
        ),
        # A service's own subtree (Delegate=yes): the unit is the service above it.
        ("0::/system.slice/containerd.service/kubepods/burstable/pod1\n", "containerd.service"),
        ("0::/system.slice/nginx.socket\n", "nginx.socket"),
        ("0::/\n", ""),  # kernel threads and processes outside systemd
        ("0::/init.scope\n", "init.scope"),
        (
            # cgroup v1: systemd's own hierarchy names the unit, not the controllers'.
            "12:memory:/docker/0123abcd\n"
            "4:cpu,cpuacct:/system.slice/docker.service\n"
            "1:name=systemd:/system.slice/ssh.service\n",
            "ssh.service",
        ),
        (
            # hybrid: the unified line first.
            "1:name=systemd:/system.slice/cron.service\n0::/system.slice/cron.service\n",
            "cron.service",
        ),
        ("", ""),
    ],
)
def test_systemd_unit_is_the_innermost_unit_of_the_cgroup(cgroup: str, unit: str) -> None:
    assert systemd_unit(cgroup) == unit


def test_start_ticks_read_past_a_comm_with_spaces_and_parentheses(proc: FakeProc) -> None:
    proc.process(100, start=123456, comm="evil) (name 1 2")
    assert start_ticks(100, proc.path) == 123456
    assert start_ticks(101, proc.path) is None


def test_start_ticks_of_a_broken_stat_is_an_error(proc: FakeProc) -> None:
    proc.process(100)
    (proc.root / "100" / "stat").write_text("100 (x) S 1\n")
    with pytest.raises(ValueError, match="no start time"):
        start_ticks(100, proc.path)


class CountingDescribe:
    def __init__(self) -> None:
        self.calls: list[int] = []

    def __call__(self, pid: int) -> ProcessInfo:
        self.calls.append(pid)
        generation = self.calls.count(pid)
        return ProcessInfo(pid, f"p{pid}-{generation}", "/bin/p", ("p",), "root", 1.0, "")


def cache_at(proc: FakeProc) -> tuple[ProcessCache, CountingDescribe]:
    describe = CountingDescribe()
    return ProcessCache(proc.path, describe=describe), describe


def test_process_cache_asks_once_per_process(proc: FakeProc) -> None:
    proc.process(100)
    cache, describe = cache_at(proc)
    first = cache.get(100)
    assert first is not None
    assert first.name == "p100-1"
    assert cache.get(100) is first
    assert describe.calls == [100]


def test_a_reused_pid_is_a_new_process(proc: FakeProc) -> None:
    proc.process(100, start=5000)
    cache, describe = cache_at(proc)
    cache.get(100)
    proc.process(100, start=9000)  # the first one ended, a new one got its pid

    info = cache.get(100)

    assert info is not None
    assert info.name == "p100-2"
    assert describe.calls == [100, 100]


def test_a_process_gone_is_none_and_forgotten(proc: FakeProc) -> None:
    proc.process(100)
    proc.process(200)
    cache, _ = cache_at(proc)
    cache.get(100)
    cache.get(200)
    proc.end(100)
    assert cache.get(100) is None
    cache.retain(frozenset({300}))
    assert len(cache) == 0


def test_a_process_that_ends_while_described_is_not_cached(proc: FakeProc) -> None:
    proc.process(100)

    def ends_meanwhile(pid: int) -> ProcessInfo:
        proc.end(pid)
        return ProcessInfo(pid, "gone", "", (), "root", 1.0, "")

    cache = ProcessCache(proc.path, describe=ends_meanwhile)
    assert cache.get(100) is None
    assert len(cache) == 0


def test_describe_process_of_this_process() -> None:
    me = psutil.Process()
    info = describe_process(os.getpid())
    assert info is not None
    assert info.pid == os.getpid()
    assert info.name == me.name()
    assert info.exe == me.exe()
    assert info.cmdline == tuple(me.cmdline())
    assert info.user == user_name(os.geteuid())
    assert info.start_time == me.create_time()
    with open(f"/proc/{os.getpid()}/cgroup") as cgroup:
        assert info.unit == systemd_unit(cgroup.read())


def test_describe_process_of_no_process_is_none() -> None:
    with open("/proc/sys/kernel/pid_max") as pid_max:
        never_used = int(pid_max.read()) + 1
    assert describe_process(never_used) is None


def test_user_name_of_an_unknown_uid_is_the_number() -> None:
    assert user_name(0) == "root"
    assert user_name(2_000_000_123) == "2000000123"
