"""The controller's private CA: creates or loads its key and certificate and issues the
server certificate, agent certificates (from CSRs) and operator certificates.

Every certificate: EC P-256 keys where we generate them, a random serial, subject and
authority key identifiers, validity starting a few minutes in the past so that clocks a
little behind ours accept it, and never outliving the CA.
"""

from __future__ import annotations

import hashlib
import ipaddress
import re
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from bulkhead.privatefile import PrivateFile, recover_private_group, write_private_group
from controller.pki.errors import PkiError
from controller.pki.identity import CONTROLLER_NAME, Identity, check_agent_id, check_operator

CA_KEY_FILE = "ca.key"
CA_CERT_FILE = "ca.crt"
CA_TTL = timedelta(days=3650)
SERVER_TTL = timedelta(days=90)
OPERATOR_TTL = timedelta(days=365)
CLOCK_SKEW = timedelta(minutes=5)
MIN_RSA_BITS = 2048
_DNS_LABEL = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")

CaKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey


def cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def private_key_pem(key: CaKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


class CertificateAuthority:
    """A CA certificate with its matching signing key, checked on construction."""

    cert_pem = staticmethod(cert_pem)

    def __init__(self, certificate: x509.Certificate, key: CaKey, *, source: str = "CA") -> None:
        _check_ca(certificate, key, source)
        self._cert = certificate
        self._key = key

    @classmethod
    def load_or_create(
        cls, directory: Path, *, common_name: str = "Bulkhead controller CA"
    ) -> CertificateAuthority:
        """Load ca.key/ca.crt from DIRECTORY, creating both (atomically) if neither exists."""
        key_path, cert_path = directory / CA_KEY_FILE, directory / CA_CERT_FILE
        try:
            recover_private_group(directory, (CA_KEY_FILE, CA_CERT_FILE))
        except OSError as exc:  # UnsafeLocation included: its text names the path and why
            raise PkiError(str(exc)) from exc
        have_key, have_cert = key_path.exists(), cert_path.exists()
        if have_key and have_cert:
            return cls.from_files(cert_path, key_path)
        if have_key or have_cert:
            present, missing = (key_path, cert_path) if have_key else (cert_path, key_path)
            raise PkiError(
                f"CA directory {directory} has {present.name} but no {missing.name}: it is "
                f"damaged or half-created; restore {missing.name} or move the directory "
                "aside to create a new CA (every agent must then enroll again)"
            )
        key = ec.generate_private_key(ec.SECP256R1())
        cert = _self_signed_ca(key, common_name)
        files = [
            PrivateFile(CA_KEY_FILE, private_key_pem(key)),
            PrivateFile(CA_CERT_FILE, cert_pem(cert), 0o644),
        ]
        try:
            write_private_group(directory, files)
        except OSError as exc:
            raise PkiError(str(exc)) from exc
        return cls(cert, key, source=str(cert_path))

    @classmethod
    def from_files(cls, cert_path: Path, key_path: Path) -> CertificateAuthority:
        """An existing CA (ours or the operator's): must be a CA certificate with its key."""
        cert = _load_cert(cert_path)
        key = _load_key(key_path)
        return cls(cert, key, source=f"{cert_path} with key {key_path}")

    @property
    def certificate(self) -> x509.Certificate:
        return self._cert

    @property
    def certificate_pem(self) -> bytes:
        return cert_pem(self._cert)

    @property
    def fingerprint(self) -> str:
        """Lowercase hex sha256 of the CA certificate's DER: what enrollment tokens pin."""
        return hashlib.sha256(self._cert.public_bytes(serialization.Encoding.DER)).hexdigest()

    def issue_server(
        self, extra_sans: Sequence[str] = (), ttl: timedelta = SERVER_TTL
    ) -> tuple[bytes, bytes]:
        """(cert PEM, key PEM) for the controller: DNS SAN bulkhead-controller plus EXTRA_SANS."""
        sans: list[x509.GeneralName] = [x509.DNSName(CONTROLLER_NAME)]
        for text in extra_sans:
            name = _parse_san(text)
            if name not in sans:
                sans.append(name)
        key = ec.generate_private_key(ec.SECP256R1())
        cert = self._sign_leaf(
            CONTROLLER_NAME, key.public_key(), sans, ExtendedKeyUsageOID.SERVER_AUTH, ttl
        )
        return cert_pem(cert), private_key_pem(key)

    def issue_agent(self, csr_pem: bytes, agent_id: str, ttl: timedelta) -> x509.Certificate:
        """Sign the CSR's public key for AGENT_ID; the CSR's own subject and SANs are ignored:
        the identity comes from the enrollment that the caller checked, not from the agent."""
        check_agent_id(agent_id)
        public_key = _checked_csr_key(csr_pem)
        uri = x509.UniformResourceIdentifier(Identity("agent", agent_id).uri)
        return self._sign_leaf(agent_id, public_key, [uri], ExtendedKeyUsageOID.CLIENT_AUTH, ttl)

    def issue_operator(
        self, name: str, role: str, ttl: timedelta = OPERATOR_TTL
    ) -> tuple[bytes, bytes]:
        """(cert PEM, key PEM) for operator NAME with ROLE (admin or viewer)."""
        check_operator(name, role)
        key = ec.generate_private_key(ec.SECP256R1())
        uri = x509.UniformResourceIdentifier(Identity("operator", name, role).uri)
        cert = self._sign_leaf(name, key.public_key(), [uri], ExtendedKeyUsageOID.CLIENT_AUTH, ttl)
        return cert_pem(cert), private_key_pem(key)

    def _sign_leaf(
        self,
        common_name: str,
        public_key: ec.EllipticCurvePublicKey | rsa.RSAPublicKey,
        sans: list[x509.GeneralName],
        usage: x509.ObjectIdentifier,
        ttl: timedelta,
    ) -> x509.Certificate:
        if ttl <= timedelta(0):
            raise PkiError(f"certificate lifetime must be positive, got {ttl}")
        now = datetime.now(UTC)
        ca_expiry = self._cert.not_valid_after_utc
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name(common_name))
            .issuer_name(self._cert.subject)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - CLOCK_SKEW)
            .not_valid_after(min(now + ttl, ca_expiry))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                _key_usage(
                    digital_signature=True,
                    # TLS 1.2 RSA key exchange encrypts to the leaf key.
                    key_encipherment=isinstance(public_key, rsa.RSAPublicKey),
                ),
                critical=True,
            )
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
            .add_extension(self._authority_key_id(), critical=False)
        )
        return builder.sign(self._key, hashes.SHA256())

    def _authority_key_id(self) -> x509.AuthorityKeyIdentifier:
        try:
            ski = self._cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
        except x509.ExtensionNotFound:
            return x509.AuthorityKeyIdentifier.from_issuer_public_key(self._key.public_key())
        return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski.value)


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _key_usage(
    *, digital_signature: bool = False, key_encipherment: bool = False, ca: bool = False
) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=digital_signature,
        content_commitment=False,
        key_encipherment=key_encipherment,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=ca,
        crl_sign=ca,
        encipher_only=False,
        decipher_only=False,
    )


def _self_signed_ca(key: ec.EllipticCurvePrivateKey, common_name: str) -> x509.Certificate:
    now = datetime.now(UTC)
    public_key = key.public_key()
    return (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(_name(common_name))
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(now + CA_TTL)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(ca=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(public_key), critical=False
        )
        .sign(key, hashes.SHA256())
    )


def _check_ca(cert: x509.Certificate, key: CaKey, source: str) -> None:
    if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
        raise PkiError(f"{source}: the CA key must be an EC or RSA key")
    try:
        constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        constraints = None
    except ValueError as exc:
        raise PkiError(f"{source}: the CA certificate's extensions do not parse: {exc}") from None
    if constraints is None or not constraints.ca:
        raise PkiError(f"{source}: not a CA certificate (basicConstraints CA:TRUE is missing)")
    try:
        usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        usage = None
    if usage is not None and not usage.key_cert_sign:
        raise PkiError(f"{source}: the CA certificate's keyUsage does not allow keyCertSign")
    if _spki(cert.public_key()) != _spki(key.public_key()):
        raise PkiError(f"{source}: the CA key does not match the CA certificate")
    if cert.not_valid_after_utc <= datetime.now(UTC):
        raise PkiError(
            f"{source}: the CA certificate expired on {cert.not_valid_after_utc:%Y-%m-%d}"
        )


def _spki(public_key: object) -> bytes:
    if not isinstance(public_key, ec.EllipticCurvePublicKey | rsa.RSAPublicKey):
        return b""
    return public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _checked_csr_key(csr_pem: bytes) -> ec.EllipticCurvePublicKey | rsa.RSAPublicKey:
    try:
        csr = x509.load_pem_x509_csr(csr_pem)
        signature_ok = csr.is_signature_valid
        public_key = csr.public_key()
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise PkiError(f"certificate signing request does not parse: {exc}") from None
    if not signature_ok:
        raise PkiError("certificate signing request has an invalid signature")
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        if not isinstance(public_key.curve, ec.SECP256R1):
            raise PkiError(
                f"certificate signing request key is EC {public_key.curve.name}: "
                "use EC P-256 (secp256r1)"
            )
        return public_key
    if isinstance(public_key, rsa.RSAPublicKey):
        if public_key.key_size < MIN_RSA_BITS:
            raise PkiError(
                f"certificate signing request key is RSA-{public_key.key_size}: "
                f"use EC P-256 or RSA of at least {MIN_RSA_BITS} bits"
            )
        return public_key
    raise PkiError(
        f"certificate signing request key type {type(public_key).__name__} is not accepted: "
        "use EC P-256"
    )


def _parse_san(text: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(text.strip()))
    except ValueError:
        pass
    name = text.strip().lower().removesuffix(".")
    labels = name.split(".")
    if not name or len(name) > 253 or not all(_DNS_LABEL.fullmatch(label) for label in labels):
        raise PkiError(f"server SAN {text!r} is neither an IP address nor a valid DNS name")
    return x509.DNSName(name)


def _load_cert(path: Path) -> x509.Certificate:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise PkiError(f"cannot read CA certificate {path}: {exc.strerror}") from None
    try:
        return x509.load_pem_x509_certificate(data)
    except ValueError:
        raise PkiError(f"CA certificate {path} is not a PEM X.509 certificate") from None


def _load_key(path: Path) -> CaKey:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise PkiError(f"cannot read CA key {path}: {exc.strerror}") from None
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise PkiError(
            f"CA key {path} is not an unencrypted PEM private key (PKCS#8 or traditional)"
        ) from None
    if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
        raise PkiError(f"CA key {path} is a {type(key).__name__}: use an EC or RSA key")
    return key
