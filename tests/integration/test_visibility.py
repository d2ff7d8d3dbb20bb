"""Visibility mode end to end: the same lab and policy as enforce mode, nothing dropped."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from lab.lifecycle import add_listener, down, up
from lab.spec import parse_host_specs
from tests.integration.labfixture import Lab, lab_unavailable

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module", params=["nftables", "iptables"])
def lab(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    reason = lab_unavailable()
    if reason:
        pytest.skip(reason)
    directory = tmp_path_factory.mktemp(f"vis-{request.param}") / "lab"
    try:
        up(
            directory,
            parse_host_specs(["web:app=web", "db:app=db"]),
            mode="visibility",
            dataplane=request.param,
        )
        add_listener(directory, "db", [5432, 5433], udp=False)
        add_listener(directory, "web", [80], udp=False)
        yield Lab(directory)
    finally:
        down(directory)


def test_visibility_mode_drops_nothing_but_counts_would_deny(lab: Lab) -> None:
    lab.ok("apply", "-f", str(ROOT / "examples" / "web-db.yaml"))
    lab.wait_in_sync()
    assert lab.probe("web", "db", 5432)
    assert lab.probe("web", "db", 5433), "visibility mode must not drop a denied port"
    assert lab.probe("db", "web", 80)
    assert lab.probe("web", "db", 5433, ipv6=True)
    assert lab.would_deny_packets("db") > 0, "the denied-but-allowed connections were not counted"
