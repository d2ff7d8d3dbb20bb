"""The whole lab with the real controller, agents and `bulkhead` CLI: the README demo.

Brings up web, db and other in enforce mode, applies examples/web-db.yaml through
`bulkhead apply -f`, and checks every probe against the policy (see lab/demo.py).
"""

from __future__ import annotations

import importlib.util
import io
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from rich.console import Console

from lab import topology
from lab.demo import DEFAULT_POLICY, run_demo
from lab.iproute import link_exists
from lab.lifecycle import down

_PROGRAMS = ("agent.main", "controller.server.main", "controller.cli.main")


def _unavailable() -> str | None:
    if os.geteuid() != 0:
        return "needs root to create network namespaces"
    missing = [name for name in _PROGRAMS if importlib.util.find_spec(name) is None]
    if missing:
        return f"programs not written yet: {', '.join(missing)}"
    if topology.find_lab_namespaces() or link_exists(topology.UPLINK):
        return "a bulkhead-lab lab is up on this machine; not touching it"
    return None


pytestmark = pytest.mark.integration


@pytest.fixture
def lab_dir(tmp_path: Path) -> Iterator[Path]:
    reason = _unavailable()
    if reason:
        pytest.skip(reason)
    directory = tmp_path / "lab"
    try:
        yield directory
    finally:
        down(directory)


def test_demo_probes_match_the_web_to_db_policy(lab_dir: Path) -> None:
    output = io.StringIO()
    console = Console(file=output, width=120)

    matched = run_demo(lab_dir, policy=DEFAULT_POLICY, keep=False, console=console)

    assert matched, output.getvalue()
    assert "MISMATCH" not in output.getvalue()
    assert not lab_dir.exists()
    assert topology.find_lab_namespaces() == []
