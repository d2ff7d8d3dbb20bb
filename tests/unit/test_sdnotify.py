"""sd_notify without libsystemd: datagrams to a socket the test binds, as systemd would."""

from __future__ import annotations

import asyncio
import os
import secrets
import select
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import ModuleType

import pytest

from agent.config import load_config
from agent.dataplane.baseline import Baseline
from agent.main import REQUIRE_NETNS_ENV, AgentStartError, run_agent
from bulkhead import sdnotify
from bulkhead.v1 import agent_pb2, ruleset_pb2

WAIT = 30.0  # seconds: only a bound on waiting for a datagram, never an assertion


@pytest.fixture
def sd() -> ModuleType:
    return sdnotify


@pytest.fixture
def listener(tmp_path_factory: pytest.TempPathFactory) -> Iterator[socket.socket]:
    """A datagram socket at a filesystem path (short: sun_path holds 107 bytes)."""
    path = tmp_path_factory.mktemp("sd") / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        sock.settimeout(WAIT)
        yield sock


def receive(sock: socket.socket) -> str:
    return sock.recv(4096).decode()


def test_without_notify_socket_nothing_is_sent(
    sd: ModuleType, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert sd.notify("READY=1") is False
    assert sd.ready() is False
    monkeypatch.setenv("NOTIFY_SOCKET", "relative/path")
    assert sd.notify("READY=1") is False


def test_ready_and_stopping_reach_a_path_socket(
    sd: ModuleType, listener: socket.socket, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", listener.getsockname())
    assert sd.ready("enforcing revision 3") is True
    assert receive(listener) == "READY=1\nSTATUS=enforcing revision 3"
    assert sd.stopping() is True
    assert receive(listener) == "STOPPING=1"


def test_abstract_socket_is_spelled_with_an_at_sign(
    sd: ModuleType, monkeypatch: pytest.MonkeyPatch
) -> None:
    name = f"bh-sdnotify-test-{secrets.token_hex(8)}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(WAIT)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert sd.notify("READY=1") is True
        assert receive(sock) == "READY=1"


def test_a_socket_nobody_listens_on_is_false_not_an_error(
    sd: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "gone"))
    assert sd.notify("READY=1") is False


@pytest.mark.parametrize(
    ("usec", "pid", "expected"),
    [
        (None, None, None),
        ("30000000", None, 10.0),
        ("30000000", "own", 10.0),
        ("30000000", "other", None),  # systemd meant another process (e.g. our parent)
        ("0", None, None),
        ("soon", None, None),
    ],
)
def test_watchdog_interval_is_a_third_of_watchdog_usec(
    sd: ModuleType,
    monkeypatch: pytest.MonkeyPatch,
    usec: str | None,
    pid: str | None,
    expected: float | None,
) -> None:
    for name, value in (("WATCHDOG_USEC", usec), ("WATCHDOG_PID", pid)):
        monkeypatch.delenv(name, raising=False)
        if value is not None:
            own = os.getpid()
            monkeypatch.setenv(name, str({"own": own, "other": own + 1}.get(value, value)))
    assert sd.watchdog_interval() == expected


def test_watchdog_task_pings_until_cancelled(
    sd: ModuleType, listener: socket.socket, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", listener.getsockname())
    monkeypatch.delenv("WATCHDOG_PID", raising=False)

    async def scenario() -> list[str]:
        monkeypatch.delenv("WATCHDOG_USEC", raising=False)
        assert sd.start_watchdog() is None  # no watchdog asked for: no task
        monkeypatch.setenv("WATCHDOG_USEC", "30000")  # pings every 10 ms
        task = sd.start_watchdog()
        assert task is not None
        pings = [await asyncio.to_thread(receive, listener) for _ in range(3)]
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return pings

    assert asyncio.run(scenario()) == ["WATCHDOG=1"] * 3


class RecordingBackend:
    """Notes whether READY had already been sent when the first ruleset went in."""

    def __init__(self, listener: socket.socket) -> None:
        self._listener = listener
        self.ready_before_apply: bool | None = None

    def apply(self, ruleset: ruleset_pb2.Ruleset, baseline: Baseline) -> None:
        if self.ready_before_apply is None:
            readable, _, _ = select.select([self._listener], [], [], 0)
            self.ready_before_apply = bool(readable)

    def update_elements(
        self,
        changes: Sequence[agent_pb2.SetChange],
        result: ruleset_pb2.Ruleset,
        baseline: Baseline,
    ) -> bool:
        return False  # deltas are applied whole

    def remove(self) -> None:
        pass

    def is_present(self) -> bool:
        return self.ready_before_apply is not None

    def state_fingerprint(self) -> str:
        return "recorded"


def test_agent_is_ready_only_once_its_first_ruleset_is_loaded(
    tmp_path: Path, listener: socket.socket, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "agent.yaml"
    config.write_text(
        f"agent_id: web-1\ncontroller: 198.18.0.1:50151\nstate_dir: {tmp_path / 'state'}\n"
        "dataplane: nftables\n"
    )
    backend = RecordingBackend(listener)
    monkeypatch.setattr("agent.main.make_backend", lambda name: backend)
    monkeypatch.setenv("NOTIFY_SOCKET", listener.getsockname())
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    monkeypatch.delenv(REQUIRE_NETNS_ENV, raising=False)
    # Not enrolled and no token: the agent stops after the restore, which is enough here.
    with pytest.raises(AgentStartError, match="not enrolled"):
        asyncio.run(run_agent(load_config(config), config))
    assert backend.ready_before_apply is False
    assert receive(listener) == "READY=1\nSTATUS=enforcing revision 0 (nftables)"


def test_controller_notifies_ready_watchdog_and_stopping(
    tmp_path: Path, listener: socket.socket
) -> None:
    ports = []
    for _ in range(2):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            ports.append(probe.getsockname()[1])
    listen, enroll = (f"127.0.0.1:{port}" for port in ports)
    env = {
        **os.environ,
        "NOTIFY_SOCKET": listener.getsockname(),
        "WATCHDOG_USEC": "600000",  # pings every 0.2 s
    }
    env.pop("WATCHDOG_PID", None)
    program = Path(sys.executable).parent / "bulkhead-controller"
    log = tmp_path / "controller.log"
    state = tmp_path / "state"
    with log.open("wb") as stderr:
        process = subprocess.Popen(
            [program, "--listen", listen, "--enroll-listen", enroll, "--state-dir", state],
            env=env,
            stderr=stderr,
        )
    try:
        try:
            assert receive(listener) == f"READY=1\nSTATUS=listening on {listen} and {enroll}"
            assert receive(listener) == "WATCHDOG=1"
            process.send_signal(signal.SIGTERM)
            # Pings sent before the signal was handled may come first (a bounded number).
            for _ in range(50):
                if receive(listener) == "STOPPING=1":
                    break
            else:
                raise AssertionError("no STOPPING=1 after SIGTERM")
        except TimeoutError:
            raise AssertionError(f"no notification; controller said: {log.read_text()}") from None
        assert process.wait(timeout=WAIT) == 0, log.read_text()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
