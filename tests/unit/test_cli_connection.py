"""How the `bulkhead` CLI reaches the controller: operator credentials, mutual TLS, and the
one-line errors for every way that fails (unreachable, untrusted, refused, not allowed)."""

from __future__ import annotations

import datetime
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
from click.testing import CliRunner
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from bulkhead.v1 import admin_pb2
from controller.cli.main import cli
from controller.pki import CertificateAuthority, cert_pem
from controller.pki.authority import private_key_pem
from tests.unit.cli_support import (
    FakeAdmin,
    Target,
    closed_target,
    error_lines,
    run,
    serving_fake_admin,
    write_operator_credentials,
)

ROOT = Path(__file__).resolve().parents[2]
HOW_TO_GET = (
    "run 'bulkhead-controller admin-cert --name NAME --role admin --out DIR' on the controller "
    "host, then 'export BULKHEAD_CREDENTIALS=DIR' (or pass --credentials DIR)"
)
TRUST_HINT = (
    "is bulkhead-controller running, and does it trust your certificate? "
    "Set --controller or BULKHEAD_CONTROLLER, --credentials or BULKHEAD_CREDENTIALS."
)


@pytest.fixture
def admin(tmp_path: Path) -> Iterator[FakeAdmin]:
    with serving_fake_admin(tmp_path) as fake:
        fake.responses["ListAgents"] = admin_pb2.ListAgentsResponse()
        yield fake


@pytest.fixture
def closed(tmp_path: Path) -> Iterator[Target]:
    with closed_target(tmp_path) as target:
        yield target


def _entry_point(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """The installed `bulkhead` as the operator runs it, in a process of its own."""
    return subprocess.run(
        [sys.executable, "-c", "from controller.cli.main import main; main()", *args],
        env={"PYTHONPATH": f"{ROOT}:{ROOT / 'proto'}", **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_the_operator_certificate_is_presented(admin: FakeAdmin) -> None:
    result = run(admin.target, "get", "agents")

    assert result.exit_code == 0, result.stderr
    assert result.stdout == "No agents.\n"
    assert admin.callers == ["alice"]


def test_credentials_can_come_from_the_environment(admin: FakeAdmin) -> None:
    env = {
        "BULKHEAD_CONTROLLER": admin.address,
        "BULKHEAD_CREDENTIALS": str(admin.target.credentials),
    }
    result = CliRunner(env=env).invoke(cli, ["get", "agents"])

    assert result.exit_code == 0, result.stderr
    assert admin.callers == ["alice"]


def test_missing_credentials_directory_names_the_file_and_how_to_get_one(
    admin: FakeAdmin, tmp_path: Path
) -> None:
    missing = tmp_path / "nowhere"

    result = run(Target(admin.address, missing), "get", "agents")

    assert result.exit_code == 2
    assert error_lines(result) == [
        f"error: cannot read {missing}/ca.crt (no such file or directory): {HOW_TO_GET}"
    ]
    assert admin.requests == []


@pytest.mark.parametrize("name", ["ca.crt", "operator.crt", "operator.key"])
def test_each_missing_file_is_named(admin: FakeAdmin, name: str) -> None:
    (admin.target.credentials / name).unlink()

    result = run(admin.target, "get", "agents")

    assert result.exit_code == 2
    [line] = error_lines(result)
    assert line.startswith(f"error: cannot read {admin.target.credentials / name} (no such file")
    assert admin.requests == []


def test_a_key_of_another_certificate_is_refused_locally(admin: FakeAdmin, tmp_path: Path) -> None:
    other = write_operator_credentials(tmp_path / "other", admin.ca, name="bob")
    credentials = admin.target.credentials
    (credentials / "operator.key").write_bytes((other / "operator.key").read_bytes())

    result = run(admin.target, "get", "agents")

    assert result.exit_code == 2
    [line] = error_lines(result)
    assert line.startswith(
        f"error: {credentials}/operator.key does not belong to {credentials}/operator.crt"
    )
    assert admin.requests == []


def test_a_file_that_is_not_pem_is_named(admin: FakeAdmin) -> None:
    (admin.target.credentials / "operator.crt").write_text("not a certificate\n")

    result = run(admin.target, "get", "agents")

    assert result.exit_code == 2
    assert error_lines(result) == [
        f"error: {admin.target.credentials}/operator.crt is not a PEM X.509 certificate: "
        + HOW_TO_GET
    ]


def test_an_expired_certificate_is_refused_locally(admin: FakeAdmin) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "alice")])
    start = datetime.datetime(2020, 1, 1, tzinfo=datetime.UTC)
    expired = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + datetime.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    (admin.target.credentials / "operator.crt").write_bytes(cert_pem(expired))
    (admin.target.credentials / "operator.key").write_bytes(private_key_pem(key))

    result = run(admin.target, "get", "agents")

    assert result.exit_code == 2
    [line] = error_lines(result)
    assert line.startswith(
        f"error: {admin.target.credentials}/operator.crt expired on 2020-01-02 00:00:00 UTC"
    )
    assert admin.requests == []


def test_empty_credentials_option_is_bad_input(admin: FakeAdmin) -> None:
    result = CliRunner().invoke(
        cli, ["--controller", admin.address, "--credentials", " ", "get", "agents"]
    )

    assert result.exit_code == 2
    assert error_lines(result) == [
        "error: --credentials is empty: give the directory of operator.crt"
    ]


def test_a_certificate_from_another_ca_is_one_line(admin: FakeAdmin, tmp_path: Path) -> None:
    stranger = CertificateAuthority.load_or_create(tmp_path / "stranger")
    credentials = write_operator_credentials(tmp_path / "mallory", stranger, name="mallory")
    # The operator trusts the controller, but the controller does not trust the operator.
    (credentials / "ca.crt").write_bytes(admin.ca.certificate_pem)

    result = run(Target(admin.address, credentials), "get", "agents")

    assert result.exit_code == 1
    [line] = error_lines(result)
    assert line.startswith(f"error: cannot reach the controller at {admin.address} (")
    assert line.endswith(TRUST_HINT)
    assert admin.requests == []


def test_a_controller_from_another_ca_is_named_as_untrusted(
    admin: FakeAdmin, tmp_path: Path
) -> None:
    stranger = CertificateAuthority.load_or_create(tmp_path / "stranger")
    (admin.target.credentials / "ca.crt").write_bytes(stranger.certificate_pem)

    completed = _entry_point(
        "--controller", admin.address, "--credentials", str(admin.target.credentials),
        "get", "agents", env={},
    )  # fmt: skip

    assert completed.returncode == 1
    assert completed.stdout == ""
    # One line: gRPC's own log of the failed handshake is not shown.
    assert completed.stderr.splitlines() == [
        f"error: cannot reach the controller at {admin.address}: its certificate is not signed "
        "by the CA in your ca.crt; is it the controller that issued your credentials? "
        "Set --controller or BULKHEAD_CONTROLLER."
    ]
    assert admin.requests == []


def test_a_plaintext_server_is_named_as_not_tls(closed: Target) -> None:
    server = grpc.server(ThreadPoolExecutor(max_workers=1))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        result = run(Target(f"127.0.0.1:{port}", closed.credentials), "get", "agents")
    finally:
        server.stop(grace=None)

    assert result.exit_code == 1
    assert error_lines(result) == [
        f"error: cannot reach the controller at 127.0.0.1:{port}: it does not speak TLS; "
        "is it bulkhead-controller? Set --controller or BULKHEAD_CONTROLLER."
    ]


def test_permission_denied_prints_the_controller_message(admin: FakeAdmin) -> None:
    admin.failures["DeleteResource"] = (
        grpc.StatusCode.PERMISSION_DENIED,
        "operator 'alice' has the viewer role: it may read, not change",
    )

    result = run(admin.target, "delete", "policy", "web-db")

    assert result.exit_code == 1
    assert error_lines(result) == [
        "error: operator 'alice' has the viewer role: it may read, not change"
    ]
    assert result.stdout == ""


def test_unauthenticated_says_the_certificate_was_not_accepted(admin: FakeAdmin) -> None:
    admin.failures["ListAgents"] = (
        grpc.StatusCode.UNAUTHENTICATED,
        "operator:alice: certificate revoked",
    )

    result = run(admin.target, "get", "agents")

    assert result.exit_code == 1
    assert error_lines(result) == [
        "error: the controller did not accept your certificate: operator:alice: certificate revoked"
    ]


def test_unreachable_controller_is_one_line(closed: Target) -> None:
    result = run(closed, "get", "agents")

    assert result.exit_code == 1
    assert error_lines(result) == [
        f"error: cannot reach the controller at {closed.address} (connection refused): "
        "is bulkhead-controller running? Set --controller or BULKHEAD_CONTROLLER."
    ]


def test_unreachable_controller_from_the_entry_point_has_no_traceback(closed: Target) -> None:
    completed = _entry_point(
        "get",
        "agents",
        env={
            "BULKHEAD_CONTROLLER": closed.address,
            "BULKHEAD_CREDENTIALS": str(closed.credentials),
        },
    )

    assert completed.returncode == 1
    assert completed.stdout == ""
    assert len(completed.stderr.splitlines()) == 1
    assert completed.stderr.startswith(f"error: cannot reach the controller at {closed.address}")


def test_deadline_is_reported_as_unreachable_with_the_timeout(admin: FakeAdmin) -> None:
    admin.failures["ListAgents"] = (grpc.StatusCode.DEADLINE_EXCEEDED, "")

    result = run(admin.target, "--timeout", "0.2", "get", "agents")
    admin.release.set()

    assert result.exit_code == 1
    [line] = error_lines(result)
    assert line.startswith(f"error: cannot reach the controller at {admin.address} (no answer")
    assert "0.2s" in line
