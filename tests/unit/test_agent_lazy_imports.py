"""What an idle agent keeps out of memory: prometheus_client unless `metrics_listen` is set.

Module checks run in a fresh interpreter: this one has prometheus_client loaded already."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest

from agent.identity import AgentCredentials, generate_key, key_pem, make_csr, save_credentials
from controller.pki import CertificateAuthority, cert_pem

# argv[1]: a config. The steps of `run` that need neither root nor a kernel firewall:
# settings, baseline, metrics, credentials (as at start), the controller link, metrics
# wiring. Prints whether there are metrics and whether prometheus_client got loaded.
IDLE_CODE = """
import asyncio, json, sys
from pathlib import Path
import agent.main
from agent.link import ControllerLink
from agent.reload import host_settings
config, settings = host_settings(Path(sys.argv[1]))
agent.main.build_baseline(config, settings.mode)
metrics = agent.main.open_metrics(config)
asyncio.run(agent.main.obtain_credentials(config))
link = ControllerLink(
    config.controller, agent_id=config.agent_id, state_dir=config.state_dir, enforcer=None,
    make_hello=None, discover=list, heartbeat_interval=config.heartbeat_interval,
    address_poll_interval=config.address_poll_interval,
)
agent.main._start_observing(None, asyncio.new_event_loop(), config, metrics, link)
seen = {"metrics": metrics is not None, "prometheus": "prometheus_client" in sys.modules}
print(json.dumps(seen))
"""

# argv[1]: a config with metrics_listen. One apply through the timed backend, the metrics
# wired as `run` wires them, then one scrape; prints the exposition.
SCRAPE_CODE = """
import asyncio, sys, types, urllib.request
from pathlib import Path
import agent.main
from agent.config import load_config
from bulkhead.v1 import ruleset_pb2
class Kernel:
    def apply(self, ruleset, baseline):
        pass
config = load_config(Path(sys.argv[1]))
metrics = agent.main.open_metrics(config)
metrics.timed(Kernel()).apply(ruleset_pb2.Ruleset(), agent.main.build_baseline(config))
link = types.SimpleNamespace(flows_reported=7)
agent.main._start_observing(None, asyncio.new_event_loop(), config, metrics, link)
url = f"http://{config.metrics_listen}/metrics"
print(urllib.request.urlopen(url, timeout=10).read().decode())
"""


def fresh_python(code: str, *args: str) -> str:
    done = subprocess.run(
        [sys.executable, "-c", code, *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.fixture
def ca(tmp_path_factory: pytest.TempPathFactory) -> CertificateAuthority:
    return CertificateAuthority.load_or_create(tmp_path_factory.mktemp("pki") / "ca")


@pytest.fixture
def state(ca: CertificateAuthority, tmp_path: Path) -> Path:
    """An enrolled agent's state dir."""
    key = generate_key()
    cert = ca.issue_agent(make_csr(key, "web-1"), "web-1", timedelta(days=30))
    directory = tmp_path / "state"
    save_credentials(directory, AgentCredentials(key_pem(key), cert_pem(cert), ca.certificate_pem))
    return directory


def config_file(tmp_path: Path, state: Path, metrics_listen: str | None = None) -> Path:
    config = {"agent_id": "web-1", "controller": "198.18.0.1:50151", "state_dir": str(state)}
    if metrics_listen is not None:
        config["metrics_listen"] = metrics_listen
    path = tmp_path / "agent.yaml"
    path.write_text(json.dumps(config))  # JSON is YAML
    return path


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


def idle_agent(config: Path) -> dict[str, object]:
    seen: dict[str, object] = json.loads(fresh_python(IDLE_CODE, str(config)))
    return seen


def test_an_idle_agent_without_metrics_does_not_load_prometheus_client(
    state: Path, tmp_path: Path
) -> None:
    seen = idle_agent(config_file(tmp_path, state))

    assert seen == {"metrics": False, "prometheus": False}


def test_with_metrics_configured_prometheus_client_is_loaded(state: Path, tmp_path: Path) -> None:
    seen = idle_agent(config_file(tmp_path, state, f"127.0.0.1:{free_port()}"))

    assert seen == {"metrics": True, "prometheus": True}


def test_configured_metrics_are_served_with_the_apply_histogram(
    state: Path, tmp_path: Path
) -> None:
    exposition = fresh_python(
        SCRAPE_CODE, str(config_file(tmp_path, state, f"127.0.0.1:{free_port()}"))
    )

    lines = exposition.splitlines()
    assert "bulkhead_agent_apply_seconds_count 1.0" in lines
    assert "bulkhead_agent_flows_reported_total 7.0" in lines
