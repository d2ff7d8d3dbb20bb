"""`bulkhead-lab` rejects bad input with one clear line and a non-zero exit, changing nothing."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from lab.errors import SpecError
from lab.listener import banner
from lab.main import main
from lab.probe import probe_tcp_address


@pytest.fixture
def lab_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    directory = tmp_path / "lab"
    monkeypatch.setenv("BULKHEAD_LAB_DIR", str(directory))
    return directory


def test_bad_host_spec_exits_1_with_one_line_and_creates_nothing(lab_dir: Path) -> None:
    result = CliRunner().invoke(main, ["up", "--host", "web:app", "--no-daemons"])
    assert result.exit_code == 1
    assert result.output == "bulkhead-lab: --host 'web:app': label 'app' is not key=value\n"
    assert not lab_dir.exists()


def test_up_without_hosts_is_refused(lab_dir: Path) -> None:
    result = CliRunner().invoke(main, ["up"])
    assert result.exit_code == 1
    assert "--host: give at least one host" in result.output


def test_not_root_is_refused_with_a_hint(lab_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("os.geteuid", lambda: 1000)
    for argv in (["up", "--host", "web"], ["down"], ["status"], ["probe", "a", "b", "1"]):
        result = CliRunner().invoke(main, argv)
        assert result.exit_code == 1, argv
        assert "must run as root" in result.output
        assert "Traceback" not in result.output
    assert not lab_dir.exists()


def test_commands_on_a_lab_that_is_not_up_say_so(lab_dir: Path) -> None:
    for argv in (["status"], ["probe", "web", "db", "5432"], ["listen", "web", "80"]):
        result = CliRunner().invoke(main, argv)
        assert result.exit_code == 1, argv
        assert "no lab is up" in result.output


def test_env_prints_the_controller_address_and_credentials(lab_dir: Path) -> None:
    result = CliRunner().invoke(main, ["env"])
    assert result.exit_code == 0
    assert result.output == (
        "export BULKHEAD_CONTROLLER=198.18.0.1:50151\n"
        f"export BULKHEAD_CREDENTIALS={lab_dir / 'operator'}\n"
    )


@pytest.mark.parametrize("timeout", [0.0, -1.0, 31.0])
def test_probe_timeout_is_bounded(timeout: float) -> None:
    with pytest.raises(SpecError, match="--timeout"):
        probe_tcp_address(None, "198.18.0.99", 1, timeout=timeout)


def test_listener_banner_names_host_port_and_protocol() -> None:
    assert banner("db", 5432, "tcp") == "db:5432/tcp\n"


def test_probes_from_the_root_namespace_never_leave_the_machine() -> None:
    # With no lab up, a lab address routes via the machine's default route: refuse.
    from lab.errors import PlumbingError
    from lab.iproute import link_exists
    from lab.probe import probe_tcp_address
    from lab.topology import UPLINK

    if link_exists(UPLINK):
        pytest.skip("a lab is up; its route is legitimate")
    with pytest.raises(PlumbingError, match="refusing to probe"):
        probe_tcp_address(None, "198.18.0.11", 5433, timeout=0.2)
