"""The key tool (agent/keytool.py) as the agent uses it, through a child process: what it
makes, what it refuses, how its failures read, and state directories without a validity
file (written before the key tool existed)."""

from __future__ import annotations

import asyncio
import json
import socket
import stat
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from agent import identity
from agent.identity import (
    VALIDITY_FILE,
    AgentCredentials,
    IdentityError,
    KeytoolError,
    Names,
    Unreachable,
    check_certificate,
    load_credentials,
    new_key_and_csr,
    save_credentials,
)
from agent.keytool import generate_key, key_pem
from controller.core import Controller
from controller.pki import CertificateAuthority
from tests.pki_support import issued_credentials, with_enrollment_server

NAMES = Names("my.key", "my.crt", "my-ca.crt")


@pytest.fixture
def ca(tmp_path_factory: pytest.TempPathFactory) -> CertificateAuthority:
    return CertificateAuthority.load_or_create(tmp_path_factory.mktemp("pki") / "ca")


@pytest.fixture
def creds(ca: CertificateAuthority) -> AgentCredentials:
    return issued_credentials(ca, "web-1", timedelta(days=1))


def fake_keytool(monkeypatch: pytest.MonkeyPatch, code: str) -> None:
    """Replace the key tool with CODE run by a fresh interpreter."""
    monkeypatch.setattr(identity, "KEYTOOL", (sys.executable, "-c", code))


# --- what it makes and checks ----------------------------------------------------------


def test_new_key_and_csr_are_a_p256_key_and_a_csr_it_signed() -> None:
    key_data, csr_data = new_key_and_csr("db-2")

    key = serialization.load_pem_private_key(key_data, password=None)
    csr = x509.load_pem_x509_csr(csr_data)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    assert isinstance(key.curve, ec.SECP256R1)
    assert csr.subject.rfc4514_string() == "CN=db-2"
    assert csr.is_signature_valid
    assert csr.public_key() == key.public_key()


def test_the_key_tool_refuses_an_invalid_agent_id() -> None:
    with pytest.raises(IdentityError, match="agent id 'DB 2' is invalid") as raised:
        new_key_and_csr("DB 2")
    assert not isinstance(raised.value, KeytoolError)  # the input is wrong, not the tool


def test_the_key_tool_reads_the_certificate_a_tls_server_presents(tmp_path: Path) -> None:
    async def body(_core: Controller, address: str) -> None:
        host, _, port = address.rpartition(":")
        pem = await asyncio.to_thread(identity.presented_certificate, host, int(port), 5.0)
        presented = x509.load_pem_x509_certificate(pem)
        ca = CertificateAuthority.load_or_create(tmp_path / "pki")  # the server's CA
        presented.verify_directly_issued_by(x509.load_pem_x509_certificate(ca.certificate_pem))

    with_enrollment_server(tmp_path, body)


def test_an_unreachable_server_is_reported_as_such() -> None:
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))  # bound, never listening: connections are refused
        port = closed.getsockname()[1]
        with pytest.raises(Unreachable, match="Connection refused"):
            identity.presented_certificate("127.0.0.1", port, 5.0)


def test_a_matching_key_and_certificate_give_the_validity(creds: AgentCredentials) -> None:
    validity = check_certificate(creds.cert_pem, creds.ca_pem, key_pem=creds.key_pem)

    assert validity == creds.validity


@pytest.mark.parametrize(
    ("part", "message"),
    [
        ("key", r"my\.key is not an unencrypted PEM private key"),
        ("cert", r"my\.crt is not a PEM X\.509 certificate"),
        ("ca", r"my-ca\.crt is not a PEM X\.509 certificate"),
    ],
)
def test_bad_pem_is_named(creds: AgentCredentials, part: str, message: str) -> None:
    pems = {"key": creds.key_pem, "cert": creds.cert_pem, "ca": creds.ca_pem}
    pems[part] = pems[part][:100]

    with pytest.raises(IdentityError, match=message):
        check_certificate(pems["cert"], pems["ca"], key_pem=pems["key"], names=NAMES)


def test_another_key_is_named(creds: AgentCredentials) -> None:
    with pytest.raises(IdentityError, match=r"my\.key does not match the certificate in my\.crt"):
        check_certificate(
            creds.cert_pem, creds.ca_pem, key_pem=key_pem(generate_key()), names=NAMES
        )


def test_a_key_that_is_not_ec_is_named(creds: AgentCredentials) -> None:
    rsa_pem = rsa.generate_private_key(public_exponent=65537, key_size=2048).private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )

    with pytest.raises(IdentityError, match=r"my\.key holds a .*RSA.*, expected an EC key"):
        check_certificate(creds.cert_pem, creds.ca_pem, key_pem=rsa_pem, names=NAMES)


def test_a_certificate_of_another_ca_is_named(creds: AgentCredentials, tmp_path: Path) -> None:
    other = CertificateAuthority.load_or_create(tmp_path / "other")

    with pytest.raises(IdentityError, match=r"my\.crt is not issued by the CA in my-ca\.crt"):
        check_certificate(creds.cert_pem, other.certificate_pem, names=NAMES)


@pytest.mark.parametrize(
    ("request_text", "message"),
    [
        ("garbage", "request is not JSON"),
        ("[]", "not a JSON object"),
        ('{"op": "sign"}', "unknown key tool operation 'sign'"),
        ('{"op": "check", "cert_pem": "x"}', "malformed key tool request"),
    ],
)
def test_the_key_tool_answers_a_bad_request_with_an_error(request_text: str, message: str) -> None:
    done = subprocess.run(
        identity.KEYTOOL,
        input=request_text,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )

    assert done.returncode == 0, done.stderr
    assert message in json.loads(done.stdout)["error"]


# --- when the key tool itself fails ------------------------------------------------------


def test_a_crash_is_reported_with_its_last_line(
    monkeypatch: pytest.MonkeyPatch, creds: AgentCredentials
) -> None:
    fake_keytool(
        monkeypatch,
        "import sys; sys.stderr.write('Traceback (most recent call last):\\n"
        "ModuleNotFoundError: no cryptography\\n'); sys.exit(3)",
    )

    with pytest.raises(KeytoolError) as raised:
        check_certificate(creds.cert_pem, creds.ca_pem, names=NAMES)

    assert str(raised.value) == (
        "cannot check my.crt: the key tool failed (exit status 3): "
        "ModuleNotFoundError: no cryptography"
    )


def test_a_killed_key_tool_is_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_keytool(monkeypatch, "import os, signal; os.kill(os.getpid(), signal.SIGKILL)")

    with pytest.raises(KeytoolError, match=r"cannot make a key for 'web-1'.*killed by signal 9"):
        new_key_and_csr("web-1")


def test_a_key_tool_that_hangs_is_stopped_after_the_timeout(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    fake_keytool(monkeypatch, "import time; time.sleep(60)")
    monkeypatch.setattr(identity, "KEYTOOL_TIMEOUT_S", 0.5)
    started = time.monotonic()

    with pytest.raises(KeytoolError, match=r"gave no answer within 0\.5 s"):
        new_key_and_csr("web-1")

    assert time.monotonic() - started < 10


@pytest.mark.parametrize(
    "answer", ["print('not json')", "print('[1]')", "print('{\"key_pem\": 1}')", "pass"]
)
def test_an_unreadable_answer_is_reported(monkeypatch: pytest.MonkeyPatch, answer: str) -> None:
    fake_keytool(monkeypatch, answer)

    with pytest.raises(KeytoolError, match="the key tool gave an unreadable answer"):
        new_key_and_csr("web-1")


def test_an_answer_without_the_result_is_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_keytool(monkeypatch, "print('{}')")

    with pytest.raises(KeytoolError, match="answered without a key or CSR"):
        new_key_and_csr("web-1")
    with pytest.raises(KeytoolError, match="answered no validity for the certificate"):
        check_certificate(b"cert", b"ca")


def test_a_key_tool_that_cannot_start_is_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(identity, "KEYTOOL", ("/nonexistent/python", "-m", "agent.keytool"))

    with pytest.raises(KeytoolError, match="cannot start the key tool"):
        new_key_and_csr("web-1")


def test_the_private_key_reaches_the_key_tool_on_stdin_only(
    monkeypatch: pytest.MonkeyPatch, creds: AgentCredentials, tmp_path: Path
) -> None:
    seen = tmp_path / "seen.json"
    fake_keytool(
        monkeypatch,
        "import json, sys; from pathlib import Path; "
        f"Path({str(seen)!r}).write_text(json.dumps([sys.argv, sys.stdin.read()])); "
        "print(json.dumps({'error': 'recorded'}))",
    )

    with pytest.raises(IdentityError, match="recorded"):
        check_certificate(creds.cert_pem, creds.ca_pem, key_pem=creds.key_pem)

    argv, stdin = json.loads(seen.read_text())
    assert creds.key_pem.decode() not in " ".join(argv)
    assert json.loads(stdin)["key_pem"] == creds.key_pem.decode()


# --- the validity file ---------------------------------------------------------------------


def test_loading_saved_credentials_does_not_run_the_key_tool(
    monkeypatch: pytest.MonkeyPatch, creds: AgentCredentials, tmp_path: Path
) -> None:
    save_credentials(tmp_path, creds)
    fake_keytool(monkeypatch, "raise SystemExit(1)")

    assert load_credentials(tmp_path) == creds


def test_a_state_dir_without_a_validity_file_loads_and_gets_one(
    monkeypatch: pytest.MonkeyPatch, creds: AgentCredentials, tmp_path: Path
) -> None:
    save_credentials(tmp_path, creds)
    (tmp_path / VALIDITY_FILE).unlink()  # as the release before the key tool left it

    assert load_credentials(tmp_path) == creds

    assert stat.S_IMODE((tmp_path / VALIDITY_FILE).stat().st_mode) == 0o600
    assert not [path.name for path in tmp_path.iterdir() if path.name.startswith(".")]
    fake_keytool(monkeypatch, "raise SystemExit(1)")  # from now on without the key tool
    assert load_credentials(tmp_path) == creds


def test_files_renewed_without_the_validity_file_get_their_own_validity(
    ca: CertificateAuthority, creds: AgentCredentials, tmp_path: Path
) -> None:
    # The release before the key tool renews, after a downgrade: agent.validity is stale.
    save_credentials(tmp_path, creds)
    renewed = issued_credentials(ca, "web-1", timedelta(days=2))
    for name, data in (("agent.key", renewed.key_pem), ("agent.crt", renewed.cert_pem)):
        (tmp_path / name).write_bytes(data)

    loaded = load_credentials(tmp_path)

    assert loaded == renewed
    assert loaded is not None
    assert loaded.validity != creds.validity


@pytest.mark.parametrize("content", [b"", b"{not json", b'{"sha256": 1}', b"[]"])
def test_an_unreadable_validity_file_is_recomputed(
    creds: AgentCredentials, tmp_path: Path, content: bytes
) -> None:
    save_credentials(tmp_path, creds)
    (tmp_path / VALIDITY_FILE).write_bytes(content)

    assert load_credentials(tmp_path) == creds


def test_a_failing_key_tool_on_an_old_state_dir_is_an_identity_error(
    monkeypatch: pytest.MonkeyPatch, creds: AgentCredentials, tmp_path: Path
) -> None:
    save_credentials(tmp_path, creds)
    (tmp_path / VALIDITY_FILE).unlink()
    fake_keytool(monkeypatch, "raise SystemExit(1)")

    with pytest.raises(KeytoolError, match=r"cannot check .*agent\.crt: the key tool failed"):
        load_credentials(tmp_path)
    assert not (tmp_path / VALIDITY_FILE).exists()
