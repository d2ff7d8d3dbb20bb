"""The controller's CA: files, issuance, identities in certificates, tokens, and one real
mTLS handshake through gRPC with the issued certificates."""

from __future__ import annotations

import base64
import hashlib
import stat
from collections.abc import Iterator
from concurrent import futures
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import cast

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from bulkhead.privatefile import pending_name
from controller.pki import (
    CONTROLLER_NAME,
    CertificateAuthority,
    Identity,
    PkiError,
    cert_pem,
    certificate_from_pem,
    identity_from_certificate,
    identity_from_pem,
    new_token,
    parse_token,
    secret_digest,
    secret_matches,
)
from tests.pki_support import CRASHED_WRITE

DAY = timedelta(days=1)
PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey


def make_csr(key: PrivateKey, sans: list[x509.GeneralName] | None = None) -> bytes:
    builder = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "someone-else")])
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    algorithm = None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()
    return builder.sign(key, algorithm).public_bytes(serialization.Encoding.PEM)


def p256() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def pem_of_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def self_signed(sans: list[x509.GeneralName] | None, *, ca: bool = False) -> x509.Certificate:
    """A throwaway certificate carrying exactly the SANs given (None: no SAN extension)."""
    key = p256()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "t")])
    now = datetime.now(UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - DAY)
        .not_valid_after(now + DAY)
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if sans is not None:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return builder.sign(key, hashes.SHA256())


def extended_usages(cert: x509.Certificate) -> list[x509.ObjectIdentifier]:
    return list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)


@pytest.fixture
def ca(tmp_path: Path) -> CertificateAuthority:
    return CertificateAuthority.load_or_create(tmp_path / "ca")


# --- the CA's own files ----------------------------------------------------------------


def test_ca_is_created_with_private_modes_and_reloads_identically(tmp_path: Path) -> None:
    directory = tmp_path / "state" / "ca"
    created = CertificateAuthority.load_or_create(directory, common_name="Test CA")

    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    assert stat.S_IMODE((directory / "ca.key").stat().st_mode) == 0o600
    assert stat.S_IMODE((directory / "ca.crt").stat().st_mode) == 0o644
    assert sorted(p.name for p in directory.iterdir()) == ["ca.crt", "ca.key"]
    loaded = CertificateAuthority.load_or_create(directory)
    assert loaded.fingerprint == created.fingerprint
    assert loaded.certificate_pem == (directory / "ca.crt").read_bytes()
    der = created.certificate.public_bytes(serialization.Encoding.DER)
    assert created.fingerprint == hashlib.sha256(der).hexdigest()


def test_ca_certificate_is_a_pathlen_zero_signing_ca(ca: CertificateAuthority) -> None:
    ext = ca.certificate.extensions
    constraints = ext.get_extension_for_class(x509.BasicConstraints)
    usage = ext.get_extension_for_class(x509.KeyUsage).value
    assert constraints.critical
    assert (constraints.value.ca, constraints.value.path_length) == (True, 0)
    assert usage.key_cert_sign
    assert usage.crl_sign
    assert not usage.digital_signature
    ext.get_extension_for_class(x509.SubjectKeyIdentifier)
    ca.certificate.verify_directly_issued_by(ca.certificate)


@pytest.mark.parametrize(("kept", "missing"), [("ca.key", "ca.crt"), ("ca.crt", "ca.key")])
def test_half_created_ca_directory_is_refused(tmp_path: Path, kept: str, missing: str) -> None:
    source = tmp_path / "source"
    CertificateAuthority.load_or_create(source)
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    (damaged / kept).write_bytes((source / kept).read_bytes())

    with pytest.raises(PkiError, match=f"has {kept} but no {missing}"):
        CertificateAuthority.load_or_create(damaged)
    assert sorted(p.name for p in damaged.iterdir()) == [kept]


def test_ca_key_not_matching_the_certificate_is_refused(tmp_path: Path) -> None:
    first = tmp_path / "first"
    second = tmp_path / "second"
    CertificateAuthority.load_or_create(first)
    CertificateAuthority.load_or_create(second)
    (first / "ca.key").write_bytes((second / "ca.key").read_bytes())

    with pytest.raises(PkiError, match="key does not match"):
        CertificateAuthority.load_or_create(first)


def test_interrupted_creation_is_finished_after_the_key_was_committed(tmp_path: Path) -> None:
    source = tmp_path / "source"
    original = CertificateAuthority.load_or_create(source)
    crashed = tmp_path / "crashed"
    crashed.mkdir()
    (crashed / "ca.key").write_bytes((source / "ca.key").read_bytes())
    (crashed / pending_name("ca.crt", CRASHED_WRITE)).write_bytes((source / "ca.crt").read_bytes())

    recovered = CertificateAuthority.load_or_create(crashed)

    assert recovered.fingerprint == original.fingerprint
    assert sorted(p.name for p in crashed.iterdir()) == ["ca.crt", "ca.key"]


def test_interrupted_creation_before_the_commit_starts_afresh(tmp_path: Path) -> None:
    crashed = tmp_path / "crashed"
    crashed.mkdir()
    (crashed / pending_name("ca.key", CRASHED_WRITE)).write_bytes(
        b"-----BEGIN PRIVATE KEY-----\ntrunc"
    )

    CertificateAuthority.load_or_create(crashed)

    assert sorted(p.name for p in crashed.iterdir()) == ["ca.crt", "ca.key"]


def test_from_files_accepts_an_operator_ca_without_key_identifier(tmp_path: Path) -> None:
    key = p256()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Corp CA")])
    now = datetime.now(UTC)
    corp = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - DAY)
        .not_valid_after(now + 30 * DAY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    (tmp_path / "corp.crt").write_bytes(cert_pem(corp))
    (tmp_path / "corp.key").write_bytes(pem_of_key(key))

    authority = CertificateAuthority.from_files(tmp_path / "corp.crt", tmp_path / "corp.key")
    leaf = authority.issue_agent(make_csr(p256()), "web-1", 365 * DAY)

    leaf.verify_directly_issued_by(corp)
    assert leaf.not_valid_after_utc == corp.not_valid_after_utc  # never outlives its CA
    aki = leaf.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    assert aki == x509.AuthorityKeyIdentifier.from_issuer_public_key(key.public_key())


def test_from_files_refuses_a_leaf_certificate_as_ca(tmp_path: Path) -> None:
    leaf = self_signed([x509.DNSName("x")], ca=False)
    (tmp_path / "leaf.crt").write_bytes(cert_pem(leaf))
    (tmp_path / "leaf.key").write_bytes(pem_of_key(p256()))

    with pytest.raises(PkiError, match="not a CA certificate"):
        CertificateAuthority.from_files(tmp_path / "leaf.crt", tmp_path / "leaf.key")


@pytest.mark.parametrize(
    ("cert_text", "key_text", "message"),
    [
        (None, b"garbage", "not an unencrypted PEM private key"),
        (b"garbage", None, "not a PEM X.509 certificate"),
    ],
)
def test_from_files_names_the_unparseable_file(
    ca: CertificateAuthority,
    tmp_path: Path,
    cert_text: bytes | None,
    key_text: bytes | None,
    message: str,
) -> None:
    cert_path, key_path = tmp_path / "ca" / "ca.crt", tmp_path / "ca" / "ca.key"
    if cert_text is not None:
        cert_path.write_bytes(cert_text)
    if key_text is not None:
        key_path.write_bytes(key_text)

    with pytest.raises(PkiError, match=message):
        CertificateAuthority.from_files(cert_path, key_path)


# --- issuance ------------------------------------------------------------------------------


def test_agent_certificate_ignores_the_identity_the_csr_asks_for(ca: CertificateAuthority) -> None:
    key = p256()
    csr = make_csr(
        key,
        [
            x509.UniformResourceIdentifier("spiffe://bulkhead/operator/admin/root"),
            x509.DNSName(CONTROLLER_NAME),
        ],
    )

    cert = ca.issue_agent(csr, "web-1", 30 * DAY)

    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert list(sans) == [x509.UniformResourceIdentifier("spiffe://bulkhead/agent/web-1")]
    assert cert.subject.rfc4514_string() == "CN=web-1"
    assert identity_from_certificate(cert) == Identity("agent", "web-1", None)
    assert cert.public_key() == key.public_key()
    assert extended_usages(cert) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    cert.verify_directly_issued_by(ca.certificate)


def test_validity_starts_five_minutes_early_and_ends_after_ttl(ca: CertificateAuthority) -> None:
    before = datetime.now(UTC).replace(microsecond=0)
    cert = ca.issue_agent(make_csr(p256()), "web-1", 7 * DAY)
    after = datetime.now(UTC)

    assert before - timedelta(minutes=5) <= cert.not_valid_before_utc
    assert cert.not_valid_before_utc <= after - timedelta(minutes=5)
    assert cert.not_valid_after_utc - cert.not_valid_before_utc == 7 * DAY + timedelta(minutes=5)


def test_csr_with_a_bad_signature_is_refused(ca: CertificateAuthority) -> None:
    der = bytearray(
        x509.load_pem_x509_csr(make_csr(p256())).public_bytes(serialization.Encoding.DER)
    )
    der[-1] ^= 0x01  # the last byte of the ECDSA signature
    pem = (
        b"-----BEGIN CERTIFICATE REQUEST-----\n"
        + base64.encodebytes(bytes(der))
        + b"-----END CERTIFICATE REQUEST-----\n"
    )

    with pytest.raises(PkiError, match="invalid signature"):
        ca.issue_agent(pem, "web-1", DAY)


@pytest.mark.parametrize(
    ("key", "message"),
    [
        (ec.generate_private_key(ec.SECP384R1()), "use EC P-256"),
        (rsa.generate_private_key(public_exponent=65537, key_size=1024), "RSA-1024"),
        (ed25519.Ed25519PrivateKey.generate(), "not accepted"),
    ],
    ids=["p384", "rsa1024", "ed25519"],
)
def test_csr_with_a_weak_or_foreign_key_is_refused(
    ca: CertificateAuthority, key: PrivateKey, message: str
) -> None:
    with pytest.raises(PkiError, match=message):
        ca.issue_agent(make_csr(key), "web-1", DAY)


def test_csr_with_rsa_2048_is_accepted(ca: CertificateAuthority) -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    cert = ca.issue_agent(make_csr(key), "web-1", DAY)
    assert cert.extensions.get_extension_for_class(x509.KeyUsage).value.key_encipherment


@pytest.mark.parametrize(
    ("csr", "agent_id", "ttl", "message"),
    [
        (b"not a csr", "web-1", DAY, "does not parse"),
        (None, "Web 1", DAY, "agent id 'Web 1' is invalid"),
        (None, "web-1", timedelta(0), "lifetime must be positive"),
    ],
)
def test_agent_issuance_refuses_bad_input(
    ca: CertificateAuthority, csr: bytes | None, agent_id: str, ttl: timedelta, message: str
) -> None:
    with pytest.raises(PkiError, match=message):
        ca.issue_agent(csr or make_csr(p256()), agent_id, ttl)


def test_server_certificate_names_the_controller_for_server_auth_only(
    ca: CertificateAuthority,
) -> None:
    cert_text, key_text = ca.issue_server(["198.18.0.1", "ctl.example.", CONTROLLER_NAME])

    cert = certificate_from_pem(cert_text)
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == [CONTROLLER_NAME, "ctl.example"]
    assert [str(ip) for ip in sans.get_values_for_type(x509.IPAddress)] == ["198.18.0.1"]
    assert sans.get_values_for_type(x509.UniformResourceIdentifier) == []
    assert extended_usages(cert) == [ExtendedKeyUsageOID.SERVER_AUTH]
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    key = serialization.load_pem_private_key(key_text, password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    assert isinstance(key.curve, ec.SECP256R1)
    assert cert.public_key() == key.public_key()
    cert.verify_directly_issued_by(ca.certificate)


def test_server_san_that_is_neither_ip_nor_dns_is_refused(ca: CertificateAuthority) -> None:
    with pytest.raises(PkiError, match="'not a name!' is neither an IP address"):
        ca.issue_server(["not a name!"])


def test_operator_certificate_carries_role_and_client_auth_only(
    ca: CertificateAuthority,
) -> None:
    cert_text, key_text = ca.issue_operator("alice", "admin")

    cert = certificate_from_pem(cert_text)
    identity = identity_from_pem(cert_text)
    assert identity == Identity("operator", "alice", "admin")
    assert identity.uri == "spiffe://bulkhead/operator/admin/alice"
    assert extended_usages(cert) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    key = serialization.load_pem_private_key(key_text, password=None)
    assert cert.public_key() == key.public_key()


@pytest.mark.parametrize(
    ("name", "role", "message"),
    [("alice", "root", "role 'root' is invalid"), ("Alice!", "viewer", "name 'Alice!'")],
)
def test_operator_issuance_refuses_bad_name_or_role(
    ca: CertificateAuthority, name: str, role: str, message: str
) -> None:
    with pytest.raises(PkiError, match=message):
        ca.issue_operator(name, role)


# --- identities in certificates ------------------------------------------------------


def uri(text: str) -> x509.GeneralName:
    return x509.UniformResourceIdentifier(text)


@pytest.mark.parametrize(
    ("sans", "expected"),
    [
        ([uri("spiffe://bulkhead/agent/db-2")], Identity("agent", "db-2", None)),
        (
            [x509.DNSName("h"), uri("spiffe://bulkhead/operator/viewer/bob")],
            Identity("operator", "bob", "viewer"),
        ),
    ],
)
def test_identity_is_read_from_the_one_uri_san(
    sans: list[x509.GeneralName], expected: Identity
) -> None:
    assert identity_from_certificate(self_signed(sans)) == expected


@pytest.mark.parametrize(
    ("sans", "message"),
    [
        (None, "no subjectAltName"),
        ([x509.DNSName("web-1")], "has 0 URI SANs"),
        (
            [uri("spiffe://bulkhead/agent/a"), uri("spiffe://bulkhead/agent/b")],
            "has 2 URI SANs",
        ),
        ([uri("spiffe://other/agent/a")], "not a Bulkhead identity"),
        ([uri("spiffe://bulkhead/agent/Bad_ID")], "agent id 'Bad_ID' is invalid"),
        ([uri("spiffe://bulkhead/operator/root/alice")], "role 'root' is invalid"),
        ([uri("spiffe://bulkhead/operator/admin")], "must be spiffe://bulkhead/operator/"),
    ],
    ids=["no-san", "no-uri", "two-uris", "foreign", "bad-agent", "bad-role", "no-name"],
)
def test_identity_is_refused_without_exactly_one_known_uri(
    sans: list[x509.GeneralName] | None, message: str
) -> None:
    with pytest.raises(PkiError, match=message):
        identity_from_certificate(self_signed(sans))


def test_garbage_pem_is_a_pki_error() -> None:
    with pytest.raises(PkiError, match=r"not a PEM X\.509 certificate"):
        identity_from_pem(b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")


def test_identity_refuses_a_role_on_an_agent() -> None:
    with pytest.raises(PkiError, match="cannot have a role"):
        Identity("agent", "web-1", "admin")


# --- enrollment tokens ---------------------------------------------------------------------


def test_new_token_parses_back_and_stores_only_a_digest(ca: CertificateAuthority) -> None:
    text, token_id, digest = new_token(ca.fingerprint)

    parsed_id, secret, fingerprint = parse_token(text + "\n")  # unpacks like a tuple
    assert (parsed_id, fingerprint) == (token_id, ca.fingerprint)
    assert len(secret) == 43
    assert digest == secret_digest(secret) != secret
    assert secret_matches(secret, digest)
    assert not secret_matches("x" * 43, digest)


SECRET = "s" * 43
FINGERPRINT = "ab" * 32


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("abc", "found 1 part"),
        (f"0123456789ab.{SECRET}.{FINGERPRINT}.x", "found 4 part"),
        (f"0123456789AB.{SECRET}.{FINGERPRINT}", "id \\(first part\\)"),
        (f"0123456789ab.{SECRET[:-1]}.{FINGERPRINT}", "secret \\(second part\\)"),
        (f"0123456789ab.{SECRET[:-1]}+.{FINGERPRINT}", "secret \\(second part\\)"),
        (f"0123456789ab.{SECRET}.{FINGERPRINT[:-1]}", "fingerprint \\(third part\\)"),
    ],
)
def test_token_parse_errors_name_the_part_and_hide_the_secret(text: str, message: str) -> None:
    with pytest.raises(PkiError, match=message) as caught:
        parse_token(text)
    assert SECRET[:-1] not in str(caught.value)


def test_new_token_refuses_a_malformed_fingerprint() -> None:
    with pytest.raises(PkiError, match="64 lowercase hex"):
        new_token("AB" * 32)


# --- a real mTLS handshake through gRPC -------------------------------------------------------

WHO = "/bulkhead.test.Probe/Who"


def _who(_request: bytes, context: grpc.ServicerContext) -> bytes:
    # grpc-stubs types the values as bytes; grpcio gives a list of bytes per property.
    pems = cast("list[bytes] | None", context.auth_context().get("x509_pem_cert"))
    return identity_from_pem(pems[0]).uri.encode() if pems else b"anonymous"


def _serve(ca: CertificateAuthority, *, require_client_auth: bool) -> tuple[grpc.Server, int]:
    cert_text, key_text = ca.issue_server(["127.0.0.1"])
    handler = grpc.method_handlers_generic_handler(
        "bulkhead.test.Probe", {"Who": grpc.unary_unary_rpc_method_handler(_who)}
    )
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2), handlers=[handler])
    credentials = grpc.ssl_server_credentials(
        [(key_text, cert_text)],
        root_certificates=ca.certificate_pem,
        require_client_auth=require_client_auth,
    )
    port = server.add_secure_port("127.0.0.1:0", credentials)
    server.start()
    return server, port


@pytest.fixture
def mtls_server(ca: CertificateAuthority) -> Iterator[int]:
    server, port = _serve(ca, require_client_auth=True)
    try:
        yield port
    finally:
        server.stop(grace=None)


def _call(port: int, credentials: grpc.ChannelCredentials | None) -> bytes:
    target = f"127.0.0.1:{port}"
    if credentials is None:
        channel = grpc.insecure_channel(target)
    else:
        options = [("grpc.ssl_target_name_override", CONTROLLER_NAME)]
        channel = grpc.secure_channel(target, credentials, options=options)
    with channel:
        reply: bytes = channel.unary_unary(WHO, None, None)(b"", timeout=10)
        return reply


def _client(key_text: bytes, cert_text: bytes, root: bytes) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(
        root_certificates=root, private_key=key_text, certificate_chain=cert_text
    )


def test_mtls_server_sees_the_agent_identity(ca: CertificateAuthority, mtls_server: int) -> None:
    key = p256()
    cert = ca.issue_agent(make_csr(key), "web-1", DAY)

    reply = _call(mtls_server, _client(pem_of_key(key), cert_pem(cert), ca.certificate_pem))

    assert reply == b"spiffe://bulkhead/agent/web-1"


def test_mtls_refuses_a_client_certificate_from_another_ca(
    ca: CertificateAuthority, mtls_server: int, tmp_path: Path
) -> None:
    other = CertificateAuthority.load_or_create(tmp_path / "other")
    key = p256()
    cert = other.issue_agent(make_csr(key), "web-1", DAY)

    with pytest.raises(grpc.RpcError) as caught:
        _call(mtls_server, _client(pem_of_key(key), cert_pem(cert), ca.certificate_pem))
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE


def test_mtls_refuses_a_plaintext_client(mtls_server: int) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        _call(mtls_server, None)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE


def test_without_required_client_auth_grpc_does_not_ask_for_a_certificate(
    ca: CertificateAuthority,
) -> None:
    # grpcio maps require_client_auth=False to "do not request a client certificate", so
    # such a port cannot learn who a client is: identities need require_client_auth=True.
    server, port = _serve(ca, require_client_auth=False)
    try:
        key = p256()
        cert = ca.issue_agent(make_csr(key), "web-1", DAY)
        reply = _call(port, _client(pem_of_key(key), cert_pem(cert), ca.certificate_pem))
    finally:
        server.stop(grace=None)
    assert reply == b"anonymous"
