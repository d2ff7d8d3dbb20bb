"""A real bulkhead-controller in a subprocess on loopback, for attack replays that need the
whole process: its descriptor limit, its log, its metrics port and its state dir."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path

import grpc

from controller.pki import CONTROLLER_NAME

PROGRAM = Path(sys.executable).parent / "bulkhead-controller"
START_WAIT_S = 30.0  # a bound on waiting for the ports, never an assertion
CHANNEL_OPTIONS = [("grpc.ssl_target_name_override", CONTROLLER_NAME)]


def free_ports(count: int) -> list[int]:
    """Ports free right now on 127.0.0.1 (the controller binds them a moment later)."""
    probes = [socket.socket() for _ in range(count)]
    try:
        for probe in probes:
            probe.bind(("127.0.0.1", 0))
        return [probe.getsockname()[1] for probe in probes]
    finally:
        for probe in probes:
            probe.close()


@dataclass
class ControllerProcess:
    process: subprocess.Popen[bytes]
    listen: str  # mTLS
    enroll_listen: str
    metrics_port: int
    state_dir: Path
    log: Path
    operator: Path  # operator.crt, operator.key, ca.crt of an admin

    @property
    def pid(self) -> int:
        return self.process.pid

    def alive(self) -> bool:
        return self.process.poll() is None

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def admin_channel(self) -> grpc.aio.Channel:
        ca, key, cert = (
            (self.operator / name).read_bytes()
            for name in ("ca.crt", "operator.key", "operator.crt")
        )
        return grpc.aio.secure_channel(
            self.listen, grpc.ssl_channel_credentials(ca, key, cert), options=CHANNEL_OPTIONS
        )

    def anonymous_channel(self, target: str | None = None) -> grpc.aio.Channel:
        ca = (self.operator / "ca.crt").read_bytes()
        return grpc.aio.secure_channel(
            target or self.enroll_listen, grpc.ssl_channel_credentials(ca), options=CHANNEL_OPTIONS
        )


def _wait_listening(controller: ControllerProcess) -> None:
    deadline = time.monotonic() + START_WAIT_S
    pending = [controller.listen, controller.enroll_listen]
    while pending and time.monotonic() < deadline:
        if not controller.alive():
            raise AssertionError(f"controller exited: {controller.log_text()}")
        host, _, port = pending[0].rpartition(":")
        try:
            with socket.create_connection((host, int(port)), timeout=1):
                pending.pop(0)
        except OSError:
            time.sleep(0.05)
    if pending:
        raise AssertionError(f"controller not listening on {pending}: {controller.log_text()}")


@contextmanager
def running_controller(tmp_path: Path, *options: str) -> Iterator[ControllerProcess]:
    """The controller with OPTIONS on free loopback ports, stopped (SIGTERM, then SIGKILL)
    at the end."""
    state_dir = tmp_path / "state"
    operator = tmp_path / "operator"
    subprocess.run(
        [PROGRAM, "admin-cert", "--state-dir", state_dir, "--name", "alice",
         "--role", "admin", "--out", operator],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    main_port, enroll_port, metrics_port = free_ports(3)
    listen, enroll_listen = f"127.0.0.1:{main_port}", f"127.0.0.1:{enroll_port}"
    log = tmp_path / "controller.log"
    argv: Sequence[str | Path] = [
        PROGRAM, "--listen", listen, "--enroll-listen", enroll_listen,
        "--state-dir", state_dir, "--metrics-listen", f"127.0.0.1:{metrics_port}", *options,
    ]  # fmt: skip
    env = {key: value for key, value in os.environ.items() if key != "NOTIFY_SOCKET"}
    with log.open("wb") as output:
        process = subprocess.Popen(argv, stdout=output, stderr=subprocess.STDOUT, env=env)
    controller = ControllerProcess(
        process, listen, enroll_listen, metrics_port, state_dir, log, operator
    )
    try:
        _wait_listening(controller)
        yield controller
    finally:
        if controller.alive():
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=START_WAIT_S)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def set_descriptor_limit(pid: int, limit: int) -> None:
    """What the unit's default would give the process: prlimit, as an operator would."""
    subprocess.run(
        ["prlimit", "--pid", str(pid), f"--nofile={limit}:{limit}"],
        check=True, capture_output=True, timeout=30,
    )  # fmt: skip


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except OSError:
        pass
    finally:
        writer.close()


@asynccontextmanager
async def forwarded_from(source: str, target: str) -> AsyncIterator[str]:
    """A loopback address whose connections reach TARGET from SOURCE (e.g. 127.0.0.2):
    grpcio cannot choose a channel's source address, so the test's calls come through
    this. Yields the address to dial."""
    host, _, port = target.rpartition(":")

    async def forward(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            far_reader, far_writer = await asyncio.open_connection(
                host, int(port), local_addr=(source, 0)
            )
        except OSError:
            writer.close()
            return
        await asyncio.gather(_pipe(reader, far_writer), _pipe(far_reader, writer))

    server = await asyncio.start_server(forward, "127.0.0.1", 0)
    try:
        yield f"127.0.0.1:{server.sockets[0].getsockname()[1]}"
    finally:
        server.close()
