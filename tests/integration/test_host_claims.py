"""In the lab, with real traffic: a host that puts another agent's address on its own
interface gains nothing with it (issue 17). Three hosts: web (app=web), db (app=db),
other (app=other); web may reach db:5432."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from lab.lifecycle import add_listener, down, up
from lab.spec import parse_host_specs
from tests.integration.labfixture import Lab, lab_unavailable

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    reason = lab_unavailable()
    if reason:
        pytest.skip(reason)
    directory = tmp_path_factory.mktemp("claims") / "lab"
    try:
        up(directory, parse_host_specs(["web:app=web", "db:app=db", "other:app=other"]))
        add_listener(directory, "db", [5432], udp=False)
        yield Lab(directory)
    finally:
        down(directory)


def agent(lab: Lab, agent_id: str) -> dict[str, Any]:
    detail: dict[str, Any] = json.loads(lab.ok("describe", "agent", agent_id, "-o", "json"))
    return detail


def interface_of(lab: Lab, host: str, address: str) -> str:
    for link in json.loads(lab.netns_run(host, "ip", "-j", "-4", "addr", "show")):
        if any(info.get("local") == address for info in link.get("addr_info", [])):
            return str(link["ifname"])
    raise AssertionError(f"{address} is on no interface of {host}")


def db_set_elements(lab: Lab) -> set[str]:
    """Every element of every set in db's kernel table."""
    found: set[str] = set()
    for item in lab.nft_table("db")["nftables"]:  # type: ignore[attr-defined]
        for element in item.get("set", {}).get("elem", []):
            found.add(json.dumps(element) if not isinstance(element, str) else element)
    return found


def test_a_host_that_takes_another_agents_address_gains_nothing(lab: Lab) -> None:
    lab.ok("apply", "-f", str(ROOT / "examples" / "web-db.yaml"))
    lab.wait_in_sync()
    web, other = lab.state.host("web"), lab.state.host("other")
    assert lab.probe("web", "db", 5432)
    assert web.ipv4 in db_set_elements(lab)
    assert other.ipv4 not in db_set_elements(lab)
    # The compromised web host puts other's address on its interface: the agent reports
    # it, and before issue 17 db's allowed sources grew by it.
    device = interface_of(lab, "web", web.ipv4)
    lab.netns_run("web", "ip", "addr", "add", f"{other.ipv4}/32", "dev", device)
    try:
        deadline = time.monotonic() + 10
        refused: list[dict[str, str]] = []
        while time.monotonic() < deadline and not refused:
            refused = agent(lab, "web")["summary"].get("refused_addresses", [])
            time.sleep(0.1)
        assert refused == [{"address": other.ipv4, "reason": "held by agent other"}]
        assert other.ipv4 not in agent(lab, "web")["summary"]["addresses"]
        shown = lab.ok("describe", "agent", "web")
        assert f"{other.ipv4}: held by agent other" in shown
        lab.wait_in_sync()
        # db's kernel set still admits web's own address only, so a connection web opens
        # from the stolen address is dropped at db ...
        assert web.ipv4 in db_set_elements(lab)
        assert other.ipv4 not in db_set_elements(lab)
        with pytest.raises(OSError, match="timed out"):
            lab.connect("web", "db", 5432, bind=other.ipv4, timeout=1.0).close()
        # ... while web keeps what it had, and other loses nothing either.
        assert lab.probe("web", "db", 5432)
        assert agent(lab, "other")["summary"]["addresses"][0] == other.ipv4
    finally:
        lab.netns_run("web", "ip", "addr", "del", f"{other.ipv4}/32", "dev", device, check=False)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and agent(lab, "web")["summary"].get("refused_addresses"):
        time.sleep(0.1)
    assert not agent(lab, "web")["summary"].get("refused_addresses"), "refusal not lifted"
