"""Shared parts of the `bulkhead` CLI tests: a fake AdminService served over mutual TLS.

The fake stands in for the controller core: it records each request and the common name
of the client certificate that made it, and answers with a canned response or aborts with
a status code. Each test gets its own CA, so credentials never leak between tests.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from click.testing import CliRunner, Result
from google.protobuf.message import Message

from bulkhead.v1 import admin_pb2_grpc
from controller.cli.main import cli
from controller.pki import CertificateAuthority
from tests.pki_support import server_credentials

# Typed names for the untyped generated module.
_register: Callable[[Any, grpc.Server], None] = admin_pb2_grpc.add_AdminServiceServicer_to_server


@dataclass(frozen=True)
class Target:
    """What the CLI is pointed at: --controller and --credentials."""

    address: str
    credentials: Path


class FakeAdmin:
    """AdminService servicer: records requests, answers from `responses` or `failures`."""

    def __init__(self, ca: CertificateAuthority, target: Target) -> None:
        self.ca = ca
        self.target = target
        self.requests: list[tuple[str, Message]] = []
        self.callers: list[str] = []
        self.responses: dict[str, Message] = {}
        self.failures: dict[str, tuple[grpc.StatusCode, str]] = {}
        self.release = threading.Event()

    @property
    def address(self) -> str:
        return self.target.address

    def _answer(self, method: str, request: Message, context: grpc.ServicerContext) -> Message:
        self.requests.append((method, request))
        # The stubs type the values as bytes; gRPC gives a list of bytes.
        name = next(iter(context.auth_context().get("x509_common_name") or [b""]))
        self.callers.append(name.decode() if isinstance(name, bytes) else str(name))
        if method in self.failures:
            code, details = self.failures[method]
            if code == grpc.StatusCode.DEADLINE_EXCEEDED:
                # Hold the call until the client gives up; bounded so a failing test ends.
                self.release.wait(timeout=10)
            context.abort(code, details)
        return self.responses[method]

    def __getattr__(self, method: str) -> Callable[[Message, grpc.ServicerContext], Message]:
        # Every AdminService method (Apply, ListAgents, ...) records and answers the same way.
        if not method[:1].isupper():
            raise AttributeError(method)
        return lambda request, context: self._answer(method, request, context)

    def only_request(self, method: str) -> Any:
        assert [name for name, _ in self.requests] == [method]
        return self.requests[0][1]


def write_operator_credentials(
    directory: Path, ca: CertificateAuthority, name: str = "alice", role: str = "admin"
) -> Path:
    """The files `bulkhead-controller admin-cert --out DIRECTORY` writes."""
    cert, key = ca.issue_operator(name, role)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "operator.crt").write_bytes(cert)
    (directory / "operator.key").write_bytes(key)
    (directory / "ca.crt").write_bytes(ca.certificate_pem)
    return directory


@contextmanager
def serving_fake_admin(directory: Path) -> Iterator[FakeAdmin]:
    """A FakeAdmin on a TLS port that requires client certificates from a fresh CA."""
    ca = CertificateAuthority.load_or_create(directory / "pki")
    credentials = write_operator_credentials(directory / "operator", ca)
    server = grpc.server(ThreadPoolExecutor(max_workers=4))
    port = server.add_secure_port("127.0.0.1:0", server_credentials(ca))
    fake = FakeAdmin(ca, Target(f"127.0.0.1:{port}", credentials))
    _register(fake, server)
    server.start()
    try:
        yield fake
    finally:
        fake.release.set()
        server.stop(grace=None)


@contextmanager
def closed_target(directory: Path) -> Iterator[Target]:
    """Valid credentials and a bound port nobody listens on: connections are refused."""
    ca = CertificateAuthority.load_or_create(directory / "pki")
    credentials = write_operator_credentials(directory / "operator", ca)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield Target(f"127.0.0.1:{sock.getsockname()[1]}", credentials)


def run(target: Target, *args: str, stdin: str | None = None) -> Result:
    runner = CliRunner(env={"COLUMNS": "200"})
    options = ["--controller", target.address, "--credentials", str(target.credentials)]
    return runner.invoke(cli, [*options, *args], input=stdin)


def error_lines(result: Result) -> list[str]:
    assert "Traceback" not in result.stderr
    return result.stderr.splitlines()
