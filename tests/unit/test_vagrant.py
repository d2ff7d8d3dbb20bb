"""The Vagrant lab's files checked without VMs: the Vagrantfile through `vagrant validate`,
the provisioning scripts through bash (and shellcheck where installed), and the scripts'
refusals of bad settings. tests/integration/test_vagrant_provision.py runs them for real."""

from __future__ import annotations

import ipaddress
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
VAGRANT_DIR = REPO / "vagrant"
SCRIPTS = ("common.sh", "provision-controller.sh", "provision-agent.sh")
MACHINES = ("controller", "web", "db")
BENCHMARK_NETWORK = ipaddress.ip_network("198.18.0.0/15")


def _copy_vagrant_dir(destination: Path) -> Path:
    """vagrant/ below DESTINATION (its '..' is the synced folder), without machine state."""
    copy = destination / "vagrant"
    shutil.copytree(VAGRANT_DIR, copy, ignore=shutil.ignore_patterns(".vagrant", ".tokens"))
    return copy


def test_vagrantfile_validates(tmp_path: Path) -> None:
    if shutil.which("vagrant") is None:
        pytest.skip("vagrant is not installed (scripts/setup installs it)")
    # A copy: validate writes .vagrant/ beside the Vagrantfile and VAGRANT_HOME.
    copy = _copy_vagrant_dir(tmp_path)
    env = {
        **os.environ,
        "VAGRANT_HOME": str(tmp_path / "vagrant-home"),
        "VAGRANT_CHECKPOINT_DISABLE": "1",
    }
    # No provider (VirtualBox, libvirt) is installed where the tests run.
    done = subprocess.run(
        ["vagrant", "validate", "--ignore-provider"],
        cwd=copy, env=env, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert "validated successfully" in done.stdout
    for machine in MACHINES:
        assert f"{machine}: " in done.stdout


# Loads the Vagrantfile with Vagrant.configure stubbed out, then runs its token trigger
# against a fake controller VM holding TOKENS (JSON: guest path -> content).
_TRIGGER_HARNESS = """
require "json"
module Vagrant
  def self.configure(_version); end
end
load ARGV[0]

class FakeUI
  attr_reader :lines
  def initialize; @lines = []; end
  def info(message); @lines << "info: #{message}"; end
  def warn(message); @lines << "warn: #{message}"; end
end

class FakeCommunicator
  def initialize(files); @files = files; end
  def sudo(command, opts = {})
    raise "error_check must be off" unless opts[:error_check] == false
    content = @files[command.delete_prefix("cat ")]
    return 1 if content.nil?
    yield :stdout, content
    0
  end
end

FakeMachine = Struct.new(:communicate, :ui)
ui = FakeUI.new
fetch_tokens(FakeMachine.new(FakeCommunicator.new(JSON.parse(ARGV[1])), ui))
puts ui.lines
"""


def test_vagrantfile_trigger_copies_each_token_to_its_own_directory(tmp_path: Path) -> None:
    if shutil.which("ruby") is None:
        pytest.skip("ruby is not installed (vagrant brings it)")
    copy = _copy_vagrant_dir(tmp_path)
    harness = tmp_path / "harness.rb"
    harness.write_text(_TRIGGER_HARNESS)
    tokens = {"/var/lib/bulkhead/enrollment/web.token": "T-web\n"}  # none for db

    done = subprocess.run(
        ["ruby", str(harness), str(copy / "Vagrantfile"), json.dumps(tokens)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip

    assert done.returncode == 0, done.stderr
    web = copy / ".tokens" / "web"
    assert (web / "token").read_text() == "T-web\n"
    assert (web / "token").stat().st_mode & 0o777 == 0o600
    assert web.stat().st_mode & 0o777 == 0o700
    assert not (copy / ".tokens" / "db").exists()
    assert "warn: no enrollment token for db on the controller" in done.stdout


def test_vagrantfile_addresses_are_in_the_benchmark_range() -> None:
    text = (VAGRANT_DIR / "Vagrantfile").read_text()
    addresses = {ipaddress.ip_address(a) for a in re.findall(r"\b\d+\.\d+\.\d+\.\d+\b", text)}
    netmasks = {ipaddress.ip_address("255.255.255.0")}
    hosts = addresses - netmasks
    assert len(hosts) >= len(MACHINES)
    assert all(address in BENCHMARK_NETWORK for address in hosts), sorted(map(str, hosts))


@pytest.mark.parametrize("script", SCRIPTS)
def test_script_is_valid_bash(script: str) -> None:
    done = subprocess.run(
        ["bash", "-n", str(VAGRANT_DIR / script)],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize("script", SCRIPTS)
def test_script_is_shellcheck_clean(script: str) -> None:
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck is not installed")
    done = subprocess.run(
        ["shellcheck", "-x", str(VAGRANT_DIR / script)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout


def _run_script(script: str, root: Path, **settings: str) -> subprocess.CompletedProcess[str]:
    env = {"PATH": os.environ["PATH"], "ROOT": str(root), "SYSTEMCTL": "false", **settings}
    return subprocess.run(
        ["bash", str(VAGRANT_DIR / script)],
        env=env, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("workloads", "named"),
    [
        ("", "WORKLOADS is empty"),
        ("web", "WORKLOADS: 'web' is not NAME:LABELS"),
        ("Web:app=web", "WORKLOADS: 'Web:app=web' is not NAME:LABELS"),
        ("../x:app=web", "WORKLOADS: '../x:app=web' is not NAME:LABELS"),
        ("web:", "WORKLOADS: 'web:' is not NAME:LABELS"),
    ],
)
def test_controller_script_refuses_bad_workloads(
    tmp_path: Path, workloads: str, named: str
) -> None:
    done = _run_script("provision-controller.sh", tmp_path, WORKLOADS=workloads)

    assert done.returncode == 1
    assert f"error: {named}" in done.stderr
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_controller_script_refuses_a_missing_policy(tmp_path: Path) -> None:
    done = _run_script(
        "provision-controller.sh", tmp_path, WORKLOADS="web:app=web", POLICY="/nonexistent.yaml"
    )

    assert done.returncode == 1
    assert "error: POLICY: /nonexistent.yaml does not exist" in done.stderr
    assert list(tmp_path.iterdir()) == []


def test_agent_script_needs_the_controller(tmp_path: Path) -> None:
    done = _run_script("provision-agent.sh", tmp_path, AGENT_ID="web", TOKEN_FILE="/dev/null")

    assert done.returncode == 1
    assert "error: CONTROLLER is empty" in done.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("token_file", ["", "missing.token", "empty.token"])
def test_agent_script_needs_a_token_until_enrolled(tmp_path: Path, token_file: str) -> None:
    files = tmp_path / "files"
    files.mkdir()
    (files / "empty.token").write_text("")
    root = tmp_path / "root"
    root.mkdir()

    done = _run_script(
        "provision-agent.sh", root, CONTROLLER="198.18.7.10:50151", AGENT_ID="web",
        TOKEN_FILE=str(files / token_file) if token_file else "",
    )  # fmt: skip

    assert done.returncode == 1
    assert "error: TOKEN_FILE: " in done.stderr
    assert "has not enrolled yet" in done.stderr
    assert list(root.iterdir()) == []
