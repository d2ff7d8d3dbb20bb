"""What an agent keeps out of memory: prometheus_client unless `metrics_listen` is set,
cryptography always (agent/keytool.py runs it in a child process), pyroute2 always
(agent/netlink/ speaks the few netlink messages the agent needs) and pydantic always
(agent/config_fields.py checks the config).

Module checks run in a fresh interpreter: this one has both loaded already."""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest

from agent.identity import VALIDITY_FILE, load_credentials, save_credentials
from controller.core import Controller
from controller.pki import CertificateAuthority, cert_pem
from tests.pki_support import issued_credentials, with_enrollment_server

# argv[1]: a config. The steps of `run` that need neither root nor a kernel firewall:
# settings, baseline, metrics, credentials (as at start), the host's addresses, the
# controller link, metrics wiring. Prints whether there are metrics and which of the
# libraries the agent keeps out got loaded.
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
agent.main.discover_addresses()
link = ControllerLink(
    config.controller, agent_id=config.agent_id, state_dir=config.state_dir, enforcer=None,
    make_hello=None, discover=list, heartbeat_interval=config.heartbeat_interval,
    address_poll_interval=config.address_poll_interval,
)
agent.main._start_observing(None, asyncio.new_event_loop(), config, metrics, link)
seen = {"metrics": metrics is not None, "prometheus": "prometheus_client" in sys.modules}
seen["cryptography"] = "cryptography" in sys.modules
seen["pyroute2"] = "pyroute2" in sys.modules
seen["pydantic"] = "pydantic" in sys.modules
print(json.dumps(seen))
"""

# argv[1]: a config with an enrollment token. What the agent does with its identity, as
# `run` and the controller link do it: enroll at start, load the credentials (as on each
# connect), then renew: print the CSR, read the certificate for it as a JSON line on stdin,
# store it and load it back. Prints both certificates and whether cryptography got loaded.
IDENTITY_CODE = """
import asyncio, dataclasses, json, sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
import agent.main
from agent.config import load_config
from agent.identity import Validity, load_credentials
from agent.link import ControllerLink
import ssl
contexts = []  # TLS contexts made in this process (grpc's TLS is its own)
making = ssl.SSLContext.__new__
def recording(cls, *args, **kwargs):
    contexts.append(cls)
    return making(cls, *args, **kwargs)
ssl.SSLContext.__new__ = staticmethod(recording)
config = load_config(Path(sys.argv[1]))
enrolled = asyncio.run(agent.main.obtain_credentials(config))
assert load_credentials(config.state_dir) == enrolled
link = ControllerLink(
    config.controller, agent_id=config.agent_id, state_dir=config.state_dir, enforcer=None,
    make_hello=None, discover=list, heartbeat_interval=5, address_poll_interval=2,
)
now = datetime.now(UTC)  # three quarters of its life gone: due for renewal
validity = Validity(now - timedelta(hours=3), now + timedelta(hours=1))
due = dataclasses.replace(enrolled, validity=validity)
async def renew():
    outbox = asyncio.Queue()
    renewals = asyncio.create_task(link._renewals(outbox, due))
    message = await asyncio.wait_for(outbox.get(), 30)
    renewals.cancel()
    print(json.dumps({"csr": message.renew.csr_pem}), flush=True)
    certificate = json.loads(sys.stdin.readline())["certificate"]
    await link._store_renewed(certificate.encode())
asyncio.run(renew())
renewed = load_credentials(config.state_dir)
print(json.dumps({
    "enrolled": enrolled.cert_pem.decode(), "renewed": renewed.cert_pem.decode(),
    "cryptography": "cryptography" in sys.modules, "tls_contexts": len(contexts),
}))
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
    directory = tmp_path / "state"
    save_credentials(directory, issued_credentials(ca, "web-1", timedelta(days=30)))
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

    assert seen == {
        "metrics": False, "prometheus": False, "cryptography": False, "pyroute2": False,
        "pydantic": False,
    }  # fmt: skip


def test_an_agent_does_not_load_pyroute2(state: Path, tmp_path: Path) -> None:
    # Its package imports every module of it (about 9 MB), for two dumps and a delete.
    seen = idle_agent(config_file(tmp_path, state))

    assert seen["pyroute2"] is False


def test_an_agent_does_not_load_pydantic(state: Path, tmp_path: Path) -> None:
    # Its config is checked by hand (agent/config_fields.py): pydantic and pydantic_core
    # were about 15 MB of a running agent's memory.
    seen = idle_agent(config_file(tmp_path, state))

    assert seen["pydantic"] is False


def test_an_agent_on_a_state_dir_of_the_previous_release_does_not_load_cryptography(
    state: Path, tmp_path: Path
) -> None:
    # Releases before the key tool wrote no validity file: the key tool computes it.
    (state / VALIDITY_FILE).unlink()

    seen = idle_agent(config_file(tmp_path, state))

    assert seen["cryptography"] is False
    assert (state / VALIDITY_FILE).exists()


def test_enrolling_at_start_and_renewing_do_not_load_cryptography(tmp_path: Path) -> None:
    state = tmp_path / "state"

    async def body(core: Controller, address: str) -> None:
        token, _ = core.enrollment.create_token({}, 600, 1, actor="operator:t")
        config = {
            "agent_id": "web-1", "controller": "198.18.0.1:50151", "enrollment": address,
            "token": token, "state_dir": str(state),
        }  # fmt: skip
        path = tmp_path / "agent.yaml"
        path.write_text(json.dumps(config))  # JSON is YAML
        ca = CertificateAuthority.load_or_create(tmp_path / "pki")  # the controller's
        # The enrollment server runs on this event loop: the agent talks to it from a thread.
        seen = await asyncio.wait_for(asyncio.to_thread(renewing_agent, path, ca), 120)

        assert seen["cryptography"] is False
        # The key tool reads the certificate the controller presents: a TLS connection
        # of the agent's own left about 1 MB of OpenSSL's pages in it.
        assert seen["tls_contexts"] == 0
        assert seen["enrolled"] != seen["renewed"]
        assert seen["renewed"] == seen["issued"]
        assert load_credentials(state) is not None  # this process checks with cryptography

    with_enrollment_server(tmp_path, body)


def renewing_agent(config: Path, ca: CertificateAuthority) -> dict[str, object]:
    """Run IDENTITY_CODE; answer its CSR with a certificate from CA. What it printed last,
    and the certificate it was given (as "issued")."""
    agent = subprocess.Popen(
        [sys.executable, "-c", IDENTITY_CODE, str(config)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert agent.stdout is not None
        request = agent.stdout.readline()
        assert request, agent.communicate(timeout=10)[1]
        csr = json.loads(request)["csr"].encode()
        issued = cert_pem(ca.issue_agent(csr, "web-1", timedelta(hours=1))).decode()
        out, err = agent.communicate(json.dumps({"certificate": issued}) + "\n", timeout=60)
    finally:
        if agent.poll() is None:
            agent.kill()
            agent.wait()
    assert agent.returncode == 0, err
    seen: dict[str, object] = json.loads(out.splitlines()[-1])
    return {**seen, "issued": issued}


def test_with_metrics_configured_prometheus_client_is_loaded(state: Path, tmp_path: Path) -> None:
    seen = idle_agent(config_file(tmp_path, state, f"127.0.0.1:{free_port()}"))

    assert seen == {
        "metrics": True, "prometheus": True, "cryptography": False, "pyroute2": False,
        "pydantic": False,
    }  # fmt: skip


def test_configured_metrics_are_served_with_the_apply_histogram(
    state: Path, tmp_path: Path
) -> None:
    exposition = fresh_python(
        SCRAPE_CODE, str(config_file(tmp_path, state, f"127.0.0.1:{free_port()}"))
    )

    lines = exposition.splitlines()
    assert "bulkhead_agent_apply_seconds_count 1.0" in lines
    assert "bulkhead_agent_flows_reported_total 7.0" in lines
