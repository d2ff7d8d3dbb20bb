"""Flows an agent observed while its controller was away survive the agent's restart.

In the namespace lab (nftables, visibility mode): the controller is stopped, a named
client on web connects to db:5432, web's agent is stopped (SIGTERM) or dies (SIGKILL)
with the flow still queued, and only then do the controller and web's agent start
again. The flow must reach the controller with web's end (its process name), which only
web's agent knows.
"""

from __future__ import annotations

import base64
import json
import signal
import time
from collections.abc import Iterator

import pytest

from agent.observe.saved_flows import FLOWS_FILE
from bulkhead.v1 import agent_pb2
from lab import control
from lab.lifecycle import add_listener, down, up
from lab.spec import parse_host_specs
from lab.state import LabPaths
from tests.integration.labfixture import Lab, lab_unavailable
from tests.integration.test_observation import between, client, wait_for_flow

pytestmark = pytest.mark.integration

OBSERVED_WITHIN_S = 10.0  # bounds the wait for web's agent to count the connection


@pytest.fixture
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    reason = lab_unavailable()
    if reason:
        pytest.skip(reason)
    directory = tmp_path_factory.mktemp("saved-flows") / "lab"
    try:
        up(directory, parse_host_specs(["web:app=web", "db:app=db"]), mode="visibility")
        add_listener(directory, "db", [5432], udp=False)
        yield Lab(directory)
    finally:
        down(directory)


def saved_peers(lab: Lab) -> set[str]:
    """The peer addresses of every flow in web's saved flows file (reports and queue)."""
    path = LabPaths(lab.directory).agent_dir("web") / "state" / FLOWS_FILE
    if not path.exists():
        return set()
    payload = json.loads(path.read_bytes())
    encoded = [*payload["reports"], payload["queued"]]
    reports = [agent_pb2.FlowReport.FromString(base64.b64decode(text)) for text in encoded]
    return {flow.peer_address for report in reports for flow in report.flows}


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["stopped", "killed"])
def test_flows_queued_when_the_agent_stops_are_reported_after_its_restart(
    lab: Lab, sig: signal.Signals
) -> None:
    db = lab.state.host("db").ipv4
    control.stop(lab.directory, "controller")
    assert client(lab, 5432) == "connected"
    # Counted by web's agent: its periodic save puts it in the file within a few seconds.
    deadline = time.monotonic() + OBSERVED_WITHIN_S
    while db not in saved_peers(lab) and time.monotonic() < deadline:
        time.sleep(0.25)
    control.stop(lab.directory, "web", sig=sig)  # SIGTERM: it saves on its way out too
    assert db in saved_peers(lab)

    control.start(lab.directory, "controller")
    control.start(lab.directory, "web")
    flow = wait_for_flow(
        lab,
        lambda f: (
            between(5432, "VERDICT_WOULD_DENY")(f) and f["source"].get("process") == "bh-web-client"
        ),
    )
    assert flow["destination"]["address"] == db
