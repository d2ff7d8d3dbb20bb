"""`bulkhead-agent install-service --root DIR`: the files a host needs, and nothing on bad input."""

from __future__ import annotations

import stat
import tomllib
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from agent.config import load_config
from agent.install import parse_labels
from agent.main import main

REPO = Path(__file__).resolve().parents[2]
CONFIG = "etc/bulkhead/agent.yaml"
UNIT = "etc/systemd/system/bulkhead-agent.service"
STATE = "var/lib/bulkhead/agent"
PROGRAM = "opt/bulkhead/venv/bin/bulkhead-agent"
GOOD = ["--controller", "198.18.0.1:50151", "--agent-id", "web-1"]


def install(root: Path, *args: str) -> Result:
    return CliRunner().invoke(main, ["install-service", "--root", str(root), *args])


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_installs_config_unit_and_state_dir_below_root(tmp_path: Path) -> None:
    result = install(tmp_path, *GOOD, "--token", "tok-123", "--labels", "app=web, env=prod")
    assert result.exit_code == 0, result.output
    config = load_config(tmp_path / CONFIG)  # exactly as the agent will read it
    assert (config.agent_id, config.controller) == ("web-1", "198.18.0.1:50151")
    assert config.token == "tok-123"
    assert config.labels == {"app": "web", "env": "prod"}
    assert mode(tmp_path / CONFIG) == 0o600  # it holds the enrollment token
    assert (tmp_path / UNIT).read_text() == (REPO / "systemd/bulkhead-agent.service").read_text()
    assert mode(tmp_path / UNIT) == 0o644
    assert (tmp_path / STATE).is_dir()
    assert mode(tmp_path / STATE) == 0o700
    assert f"systemctl --root={tmp_path} enable bulkhead-agent" in result.stdout
    assert "systemctl daemon-reload && systemctl enable --now bulkhead-agent" in result.stdout
    # The unit's program is not in this tree yet: say so.
    assert f"/{PROGRAM}, which does not exist" in result.stderr


def test_no_warning_once_the_program_is_there(tmp_path: Path) -> None:
    program = tmp_path / PROGRAM
    program.parent.mkdir(parents=True)
    program.write_text("#!/bin/sh\n")
    result = install(tmp_path, *GOOD)
    assert result.exit_code == 0, result.output
    assert result.stderr == ""


def test_existing_config_is_kept_unless_forced(tmp_path: Path) -> None:
    assert install(tmp_path, *GOOD).exit_code == 0
    other = ["--controller", "198.18.0.2:50151", "--agent-id", "web-2"]
    kept = install(tmp_path, *other)
    assert kept.exit_code == 0, kept.output
    assert "--force replaces it" in kept.stdout
    assert load_config(tmp_path / CONFIG).agent_id == "web-1"
    # Re-running without arguments refreshes the unit and keeps the config.
    (tmp_path / UNIT).write_text("stale")
    assert install(tmp_path).exit_code == 0
    assert (tmp_path / UNIT).read_text().startswith("# Bulkhead agent")
    forced = install(tmp_path, *other, "--force")
    assert forced.exit_code == 0, forced.output
    assert load_config(tmp_path / CONFIG).agent_id == "web-2"
    assert mode(tmp_path / CONFIG) == 0o600


def test_a_kept_config_the_agent_would_refuse_is_reported(tmp_path: Path) -> None:
    (tmp_path / CONFIG).parent.mkdir(parents=True)
    (tmp_path / CONFIG).write_text("agent_id: web-1\n")
    result = install(tmp_path)
    assert result.exit_code == 0, result.output
    assert "controller: Field required" in result.stderr


@pytest.mark.parametrize(
    ("args", "complaint"),
    [
        (["--controller", "controller.example:50151", "--agent-id", "web-1"], "--controller:"),
        (["--controller", "198.18.0.1:50151", "--agent-id", "Web 1"], "--agent-id:"),
        ([*GOOD, "--labels", "app"], "--labels: 'app' is not KEY=VALUE"),
        ([*GOOD, "--labels", "app=web,app=db"], "--labels: 'app' given twice"),
        ([*GOOD, "--labels", "app=we b"], "--labels:"),
        (["--token", "tok-123"], "--controller: needed with --token"),
        ([], "--controller: needed to write"),
    ],
)
def test_bad_input_names_the_option_and_writes_nothing(
    tmp_path: Path, args: list[str], complaint: str
) -> None:
    root = tmp_path / "image"
    result = install(root, *args)
    assert result.exit_code != 0
    assert complaint in result.stderr
    assert not root.exists()


def test_labels_parse_and_skip_empty_items() -> None:
    assert parse_labels("") == {}
    assert parse_labels("app=web,,tier=") == {"app": "web", "tier": ""}


def test_the_unit_is_package_data_so_installs_from_a_wheel_have_it() -> None:
    # The installer reads agent/units/ from the installed package; a wheel carries
    # non-Python files only when pyproject.toml lists them.
    setuptools = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert "units/*.service" in setuptools["package-data"].get("agent", [])
