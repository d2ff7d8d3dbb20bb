"""The lab's network part for real: namespaces, bridge, listeners, probes, and `down`.

No controller or agents (`up --no-daemons`), so no firewall: every probe to a listening
port must connect. The lab's names are fixed (bh-lab-sw, bh-lab0), so these tests refuse
to run while an operator's lab is up rather than touch it; every test removes its lab.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from lab import lifecycle, topology
from lab.errors import DaemonError, PlumbingError, StateError
from lab.iproute import ip, ip_json, link_exists, list_netns, netns_exists
from lab.lifecycle import add_listener, down, up
from lab.probe import probe_hosts, tcp_probe
from lab.spec import HostSpec
from lab.state import load_state, state_path

# Host names unlikely to clash with namespaces other tests create (bh-t-*).
HOSTS = [HostSpec("lweb", {"app": "web"}), HostSpec("ldb", {"app": "db"}), HostSpec("lother")]
LAB_BIN = Path(sys.executable).parent / "bulkhead-lab"


def _unavailable() -> str | None:
    if os.geteuid() != 0:
        return "needs root to create network namespaces"
    if topology.find_lab_namespaces() or link_exists(topology.UPLINK):
        return "a bulkhead-lab lab is up on this machine; not touching it"
    return None


pytestmark = pytest.mark.integration


def _lab_leftovers() -> list[str]:
    names = [n for n in list_netns() if n == topology.SWITCH_NS or n in {h.netns for h in HOSTS}]
    return names + ([topology.UPLINK] if link_exists(topology.UPLINK) else [])


@pytest.fixture
def lab_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    reason = _unavailable()
    if reason:
        pytest.skip(reason)
    directory = tmp_path / "lab"
    monkeypatch.setenv("BULKHEAD_LAB_DIR", str(directory))
    try:
        yield directory
    finally:
        down(directory)
    assert _lab_leftovers() == []


@pytest.fixture
def net_lab(lab_dir: Path) -> Path:
    up(lab_dir, HOSTS, daemons=False)
    return lab_dir


def _run_lab(*args: str, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(LAB_BIN), *args], capture_output=True, text=True, timeout=timeout, check=False
    )


def test_up_builds_isolated_hosts_on_one_bridge(net_lab: Path) -> None:
    state = load_state(net_lab)
    assert [(h.name, h.ipv4, h.ipv6) for h in state.hosts] == [
        ("lweb", "198.18.0.10", "2001:db8::10"),
        ("ldb", "198.18.0.11", "2001:db8::11"),
        ("lother", "198.18.0.12", "2001:db8::12"),
    ]
    for host in state.hosts:
        addrs = {
            (a["local"], a["prefixlen"])
            for link in ip_json("addr", "show", "dev", "eth0", netns=host.netns)
            for a in link["addr_info"]
        }
        assert {(host.ipv4, 24), (host.ipv6, 64)} <= addrs
        # No way out of the lab: only the connected routes.
        assert ip_json("route", "show", "default", netns=host.netns) == []
        assert ip_json("-6", "route", "show", "default", netns=host.netns) == []
    uplink = ip_json("addr", "show", "dev", topology.UPLINK)[0]
    assert {a["local"] for a in uplink["addr_info"]} >= {"198.18.0.1", "2001:db8::1"}
    # Bridged lab traffic must not go through any bridge-netfilter hook.
    sysctl = "/proc/sys/net/bridge/bridge-nf-call-iptables"
    if Path(sysctl).exists():
        out = ip("netns", "exec", topology.SWITCH_NS, "cat", sysctl)
        assert out.strip() == "0"


def test_listeners_answer_probes_between_hosts_v4_and_v6(net_lab: Path) -> None:
    add_listener(net_lab, "ldb", [5432, 22], udp=False)
    add_listener(net_lab, "lweb", [8080], udp=True)
    state = load_state(net_lab)

    for ipv6 in (False, True):
        result = probe_hosts(state, "lweb", "ldb", 5432, ipv6=ipv6)
        assert result.connected
        assert result.banner == "ldb:5432/tcp"
        assert tcp_probe("lother", "ldb", 22, ipv6=ipv6, directory=net_lab)
        assert tcp_probe("ops", "lweb", 8080, ipv6=ipv6, directory=net_lab)
        assert probe_hosts(state, "ldb", "lweb", 8080, ipv6=ipv6, udp=True).banner == (
            "lweb:8080/udp"
        )
    closed = probe_hosts(state, "lweb", "ldb", 5433)
    assert not closed.connected
    assert closed.reason == "connection refused"
    assert not tcp_probe("lweb", "ldb", 5433, ipv6=True, directory=net_lab)


def test_down_stops_listeners_and_removes_everything(lab_dir: Path) -> None:
    up(lab_dir, HOSTS, daemons=False)
    record = add_listener(lab_dir, "ldb", [5432], udp=True)
    assert _lab_leftovers()

    removed = down(lab_dir)

    assert f"process {record.pid}" in removed
    assert not Path(f"/proc/{record.pid}").exists() or _is_zombie(record.pid)
    assert _lab_leftovers() == []
    assert not lab_dir.exists()
    assert down(lab_dir) == []  # idempotent


def test_down_after_a_crash_sweeps_by_mark(lab_dir: Path) -> None:
    up(lab_dir, HOSTS, daemons=False)
    listeners = [add_listener(lab_dir, h.name, [9000], udp=False) for h in HOSTS]
    survivor = add_listener(lab_dir, "ldb", [9001], udp=False)
    for record in listeners:
        os.kill(record.pid, signal.SIGKILL)
        os.waitpid(record.pid, 0)
    state_path(lab_dir).unlink()

    down(lab_dir)

    assert not Path(f"/proc/{survivor.pid}").exists() or _is_zombie(survivor.pid)
    assert _lab_leftovers() == []
    assert not lab_dir.exists()


def test_down_with_a_corrupt_state_file_still_removes_the_lab(lab_dir: Path) -> None:
    up(lab_dir, HOSTS, daemons=False)
    state_path(lab_dir).write_text("{ half a file")

    down(lab_dir)

    assert _lab_leftovers() == []


def test_down_leaves_bh_namespaces_it_did_not_make(lab_dir: Path) -> None:
    foreign = "bh-lforeign"
    ip("netns", "add", foreign)
    try:
        up(lab_dir, HOSTS, daemons=False)
        down(lab_dir)
        assert netns_exists(foreign)
        assert _lab_leftovers() == []
    finally:
        topology.remove_netns(foreign)


def test_up_refuses_while_a_lab_is_up(net_lab: Path) -> None:
    add_listener(net_lab, "lweb", [80], udp=False)
    with pytest.raises(StateError, match="a lab is already up"):
        up(net_lab, [HostSpec("lnew")], daemons=False)
    assert not netns_exists("bh-lnew")
    assert tcp_probe("ops", "lweb", 80, directory=net_lab)  # the first lab is untouched


def test_up_refuses_a_host_namespace_that_exists_and_changes_nothing(lab_dir: Path) -> None:
    ip("netns", "add", "bh-ldb")
    try:
        with pytest.raises(StateError, match="bh-ldb already exists"):
            up(lab_dir, HOSTS, daemons=False)
        assert _lab_leftovers() == ["bh-ldb"]
        assert not lab_dir.exists()
    finally:
        topology.remove_netns("bh-ldb")


def test_a_failure_part_way_through_up_removes_what_it_made(
    lab_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def failing_ip(*args: str, netns: str | None = None) -> str:
        if netns == "bh-lother" and "addr" in args:
            raise PlumbingError("injected failure")
        return ip(*args, netns=netns)

    monkeypatch.setattr("lab.topology.ip", failing_ip)
    with pytest.raises(PlumbingError, match="injected failure"):
        up(lab_dir, HOSTS, daemons=False)
    assert _lab_leftovers() == []
    assert not lab_dir.exists()


def test_a_controller_that_dies_at_start_fails_up_and_is_cleaned_up(
    lab_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("lab.daemons.program", lambda name: "/bin/false")
    monkeypatch.setattr(lifecycle, "program", lambda name: "/bin/false")
    # Credentials come before the controller; let that step pass to reach the start.
    monkeypatch.setattr(lifecycle, "issue_operator_credentials", lambda paths: paths.operator)
    with pytest.raises(DaemonError, match="the controller exited during start"):
        up(lab_dir, HOSTS)
    assert _lab_leftovers() == []
    assert not lab_dir.exists()


def test_cli_up_exec_probe_listen_status_down(lab_dir: Path) -> None:
    hosts = [arg for h in ("lweb:app=web", "ldb:app=db") for arg in ("--host", h)]
    started = _run_lab("up", "--no-daemons", *hosts)
    assert started.returncode == 0, started.stderr
    again = _run_lab("up", "--no-daemons", *hosts)
    assert again.returncode == 1
    assert again.stderr.startswith("bulkhead-lab: a lab is already up")

    listened = _run_lab("listen", "ldb", "5432")
    assert listened.returncode == 0, listened.stderr

    inside = _run_lab("exec", "ldb", "--", "sh", "-c", "ip -br addr show dev eth0; exit 7")
    assert inside.returncode == 7
    assert "198.18.0.11/24" in inside.stdout

    ok = _run_lab("probe", "lweb", "ldb", "5432")
    assert (ok.returncode, ok.stdout) == (0, "lweb -> ldb:5432 ok\n")
    ok6 = _run_lab("probe", "ops", "ldb", "5432", "-6")
    assert (ok6.returncode, ok6.stdout) == (0, "ops -> ldb:5432 (IPv6) ok\n")
    refused = _run_lab("probe", "lweb", "ldb", "5433", "--timeout", "0.5")
    assert refused.returncode == 1
    assert refused.stdout == "lweb -> ldb:5433 blocked (connection refused)\n"
    unknown = _run_lab("probe", "lweb", "nosuch", "1")
    assert unknown.returncode == 1
    assert unknown.stderr.startswith("bulkhead-lab: no host 'nosuch' in the lab")

    status = _run_lab("status")
    assert status.returncode == 0
    assert "198.18.0.11" in status.stdout
    assert "running" in status.stdout

    gone = _run_lab("down")
    assert gone.returncode == 0
    assert _lab_leftovers() == []


def _is_zombie(pid: int) -> bool:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return text[text.rindex(")") + 2] == "Z"
