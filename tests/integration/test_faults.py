"""Faults injected while a probe loop watches an allowed and a denied connection.

Allowed: web -> db:5432 (the web-to-db policy). Denied: ops -> db:5433 over IPv4 and IPv6
(the operator's console has no agent, so only db's own rules stand in the way; IPv6 keeps
the probe meaningful while db's IPv4 path to the console is cut). After every fault the
denied connection must never have got through, the allowed one must work again, and the
time to repair is printed (pytest -s shows it).
"""

from __future__ import annotations

import json
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from lab import control
from lab.lifecycle import add_listener, down, up
from lab.spec import parse_host_specs
from lab.state import LabPaths
from tests.integration.labfixture import Lab, lab_unavailable

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
PROBE_TIMEOUT = 0.15
MAX_PROBES = 3000  # bounds the loop whatever happens
RECOVERY_LIMIT = 15.0


@pytest.fixture(scope="module", params=["nftables", "iptables"])
def lab(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    reason = lab_unavailable()
    if reason:
        pytest.skip(reason)
    directory = tmp_path_factory.mktemp(f"faults-{request.param}") / "lab"
    try:
        up(directory, parse_host_specs(["web:app=web", "db:app=db"]), dataplane=request.param)
        add_listener(directory, "db", [5432, 5433], udp=False)
        the_lab = Lab(directory)
        the_lab.ok("apply", "-f", str(ROOT / "examples" / "web-db.yaml"))
        the_lab.wait_in_sync()
        yield the_lab
    finally:
        down(directory)


@dataclass
class Watch:
    """Probes the allowed and the denied connection in the background until stopped."""

    lab: Lab
    allowed_ok: list[float] = field(default_factory=list)
    denied_ok: list[float] = field(default_factory=list)
    probes: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)

    def __enter__(self) -> Watch:
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _loop(self) -> None:
        while not self._stop.is_set() and self.probes < MAX_PROBES:
            self.probes += 1
            now = time.monotonic()
            for ipv6 in (False, True):
                if self.lab.probe("ops", "db", 5433, ipv6=ipv6, timeout=PROBE_TIMEOUT):
                    self.denied_ok.append(now)
            if self.lab.probe("web", "db", 5432, timeout=PROBE_TIMEOUT):
                self.allowed_ok.append(time.monotonic())


class Refused(Exception):
    """The kernel refused the tampering: the agent owns its nftables table."""


def _nft(lab: Lab, command: str) -> None:
    result = subprocess.run(
        ["ip", "netns", "exec", lab.state.host("db").netns, "nft", command],
        capture_output=True, text=True, check=False, timeout=10,
    )  # fmt: skip
    if result.returncode != 0:
        assert "Operation not permitted" in result.stderr, result.stderr
        raise Refused(result.stderr.strip())


def _db_set(lab: Lab) -> str:
    if lab.state.dataplane == "iptables":
        names = lab.netns_run("db", "ipset", "list", "-n").split()
        return next(n for n in names if n.startswith("bh4-"))
    sets = json.loads(lab.netns_run("db", "nft", "-j", "list", "sets", "inet"))["nftables"]
    names = [str(s["set"]["name"]) for s in sets if "set" in s]
    return next(name for name in names if name.endswith("_v4"))


def flush_table(lab: Lab) -> None:
    if lab.state.dataplane == "iptables":
        lab.netns_run("db", "iptables-legacy", "-F", "BULKHEAD-INPUT")
    else:
        _nft(lab, "flush table inet bulkhead")


def insert_accept_all(lab: Lab) -> None:
    if lab.state.dataplane == "iptables":
        lab.netns_run("db", "iptables-legacy", "-I", "BULKHEAD-INPUT", "1", "-j", "ACCEPT")
    else:
        _nft(lab, "insert rule inet bulkhead input accept")


def empty_a_set(lab: Lab) -> None:
    name = _db_set(lab)
    if lab.state.dataplane == "iptables":
        lab.netns_run("db", "ipset", "flush", name)
    else:
        _nft(lab, f"flush set inet bulkhead {name}")


def kill_agent(lab: Lab) -> None:
    control.stop(lab.directory, "db", sig=signal.SIGKILL)
    control.start(lab.directory, "db")


def restart_controller(lab: Lab) -> None:
    control.stop(lab.directory, "controller")
    time.sleep(1.0)
    control.start(lab.directory, "controller")


def cut_controller_link(lab: Lab) -> None:
    # Inside db only, so nothing is rerouted anywhere: db loses its controller (IPv4),
    # the hosts keep talking. Never take the lab's uplink down in the root namespace:
    # the machine's default route would then carry lab addresses off the machine.
    route = ("route", "blackhole", "198.18.0.1/32")
    lab.netns_run("db", "ip", *route[:1], "add", *route[1:])
    try:
        time.sleep(2.0)
    finally:
        lab.netns_run("db", "ip", *route[:1], "del", *route[1:])


def corrupt_state_file(lab: Lab) -> None:
    state = LabPaths(lab.directory).agent_dir("db") / "state" / "snapshot.json"
    control.stop(lab.directory, "db", sig=signal.SIGKILL)
    state.write_text(state.read_text()[:40])  # truncated mid-write, as after a crash
    control.start(lab.directory, "db", wait=False)


FAULTS: dict[str, Callable[[Lab], None]] = {
    "agent SIGKILL": kill_agent,
    "controller stop/start": restart_controller,
    "controller link cut": cut_controller_link,
    "table flushed": flush_table,
    "accept-all inserted": insert_accept_all,
    "set emptied": empty_a_set,
    "state file corrupted": corrupt_state_file,
}


# Faults that change Bulkhead's rules in the kernel; the others take a process away.
TAMPERING = {"table flushed", "accept-all inserted", "set emptied"}
# Tampering that opens the host until the agent repairs it: none. With nftables the
# agent owns its table (owner + persist flags) and the kernel refuses every change from
# another process. Legacy x_tables have no owner and the agent only polls them every
# 0.5 s, but our chains have a second copy in the security table, which packets meet
# after filter's at the same hooks: an accept inserted in filter's copy, or its flush,
# still meets security's drop until the repair (and a tampered security copy still
# follows filter's).
OPENING_TAMPERS = {
    "nftables": set[str](),
    "iptables": set[str](),
}


@pytest.mark.parametrize("fault", list(FAULTS))
def test_fault_never_opens_the_denied_port_and_heals(lab: Lab, fault: str) -> None:
    before = lab.rules_fingerprint("db")
    with Watch(lab) as watch:
        time.sleep(0.3)
        injected = time.monotonic()
        refused = None
        try:
            FAULTS[fault](lab)
        except Refused as exc:
            refused = str(exc).splitlines()[0]
        healed = None
        while time.monotonic() - injected < RECOVERY_LIMIT:
            if lab.rules_fingerprint("db") == before:
                healed = time.monotonic() - injected
                break
            time.sleep(0.02)
        lab.wait_in_sync(timeout=40)
        recovered_from = time.monotonic()
        time.sleep(0.6)
    assert healed is not None, f"{fault}: db's rules never returned to what was applied"
    assert watch.probes >= 2, "the probe loop did not run"
    window = ""
    if fault in OPENING_TAMPERS.get(lab.state.dataplane, set()):
        # Known limit (see OPENING_TAMPERS): until the repair, the tampered rule lets
        # packets through. What must hold: nothing gets through once the repair is in.
        late = [t for t in watch.denied_ok if t - injected > healed + 0.2]
        assert late == [], f"{fault}: the denied port answered after the repair"
        window = f" ({len(watch.denied_ok)} denied successes before the repair)"
    else:
        assert watch.denied_ok == [], (
            f"{fault}: the denied port answered {len(watch.denied_ok)} time(s), "
            f"first {watch.denied_ok[0] - injected:.3f} s after the fault"
        )
    assert any(t >= recovered_from for t in watch.allowed_ok), f"{fault}: allowed never recovered"
    if lab.state.dataplane == "nftables" and fault in TAMPERING:
        assert refused is not None, f"{fault}: the kernel let another process change our table"
    if refused is not None:
        outcome = f"refused by the kernel ({refused})"
    elif fault in TAMPERING:
        outcome = f"rules repaired after {healed:.3f} s"
    else:
        outcome = "rules unchanged in the kernel (fail closed)"
    denied = window or ", 0 denied successes"
    print(f"\n[{lab.state.dataplane}] {fault}: {outcome}, {watch.probes} probe rounds{denied}")
