"""End to end in the namespace lab: controller, three agents, real nftables, real TCP.

Hosts: web (app=web), db (app=db), other (app=other); `ops` is the operator's console in
the root namespace, outside any policy. Listeners: db 5432 (echo, keeps connections),
5433 and 22; web 80.
"""

from __future__ import annotations

import json
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from lab import control
from lab.daemons import AGENT_UNIT_ENVIRONMENT
from lab.lifecycle import add_listener, down, up
from lab.spec import parse_host_specs
from lab.state import Role
from tests.integration.labfixture import Lab, lab_unavailable

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
WEB_DB = (ROOT / "examples" / "web-db.yaml").read_text()


# The conformance suite: every scenario runs against each dataplane.
DATAPLANES = ["nftables", "iptables"]


@pytest.fixture(scope="module", params=DATAPLANES)
def lab(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    reason = lab_unavailable()
    if reason:
        pytest.skip(reason)
    directory = tmp_path_factory.mktemp(f"seg-{request.param}") / "lab"
    echo = None
    try:
        up(
            directory,
            parse_host_specs(["web:app=web", "db:app=db", "other:app=other"]),
            dataplane=request.param,
        )
        add_listener(directory, "db", [5433, 22], udp=False)
        add_listener(directory, "web", [80], udp=False)
        the_lab = Lab(directory)
        echo = the_lab.start_echo("db", 5432)
        yield the_lab
    finally:
        if echo is not None:
            echo.terminate()
            echo.wait(5)
        down(directory)


@pytest.fixture
def clean(lab: Lab) -> Iterator[Lab]:
    """Each test starts and ends with no policy and the original labels."""
    yield lab
    for name in json.loads(lab.ok("get", "policies", "-o", "json")) or []:
        policy = name["metadata"]["name"] if isinstance(name, dict) else name
        lab.ok("delete", "policy", policy)
    lab.ok("label", "agent", "other", "app=other")
    lab.wait_in_sync()


def apply_web_db(lab: Lab) -> None:
    lab.ok("apply", "-f", "-", stdin=WEB_DB)
    lab.wait_in_sync()


def test_agents_run_with_the_environment_of_the_agents_unit(clean: Lab) -> None:
    # What the lab's benches measure is the agent as systemd runs it (MALLOC_ARENA_MAX).
    agents = [p for p in clean.state.processes if p.role is Role.AGENT]
    assert len(agents) == 3
    for agent in agents:
        environ = Path(f"/proc/{agent.pid}/environ").read_bytes().split(b"\0")
        for name, value in AGENT_UNIT_ENVIRONMENT.items():
            assert f"{name}={value}".encode() in environ, agent.host


def test_default_deny_before_any_policy_but_ssh_failsafe_open(clean: Lab) -> None:
    lab = clean
    assert not lab.probe("web", "db", 5432)
    assert not lab.probe("other", "db", 5432)
    assert not lab.probe("db", "web", 80)
    assert not lab.probe("web", "db", 5432, ipv6=True)
    assert lab.probe("ops", "db", 22), "the ssh failsafe port must stay reachable"
    assert not lab.probe("ops", "db", 5433)


def test_policy_allows_exactly_web_to_db_5432(clean: Lab) -> None:
    lab = clean
    apply_web_db(lab)
    for ipv6 in (False, True):
        assert lab.probe("web", "db", 5432, ipv6=ipv6)
        assert not lab.probe("other", "db", 5432, ipv6=ipv6)
        assert not lab.probe("db", "web", 80, ipv6=ipv6), "egress from db must be denied"
        assert not lab.probe("web", "db", 5433, ipv6=ipv6)
    assert lab.probe("ops", "db", 22)


def test_relabel_grants_access_within_two_seconds(clean: Lab) -> None:
    lab = clean
    apply_web_db(lab)
    assert not lab.probe("other", "db", 5432)
    lab.ok("label", "agent", "other", "app=web")
    took = lab.probe_until("other", "db", 5432, want=True, within=2.0)
    assert took is not None, "other (now app=web) could not reach db:5432 within 2 s"


def test_delete_blocks_again_and_cuts_established_connection(clean: Lab) -> None:
    lab = clean
    apply_web_db(lab)
    with lab.connect("web", "db", 5432) as conn:
        conn.sendall(b"before\n")
        assert conn.recv(64) == b"before\n"
        lab.ok("delete", "policy", "web-to-db")
        deleted = time.monotonic()
        cut_after = None
        conn.settimeout(0.3)
        while time.monotonic() - deleted < 2.0:
            try:
                conn.sendall(b"ping\n")
                if conn.recv(64) != b"ping\n":
                    raise ConnectionError("connection closed")
            except OSError:
                cut_after = time.monotonic() - deleted
                break
            time.sleep(0.05)
        assert cut_after is not None, "the established connection survived the policy deletion"
    assert not lab.probe("web", "db", 5432)


def test_new_address_on_a_workload_reaches_its_peers_sets(clean: Lab) -> None:
    lab = clean
    apply_web_db(lab)
    netns = lab.state.host("web").netns
    extra = "198.18.0.50"
    ip = ["ip", "netns", "exec", netns, "ip", "addr"]
    subprocess.run([*ip, "add", f"{extra}/24", "dev", "eth0"], check=True)
    try:
        deadline = time.monotonic() + 6.0  # the agent polls its addresses every 2 s
        connected = False
        while not connected and time.monotonic() < deadline:
            try:
                with lab.connect("web", "db", 5432, bind=extra, timeout=0.3):
                    connected = True
            except OSError:
                time.sleep(0.1)
        assert connected, "db never learnt web's new address"
        assert extra in lab.ok("describe", "agent", "db", "-o", "json")
    finally:
        subprocess.run([*ip, "del", f"{extra}/24", "dev", "eth0"], check=False)


def test_sigkilled_agent_leaves_rules_enforcing(clean: Lab) -> None:
    lab = clean
    apply_web_db(lab)
    control.stop(lab.directory, "db", sig=signal.SIGKILL)
    try:
        assert lab.rules_present("db"), "the agent's rules vanished with the agent"
        assert lab.probe("web", "db", 5432)
        assert not lab.probe("ops", "db", 5433)
        assert not lab.probe("ops", "db", 5432)
    finally:
        control.start(lab.directory, "db")


def test_agent_restart_has_no_open_moment(clean: Lab) -> None:
    lab = clean
    apply_web_db(lab)
    successes: list[int] = []
    attempts = 0
    stop = threading.Event()

    def probe_loop() -> None:
        nonlocal attempts
        # Bounded: at most 400 rounds, each probe at most 0.05 s.
        while not stop.is_set() and attempts < 400:
            attempts += 1
            for port in (5432, 5433):
                if lab.probe("ops", "db", port, timeout=0.05):
                    successes.append(port)

    prober = threading.Thread(target=probe_loop)
    prober.start()
    try:
        time.sleep(0.3)
        control.stop(lab.directory, "db", sig=signal.SIGKILL)
        control.start(lab.directory, "db")
        time.sleep(0.3)
    finally:
        stop.set()
        prober.join()
    assert attempts > 5, "the probe loop did not run during the restart"
    assert successes == [], f"denied ports answered during the agent restart: {successes}"
    assert lab.probe("web", "db", 5432)


def test_controller_loss_keeps_enforcement_and_restart_resyncs(clean: Lab) -> None:
    lab = clean
    apply_web_db(lab)
    before = lab.desired()
    control.stop(lab.directory, "controller")
    try:
        assert lab.probe("web", "db", 5432)
        assert not lab.probe("other", "db", 5432)
        assert not lab.probe("db", "web", 80)
    finally:
        control.start(lab.directory, "controller")
    lab.wait_in_sync(timeout=40)
    assert lab.desired() == before, "a restarted controller must want exactly the same rules"
    policies = json.loads(lab.ok("get", "policies", "-o", "json"))
    assert [p["metadata"]["name"] for p in policies] == ["web-to-db"]
    assert lab.probe("web", "db", 5432)


def test_invalid_apply_stores_nothing_and_names_the_field(clean: Lab) -> None:
    lab = clean
    bad = WEB_DB.replace("metadata:\n  name: web-to-db", "metadata:\n  name: second") + (
        "\n---\napiVersion: bulkhead/v1\nkind: Policy\nmetadata: {name: broken}\n"
        "spec:\n  rules:\n    - from: {app: web}\n      to: {cidr: 198.18.0.300/24}\n"
        "      ports: [tcp/5432]\n"
    )
    result = lab.cli("apply", "-f", "-", stdin=bad)
    assert result.returncode != 0
    assert "spec.rules[0].to" in result.stderr
    assert "document 2" in result.stderr
    assert "Traceback" not in result.stderr
    assert json.loads(lab.ok("get", "policies", "-o", "json")) == []


def test_describe_agent_shows_rules_and_baseline(clean: Lab) -> None:
    lab = clean
    apply_web_db(lab)
    detail = json.loads(lab.ok("describe", "agent", "db", "-o", "json"))
    text = json.dumps(detail)
    assert "198.18.0.10" in text, "db's ingress set must hold web's address"
    assert "tcp/22" in text, "the failsafe baseline must be shown"
    summary = detail["summary"]
    assert summary["applied_revision"] == summary["desired_revision"]


def test_agent_never_touches_foreign_tables(clean: Lab) -> None:
    lab = clean
    lab.add_foreign_rules("other")
    try:
        listing = lab.foreign_rules("other")
        assert "9999" in listing
        apply_web_db(lab)
        lab.ok("label", "agent", "other", "app=web")
        lab.wait_in_sync()
        assert lab.foreign_rules("other") == listing
    finally:
        lab.remove_foreign_rules("other")
