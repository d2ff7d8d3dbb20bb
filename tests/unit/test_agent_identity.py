"""The agent's identity files, CSRs, renewal timing and token parsing, checked against
certificates from the controller's real CA."""

from __future__ import annotations

import hashlib
import stat
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from agent.identity import (
    AgentCredentials,
    IdentityError,
    ca_fingerprint,
    check_certificate,
    checked_credentials,
    load_credentials,
    parse_token,
    save_credentials,
)
from agent.keytool import generate_key, key_pem, make_csr
from bulkhead.privatefile import pending_name
from controller.pki import CertificateAuthority, cert_pem, new_token
from tests.pki_support import CRASHED_WRITE, issued_credentials

DAY = timedelta(days=1)
FILES = ["agent.crt", "agent.key", "agent.validity", "ca.crt"]


@pytest.fixture
def ca(tmp_path_factory: pytest.TempPathFactory) -> CertificateAuthority:
    # Outside tmp_path, which the tests use as the agent's state directory.
    return CertificateAuthority.load_or_create(tmp_path_factory.mktemp("pki") / "ca")


def enroll(ca: CertificateAuthority, agent_id: str = "web-1") -> AgentCredentials:
    return issued_credentials(ca, agent_id, 30 * DAY)


def test_generated_key_is_p256_and_round_trips_through_pem() -> None:
    key = generate_key()
    loaded = serialization.load_pem_private_key(key_pem(key), password=None)
    assert isinstance(loaded, ec.EllipticCurvePrivateKey)
    assert isinstance(loaded.curve, ec.SECP256R1)
    assert loaded.private_numbers() == key.private_numbers()


def test_csr_names_the_agent_and_is_signed_by_its_key() -> None:
    key = generate_key()
    csr = x509.load_pem_x509_csr(make_csr(key, "db-2"))
    assert csr.subject.rfc4514_string() == "CN=db-2"
    assert csr.is_signature_valid
    assert csr.public_key() == key.public_key()


def test_csr_refuses_an_invalid_agent_id() -> None:
    with pytest.raises(IdentityError, match="agent id 'DB 2' is invalid"):
        make_csr(generate_key(), "DB 2")


def test_fingerprint_matches_the_controller_definition(ca: CertificateAuthority) -> None:
    der = ca.certificate.public_bytes(serialization.Encoding.DER)
    assert ca_fingerprint(ca.certificate_pem) == ca.fingerprint == hashlib.sha256(der).hexdigest()


def test_fingerprint_of_garbage_is_an_identity_error() -> None:
    with pytest.raises(IdentityError, match=r"not a PEM X\.509 certificate"):
        ca_fingerprint(b"garbage")


def test_check_certificate_tells_our_ca_from_another(
    ca: CertificateAuthority, tmp_path: Path
) -> None:
    other = CertificateAuthority.load_or_create(tmp_path / "other")
    creds = enroll(ca)

    assert check_certificate(creds.cert_pem, ca.certificate_pem) == creds.validity
    with pytest.raises(IdentityError, match="the certificate is not issued by the CA"):
        check_certificate(creds.cert_pem, other.certificate_pem)
    with pytest.raises(IdentityError, match=r"the certificate is not a PEM X\.509"):
        check_certificate(b"garbage", ca.certificate_pem)
    with pytest.raises(IdentityError, match=r"the CA certificate is not a PEM X\.509"):
        check_certificate(creds.cert_pem, b"garbage")


# --- files -----------------------------------------------------------------------------


def test_credentials_are_saved_private_and_load_back(
    ca: CertificateAuthority, tmp_path: Path
) -> None:
    directory = tmp_path / "state" / "identity"
    creds = enroll(ca)

    save_credentials(directory, creds)

    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    assert sorted(p.name for p in directory.iterdir()) == FILES
    for name in FILES:
        assert stat.S_IMODE((directory / name).stat().st_mode) == 0o600
    assert load_credentials(directory) == creds


def test_saving_again_replaces_all_three_files(ca: CertificateAuthority, tmp_path: Path) -> None:
    save_credentials(tmp_path, enroll(ca))
    renewed = enroll(ca)

    save_credentials(tmp_path, renewed)

    assert load_credentials(tmp_path) == renewed


def test_no_files_means_no_credentials(tmp_path: Path) -> None:
    assert load_credentials(tmp_path) is None
    assert load_credentials(tmp_path / "absent") is None


def test_a_missing_file_is_named(ca: CertificateAuthority, tmp_path: Path) -> None:
    save_credentials(tmp_path, enroll(ca))
    (tmp_path / "agent.crt").unlink()

    with pytest.raises(IdentityError, match=r"agent\.crt missing"):
        load_credentials(tmp_path)


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("agent.key", "agent.key is not an unencrypted PEM private key"),
        ("agent.crt", "agent.crt is not a PEM X.509 certificate"),
        ("ca.crt", "ca.crt is not a PEM X.509 certificate"),
    ],
)
def test_a_truncated_file_is_named(
    ca: CertificateAuthority, tmp_path: Path, name: str, message: str
) -> None:
    save_credentials(tmp_path, enroll(ca))
    data = (tmp_path / name).read_bytes()
    (tmp_path / name).write_bytes(data[: len(data) // 2])

    with pytest.raises(IdentityError, match=message):
        load_credentials(tmp_path)


def test_an_unreadable_file_is_named(ca: CertificateAuthority, tmp_path: Path) -> None:
    save_credentials(tmp_path, enroll(ca))
    (tmp_path / "ca.crt").unlink()
    (tmp_path / "ca.crt").mkdir()  # unreadable even for root

    with pytest.raises(IdentityError, match=r"cannot read .*ca\.crt"):
        load_credentials(tmp_path)


def test_a_key_that_does_not_match_the_certificate_is_refused(
    ca: CertificateAuthority, tmp_path: Path
) -> None:
    save_credentials(tmp_path, enroll(ca))
    (tmp_path / "agent.key").write_bytes(key_pem(generate_key()))  # changed by hand

    with pytest.raises(IdentityError, match=r"agent\.key does not match"):
        load_credentials(tmp_path)


def test_a_certificate_from_another_ca_is_refused(ca: CertificateAuthority, tmp_path: Path) -> None:
    other = CertificateAuthority.load_or_create(tmp_path / "other")
    state = tmp_path / "state"
    save_credentials(state, enroll(other))
    (state / "ca.crt").write_bytes(ca.certificate_pem)  # changed by hand

    with pytest.raises(IdentityError, match=r"agent\.crt is not issued by the CA"):
        load_credentials(state)


def test_a_save_interrupted_before_the_key_rename_keeps_the_old_files(
    ca: CertificateAuthority, tmp_path: Path
) -> None:
    state = tmp_path / "state"
    old = enroll(ca)
    save_credentials(state, old)
    for name in FILES:
        (state / pending_name(name, CRASHED_WRITE)).write_bytes(b"half written")

    assert load_credentials(state) == old
    assert sorted(p.name for p in state.iterdir()) == FILES


def test_a_save_interrupted_after_the_key_rename_is_finished(
    ca: CertificateAuthority, tmp_path: Path
) -> None:
    state = tmp_path / "state"
    save_credentials(state, enroll(ca))
    new = enroll(ca)
    (state / "agent.key").write_bytes(new.key_pem)
    (state / pending_name("agent.crt", CRASHED_WRITE)).write_bytes(new.cert_pem)
    (state / pending_name("ca.crt", CRASHED_WRITE)).write_bytes(new.ca_pem)

    assert load_credentials(state) == new
    assert sorted(p.name for p in state.iterdir()) == FILES


# --- renewal timing ------------------------------------------------------------------------


def credentials_valid(start: datetime, end: datetime) -> AgentCredentials:
    key = generate_key()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "web-1")])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .sign(key, hashes.SHA256())
    )
    return checked_credentials(key_pem(key), cert_pem(cert), cert_pem(cert))  # the key tool


def test_renewal_is_due_once_two_thirds_of_the_lifetime_has_passed() -> None:
    start = datetime(2030, 1, 1, tzinfo=UTC)
    creds = credentials_valid(start, start + 30 * DAY)

    assert (creds.not_before, creds.not_after) == (start, start + 30 * DAY)
    assert not creds.needs_renewal(start - DAY)
    assert not creds.needs_renewal(start + 20 * DAY - timedelta(seconds=1))
    assert creds.needs_renewal(start + 20 * DAY)
    assert creds.needs_renewal(start + 40 * DAY)


# --- enrollment tokens ---------------------------------------------------------------------


def test_a_controller_token_parses_on_the_agent(ca: CertificateAuthority) -> None:
    text, token_id, _digest = new_token(ca.fingerprint)

    token = parse_token(f"  {text}\n")

    assert (token.token_id, token.ca_fingerprint) == (token_id, ca.fingerprint)
    assert f"{token.token_id}.{token.secret}.{token.ca_fingerprint}" == text


SECRET = "Zz0_-" * 8 + "abc"
FINGERPRINT = "0f" * 32


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "found 1 part"),
        (f"0123456789ab.{SECRET}", "found 2 part"),
        (f"0123456789a.{SECRET}.{FINGERPRINT}", "id \\(first part\\)"),
        (f"0123456789ab.{SECRET}x.{FINGERPRINT}", "secret \\(second part\\)"),
        (f"0123456789ab.{SECRET[:-1]}=.{FINGERPRINT}", "secret \\(second part\\)"),
        (f"0123456789ab.{SECRET}.{FINGERPRINT.upper()}", "fingerprint \\(third part\\)"),
    ],
)
def test_token_parse_errors_name_the_part_and_hide_the_secret(text: str, message: str) -> None:
    with pytest.raises(IdentityError, match=message) as caught:
        parse_token(text)
    assert SECRET[:-1] not in str(caught.value)
