"""See before you block, end to end in the namespace lab: flows name processes and
workloads, short connections and drops are reported, visibility mode records would-deny,
`bulkhead suggest` yields exactly the observed access, `bulkhead map` draws it.

One lab (nftables; the lab's agents start in visibility mode) carries the scenario in
order: observe, suggest, apply and enforce, check. A server named `bh-db-server` listens
on db:5432 and db:5433; a client named `bh-web-client` on web connects for 0.3 s.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from lab.lifecycle import add_listener, down, up
from lab.spec import parse_host_specs
from lab.state import LabPaths
from tests.integration.labfixture import Lab, lab_unavailable

pytestmark = pytest.mark.integration

WAIT_S = 20.0  # flows are reported every 2 s; this only bounds a failure
SERVER_PORTS = (5432, 5433)
# Named processes (prctl PR_SET_NAME), so the flows can be checked by name.
SERVER = """
import ctypes, select, socket, sys, time
ctypes.CDLL(None).prctl(15, b"bh-db-server", 0, 0, 0)
listeners = []
for port in (5432, 5433):
    s = socket.socket(socket.AF_INET6)
    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("::", port))
    s.listen(64)
    listeners.append(s)
print("ready", flush=True)
deadline = time.monotonic() + 300
while time.monotonic() < deadline:
    for s in select.select(listeners, [], [], 0.5)[0]:
        s.accept()[0].close()
"""
CLIENT = """
import ctypes, socket, sys, time
ctypes.CDLL(None).prctl(15, b"bh-web-client", 0, 0, 0)
try:
    c = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=1.0)
    time.sleep(0.3)  # a connection that lives well under a second
    c.close()
    print("connected")
except OSError:
    print("blocked")
"""


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    reason = lab_unavailable()
    if reason:
        pytest.skip(reason)
    directory = tmp_path_factory.mktemp("observe") / "lab"
    server: subprocess.Popen[str] | None = None
    try:
        up(
            directory,
            parse_host_specs(["web:app=web", "db:app=db"]),
            mode="visibility",
            dataplane="nftables",
        )
        add_listener(directory, "web", [80], udp=False)
        lab = Lab(directory)
        server = subprocess.Popen(
            ["ip", "netns", "exec", lab.state.host("db").netns, sys.executable, "-c", SERVER],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert server.stdout is not None
        assert server.stdout.readline().strip() == "ready"
        yield lab
    finally:
        if server is not None:
            server.kill()
            server.wait(timeout=30)
        import shutil

        shutil.copytree(directory / "logs", "/tmp/bh-observe-logs", dirs_exist_ok=True)
        down(directory)


def client(lab: Lab, port: int) -> str:
    db = lab.state.host("db").ipv4
    return lab.netns_run("web", sys.executable, "-c", CLIENT, db, str(port)).strip()


def flows(lab: Lab, *args: str) -> list[dict[str, Any]]:
    data = json.loads(lab.ok("flows", "-o", "json", *args))
    return list(data.get("flows", []))


def wait_for_flow(lab: Lab, match: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
    deadline = time.monotonic() + WAIT_S
    seen: list[dict[str, Any]] = []
    while time.monotonic() < deadline:
        seen = flows(lab)
        found = [f for f in seen if match(f)]
        if found:
            return found[0]
        time.sleep(0.5)
    raise AssertionError(f"no such flow within {WAIT_S:g} s; flows: {json.dumps(seen, indent=1)}")


def between(port: int, verdict: str, source: str = "web", destination: str = "db") -> Any:
    def match(flow: dict[str, Any]) -> bool:
        return (
            flow["source"].get("workload") == source
            and flow["destination"].get("workload") == destination
            and flow.get("port") == port
            and flow.get("verdict") == verdict
        )

    return match


def set_mode(lab: Lab, host: str, mode: str) -> None:
    path = LabPaths(lab.directory).agent_config(host)
    config = yaml.safe_load(path.read_text())
    config["mode"] = mode
    temporary = path.with_suffix(".tmp")
    temporary.write_text(yaml.safe_dump(config))
    os.replace(temporary, path)  # the agent's watcher sees one complete file


def test_1_visibility_records_would_deny_with_both_processes_and_lets_it_through(
    lab: Lab,
) -> None:
    assert client(lab, 5432) == "connected", "visibility mode must not drop"
    would_deny = between(5432, "VERDICT_WOULD_DENY")
    # Both agents report their end; wait until both ends are in.
    flow = wait_for_flow(
        lab,
        lambda f: would_deny(f) and f["source"].get("process") and f["destination"].get("process"),
    )
    assert flow["source"]["process"] == "bh-web-client"
    assert flow["destination"]["process"] == "bh-db-server"
    assert flow["protocol"] == "tcp"
    assert flow["source"]["labels"] == {"app": "web"}
    assert flow["destination"]["address"] == lab.state.host("db").ipv4
    table = lab.ok("flows", "--workload", "db")
    assert "bh-db-server" in table
    assert "would-deny" in table


def test_2_connections_shows_the_named_listener_with_its_process(lab: Lab) -> None:
    data = json.loads(lab.ok("connections", "db", "-o", "json"))
    listening = [
        c
        for c in data["connections"]
        if c.get("direction") == "FLOW_DIRECTION_LISTEN" and c.get("local_port") == 5432
    ]
    assert listening, data
    assert listening[0]["process"]["name"] == "bh-db-server"
    assert listening[0]["process"]["user"] == "root"
    assert listening[0]["process"]["pid"] > 0


def test_3_the_map_is_an_svg_naming_the_workloads(lab: Lab, tmp_path: Path) -> None:
    target = tmp_path / "map.svg"
    lab.ok("map", "-o", str(target), "--group-by", "app")
    root = ET.fromstring(target.read_text())  # well-formed XML
    assert root.tag.endswith("svg")
    text = " ".join(t for t in root.itertext())
    assert "web" in text
    assert "db" in text
    assert "tcp/5432" in text


def test_4_suggested_policy_allows_exactly_what_was_observed(lab: Lab) -> None:
    suggestion = lab.ok("suggest", "--group-by", "app")
    documents = list(yaml.safe_load_all(suggestion))
    rules = [rule for doc in documents for rule in doc["spec"]["rules"]]
    assert {"from": {"app": "web"}, "to": {"app": "db"}, "ports": ["tcp/5432"]} in rules
    lab.ok("apply", "-f", "-", stdin=suggestion)
    for host in ("web", "db"):
        set_mode(lab, host, "enforce")
    lab.wait_in_sync(timeout=30)
    assert lab.probe_until("web", "db", 5433, want=False, within=10) is not None
    assert client(lab, 5432) == "connected"
    assert client(lab, 5433) == "blocked"
    assert not lab.probe("db", "web", 80)


def test_5_a_blocked_connection_is_reported_denied_with_source_and_port(lab: Lab) -> None:
    assert client(lab, 5433) == "blocked"
    flow = wait_for_flow(lab, between(5433, "VERDICT_DENIED"))
    assert flow["source"]["address"] == lab.state.host("web").ipv4
    assert int(flow["count"]) >= 1
    denied = flows(lab, "--denied", "--since", "1m")
    assert denied
    assert all(f["verdict"] in ("VERDICT_DENIED", "VERDICT_WOULD_DENY") for f in denied)


def test_6_agents_serve_prometheus_metrics(lab: Lab) -> None:
    fetch = "import urllib.request; print(urllib.request.urlopen(sys.argv[1]).read().decode())"
    url = "http://127.0.0.1:9471/metrics"
    text = lab.netns_run("web", sys.executable, "-c", "import sys; " + fetch, url)
    assert "bulkhead_agent_connections_seen_total" in text
    assert "bulkhead_agent_apply_seconds_count" in text
    console = lab.state.controller.rpartition(":")[0]
    with urllib.request.urlopen(f"http://{console}:9470/metrics", timeout=10) as answer:
        controller = answer.read().decode()
    assert "bulkhead_controller_connected_agents 2.0" in controller
    flows_received = [
        line
        for line in controller.splitlines()
        if line.startswith("bulkhead_controller_flows_received_total ")
    ]
    assert flows_received
    assert float(flows_received[0].split()[1]) > 0
