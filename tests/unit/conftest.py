"""Fixtures the unit tests of several modules share."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.dataplane.iptables.plan import Family


@pytest.fixture
def names_files(tmp_path: Path) -> dict[Family, Path]:
    """The kernel's lists of loaded legacy tables (/proc/net/ip*_tables_names), as the
    iptables backend reads them: filter and security loaded in both families."""
    files: dict[Family, Path] = {4: tmp_path / "ip_tables_names", 6: tmp_path / "ip6_tables_names"}
    for path in files.values():
        path.write_text("filter\nsecurity\n")
    return files
