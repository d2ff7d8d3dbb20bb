"""The systemd units: systemd's own checks (verify, security) and the settings we rely on.

systemd need not be running: `systemd-analyze verify --root` loads the units from a tree
the test builds (stub programs and system targets included), and `security --offline`
reads the unit file alone.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from agent.install import UNIT_NAME, packaged_unit
from lab.daemons import AGENT_UNIT_ENVIRONMENT

REPO = Path(__file__).resolve().parents[2]
UNITS = REPO / "systemd"
AGENT = UNITS / "bulkhead-agent.service"
CONTROLLER = UNITS / "bulkhead-controller.service"
# Highest exposure accepted (0 safest, 10 worst). The agent must stay root with
# CAP_NET_ADMIN and CAP_NET_RAW to program the firewall; the controller needs nothing.
MAX_EXPOSURE = {AGENT: 3.5, CONTROLLER: 2.5}
# Pulled in by every service's default dependencies.
DEFAULT_TARGETS = ("sysinit.target", "basic.target", "shutdown.target")

ANALYZE = shutil.which("systemd-analyze")
needs_analyze = pytest.mark.skipif(
    ANALYZE is None, reason="systemd-analyze not installed (scripts/setup installs `systemd`)"
)


def settings(unit: Path) -> dict[str, list[str]]:
    """KEY -> values in file order (systemd allows a key more than once)."""
    found: dict[str, list[str]] = {}
    for line in unit.read_text().splitlines():
        if line.strip() and not line.startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            found.setdefault(key.strip(), []).append(value.strip())
    return found


def programs(unit: Path) -> set[str]:
    """The absolute programs the unit's Exec*= lines run (prefixes like '+' removed)."""
    return {
        command.split()[0].lstrip("-@:+!")
        for key, values in settings(unit).items()
        if key.startswith("Exec")
        for command in values
    }


def build_root(root: Path, units: list[Path]) -> None:
    """A tree holding UNITS, stub programs for them and stub targets they name."""
    unit_dir = root / "etc/systemd/system"
    unit_dir.mkdir(parents=True)
    targets = set(DEFAULT_TARGETS)
    for unit in units:
        shutil.copy(unit, unit_dir / unit.name)
        targets.update(re.findall(r"[\w.-]+\.target", unit.read_text()))
        for program in programs(unit):
            stub = root / program.lstrip("/")
            stub.parent.mkdir(parents=True, exist_ok=True)
            stub.write_text("#!/bin/sh\n")
            stub.chmod(0o755)
    target_dir = root / "usr/lib/systemd/system"
    target_dir.mkdir(parents=True)
    for target in targets:
        (target_dir / target).write_text("[Unit]\nDescription=stub\n")


def verify(root: Path, names: list[str]) -> tuple[int, str]:
    assert ANALYZE is not None
    done = subprocess.run(
        [ANALYZE, "verify", "--man=no", "--generators=no", f"--root={root}", *names],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    # verify exits 0 on warnings (unknown keys, bad values): those count as failures too.
    return done.returncode, (done.stdout + done.stderr).strip()


@needs_analyze
def test_units_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    build_root(tmp_path, [AGENT, CONTROLLER])
    assert verify(tmp_path, [AGENT.name, CONTROLLER.name]) == (0, "")


@needs_analyze
@pytest.mark.parametrize(
    ("change", "complaint"),
    [
        ("WatchdogSec=30s", "WatchdogSec=thirty"),
        ("Restart=on-failure", "Restart=on-failure\nProtectEverything=yes"),
    ],
)
def test_verify_as_run_here_does_catch_a_broken_unit(
    tmp_path: Path, change: str, complaint: str
) -> None:
    broken = tmp_path / "src" / AGENT.name
    broken.parent.mkdir()
    broken.write_text(AGENT.read_text().replace(change, complaint, 1))
    build_root(tmp_path / "root", [broken])
    code, output = verify(tmp_path / "root", [AGENT.name])
    assert code != 0 or output


@needs_analyze
@pytest.mark.parametrize("unit", [AGENT, CONTROLLER], ids=lambda u: u.stem)
def test_exposure_level_is_low(unit: Path) -> None:
    assert ANALYZE is not None
    done = subprocess.run(
        [ANALYZE, "security", "--offline=true", "--no-pager", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    found = re.search(r"Overall exposure level for \S+: (\d+(?:\.\d+)?)", done.stdout)
    assert found, done.stdout + done.stderr
    score = float(found.group(1))
    print(f"{unit.name}: exposure {score} (at most {MAX_EXPOSURE[unit]})")
    assert score <= MAX_EXPOSURE[unit], done.stdout


def test_both_units_notify_feed_a_watchdog_and_restart_on_failure() -> None:
    for unit in (AGENT, CONTROLLER):
        found = settings(unit)
        assert found["Type"] == ["notify"]
        assert found["WatchdogSec"] == ["30s"]
        assert found["Restart"] == ["on-failure"]
        assert found["NoNewPrivileges"] == ["yes"]
        assert found["ProtectSystem"] == ["strict"]


def test_both_units_raise_the_descriptor_limit() -> None:
    # Issue 17: at the default 1,024, 1,100 idle connections locked every caller out.
    for unit in (AGENT, CONTROLLER):
        assert settings(unit)["LimitNOFILE"] == ["65536"]


def test_agent_runs_from_the_venv_with_only_network_capabilities() -> None:
    found = settings(AGENT)
    assert found["ExecStart"] == [
        "/opt/bulkhead/venv/bin/bulkhead-agent --config /etc/bulkhead/agent.yaml"
    ]
    assert set(found["CapabilityBoundingSet"][0].split()) == {"CAP_NET_ADMIN", "CAP_NET_RAW"}
    assert found["StateDirectory"] == ["bulkhead/agent"]
    assert "AF_NETLINK" in found["RestrictAddressFamilies"][0].split()
    assert found["Environment"] == ["MALLOC_ARENA_MAX=2"]  # docs/benchmarks.md: idle RSS


def test_lab_agents_run_with_the_units_environment() -> None:
    # The lab (and the benches built on it) measure agents as the unit runs them.
    unit = dict(item.split("=", 1) for item in settings(AGENT)["Environment"])
    assert dict(AGENT_UNIT_ENVIRONMENT) == unit


def test_controller_runs_unprivileged_with_no_capabilities() -> None:
    found = settings(CONTROLLER)
    assert found["ExecStart"] == [
        "/opt/bulkhead/venv/bin/bulkhead-controller --listen 0.0.0.0:50151 "
        "--state-dir /var/lib/bulkhead/controller"
    ]
    assert found["DynamicUser"] == ["yes"]
    assert found["CapabilityBoundingSet"] == [""]
    assert found["StateDirectory"] == ["bulkhead/controller"]


def test_the_packaged_agent_unit_is_the_one_in_systemd_dir() -> None:
    # One source of truth: agent/units/ links to systemd/, and the installer reads it there.
    assert (REPO / "agent/units" / UNIT_NAME).resolve() == AGENT.resolve()
    assert packaged_unit() == AGENT.read_text()
