"""The zero-trust control plane in the lab: agents enrolled with tokens, mTLS only,
revocation, audit. Two hosts: web (app=web) and db (app=db)."""

from __future__ import annotations

import json
import stat
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from lab.lifecycle import add_listener, down, up
from lab.spec import parse_host_specs
from lab.state import LabPaths
from tests.integration.labfixture import Lab, lab_unavailable

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    reason = lab_unavailable()
    if reason:
        pytest.skip(reason)
    directory = tmp_path_factory.mktemp("zt") / "lab"
    try:
        up(directory, parse_host_specs(["web:app=web", "db:app=db"]))
        add_listener(directory, "db", [5432, 5433], udp=False)
        yield Lab(directory)
    finally:
        down(directory)


def test_agents_enrolled_with_private_credentials(lab: Lab) -> None:
    for host in ("web", "db"):
        state = LabPaths(lab.directory).agent_dir(host) / "state"
        assert stat.S_IMODE(state.stat().st_mode) == 0o700
        for name in ("agent.key", "agent.crt", "ca.crt", "agent.validity"):
            assert stat.S_IMODE((state / name).stat().st_mode) == 0o600, name
    agents = json.loads(lab.ok("get", "agents", "-o", "json"))["agents"]
    assert {a["agent_id"] for a in agents} == {"web", "db"}
    assert all(a["certificate_not_after_unix_ms"] > time.time() * 1000 for a in agents)


FRONTEND_TO_DB = """
apiVersion: bulkhead/v1
kind: Policy
metadata: {name: frontend-to-db}
spec:
  rules:
    - from: {tier: frontend}
      to: {app: db}
      ports: [tcp/5433]
"""


def test_a_label_the_host_gives_itself_opens_nothing_until_an_operator_accepts_it(
    lab: Lab,
) -> None:
    # The host may report labels the operator did not set (app came with web's token); a
    # policy keyed on such a label ignores it until an operator accepts it.
    lab.ok("apply", "-f", "-", stdin=FRONTEND_TO_DB)
    lab.wait_in_sync()
    assert not lab.probe("web", "db", 5433)
    drop_ins = LabPaths(lab.directory).agent_config("web").parent / "labels.d"
    drop_ins.mkdir()
    (drop_ins / "10-tier.yaml").write_text("tier: frontend\n")
    try:
        deadline = time.monotonic() + 10
        reported: dict[str, str] = {}
        while time.monotonic() < deadline and "tier" not in reported:
            detail = json.loads(lab.ok("describe", "agent", "web", "-o", "json"))
            reported = detail["summary"].get("reported_labels", {})
            time.sleep(0.1)
        assert reported.get("tier") == "frontend", "the controller never saw the drop-in"
        assert "tier" not in detail["summary"]["labels"]
        lab.wait_in_sync()
        assert lab.probe_until("web", "db", 5433, want=True, within=2.0) is None, (
            "a label the host gave itself opened db:5433"
        )
        shown = " ".join(lab.ok("describe", "agent", "web").split())  # as wrapped for 80 columns
        assert "not used until accepted: tier=frontend" in shown, shown
        lab.ok("label", "agent", "web", "--accept-reported")
        took = lab.probe_until("web", "db", 5433, want=True, within=2.0)
        assert took is not None, "web had no access 2 s after the operator accepted tier"
        print(f"\naccepted label -> enforced in {took:.3f} s")
    finally:
        (drop_ins / "10-tier.yaml").unlink()
    # Accepted, it is the operator's: the host dropping it changes nothing; the operator can.
    lab.ok("label", "agent", "web", "tier-")
    assert lab.probe_until("web", "db", 5433, want=False, within=3.0) is not None
    lab.ok("delete", "policy", "frontend-to-db")
    lab.wait_in_sync()


def test_revoked_agent_is_cut_cannot_return_and_its_host_stays_closed(lab: Lab) -> None:
    lab.ok("apply", "-f", str(ROOT / "examples" / "web-db.yaml"))
    lab.wait_in_sync()
    assert lab.probe("web", "db", 5432)
    lab.ok("agent", "revoke", "db")
    revoked_at = time.monotonic()
    cut_after = None
    while time.monotonic() - revoked_at < 3:
        db = next(
            a
            for a in json.loads(lab.ok("get", "agents", "-o", "json"))["agents"]
            if a["agent_id"] == "db"
        )
        if not db["connected"]:
            cut_after = time.monotonic() - revoked_at
            break
        time.sleep(0.05)
    assert cut_after is not None, "the revoked agent kept its stream"
    assert cut_after < 1.0 + 0.5, f"cut after {cut_after:.2f} s (CLI start included)"
    assert db["revoked"]
    time.sleep(2.0)  # the agent retries with backoff; none of its attempts may succeed
    db = next(
        a
        for a in json.loads(lab.ok("get", "agents", "-o", "json"))["agents"]
        if a["agent_id"] == "db"
    )
    assert not db["connected"]
    # Its peers stop trusting it: web's egress set no longer holds db's address.
    assert lab.probe_until("web", "db", 5432, want=False, within=2.0) is not None
    # And db fails closed: it keeps enforcing its last policy without its controller.
    assert not lab.probe("ops", "db", 5433)
    assert lab.rules_present("db")


def test_audit_names_the_operator(lab: Lab) -> None:
    entries = json.loads(lab.ok("audit", "-o", "json"))["entries"]
    seen = {(e["actor"], e["action"]) for e in entries}
    assert ("operator:lab-admin", "token.created") in seen
    assert ("agent:web", "agent.enrolled") in seen
    assert ("operator:lab-admin", "policy.created") in seen
    assert ("operator:lab-admin", "agent.revoked") in seen
