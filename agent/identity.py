"""The agent's own identity: its key, its certificate from the controller's CA, the CA
certificate it trusts, and the enrollment token that bootstraps them.

Self-contained on purpose (the agent never imports the controller): this mirrors the
controller's definitions of the CA fingerprint and the token format.

Files in the state directory (0700), each 0600: agent.key, agent.crt, ca.crt. They are
replaced together: each is written in full as ``<name>.new`` and fsynced, then renamed
into place, key first. Renaming the key is the commit point, so after a crash
``load_credentials`` either discards the pending files (the key was not renamed) or
finishes the renames (it was): the agent never pairs a new key with an old certificate.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from bulkhead.v1 import contract
from bulkhead.v1.contract import AGENT_ID_RULE, EnrollmentToken, is_valid_agent_id

KEY_FILE = "agent.key"
CERT_FILE = "agent.crt"
CA_FILE = "ca.crt"
_FILES = (KEY_FILE, CERT_FILE, CA_FILE)  # the key first: its rename commits a save
_PENDING = ".new"
RENEW_AFTER_FRACTION = 2 / 3


class IdentityError(Exception):
    """The agent's credentials or enrollment token are unusable; the message names which."""


@dataclass(frozen=True)
class AgentCredentials:
    """PEM key, certificate and CA certificate, as handed to grpc.ssl_channel_credentials."""

    key_pem: bytes
    cert_pem: bytes
    ca_pem: bytes

    @property
    def certificate(self) -> x509.Certificate:
        return _parse_cert(self.cert_pem, CERT_FILE)

    @property
    def not_before(self) -> datetime:
        return self.certificate.not_valid_before_utc

    @property
    def not_after(self) -> datetime:
        return self.certificate.not_valid_after_utc

    def key_matches(self) -> bool:
        """Whether the private key belongs to the certificate."""
        try:
            key = _parse_key(self.key_pem, Path(KEY_FILE))
        except IdentityError:
            return False
        return _spki(key.public_key()) == _spki(self.certificate.public_key())

    def needs_renewal(self, now: datetime) -> bool:
        """True once 2/3 of the certificate's lifetime has passed (NOW must be timezone-aware)."""
        cert = self.certificate
        start, end = cert.not_valid_before_utc, cert.not_valid_after_utc
        return now >= start + (end - start) * RENEW_AFTER_FRACTION


def generate_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def make_csr(key: ec.EllipticCurvePrivateKey, agent_id: str) -> bytes:
    """PEM CSR with subject CN=AGENT_ID (the controller decides the identity it certifies)."""
    if not is_valid_agent_id(agent_id):
        raise IdentityError(f"agent id {agent_id!r} is invalid: must be {AGENT_ID_RULE}")
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, agent_id)])
    csr = x509.CertificateSigningRequestBuilder().subject_name(subject).sign(key, hashes.SHA256())
    return csr.public_bytes(serialization.Encoding.PEM)


def ca_fingerprint(ca_pem: bytes) -> str:
    """Lowercase hex sha256 of the CA certificate's DER, as pinned by enrollment tokens."""
    cert = _parse_cert(ca_pem, "CA certificate")
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


def verify_issued_by(leaf_pem: bytes, ca_pem: bytes) -> bool:
    """Whether the CA's key signed the leaf certificate (signature and issuer name only)."""
    try:
        leaf = x509.load_pem_x509_certificate(leaf_pem)
        ca = x509.load_pem_x509_certificate(ca_pem)
        leaf.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm):
        return False
    return True


def parse_token(text: str) -> EnrollmentToken:
    """Split and check a token (format in bulkhead.v1.contract); IdentityError if malformed."""
    try:
        return contract.parse_token(text)
    except contract.TokenFormatError as exc:
        raise IdentityError(str(exc)) from exc


def save_credentials(directory: Path, creds: AgentCredentials) -> None:
    """Write agent.key, agent.crt and ca.crt (0600) so that they change together."""
    if not directory.is_dir():
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        directory.chmod(0o700)  # mkdir's mode is filtered by the umask
    contents = dict(zip(_FILES, (creds.key_pem, creds.cert_pem, creds.ca_pem), strict=True))
    for name in _FILES:
        _write_synced(_pending(directory / name), contents[name])
    _fsync_dir(directory)
    for name in _FILES:
        os.replace(_pending(directory / name), directory / name)
    _fsync_dir(directory)


def load_credentials(directory: Path) -> AgentCredentials | None:
    """The saved credentials, None if there are none; IdentityError naming the bad file."""
    if not directory.is_dir():
        return None
    _recover(directory)
    paths = [directory / name for name in _FILES]
    present = [path for path in paths if path.exists()]
    if not present:
        return None
    if len(present) != len(paths):
        missing = ", ".join(path.name for path in paths if path not in present)
        raise IdentityError(
            f"{missing} missing in {directory}: the agent's credentials are incomplete; "
            "remove the rest and enroll again with a new token"
        )
    key_data, cert_data, ca_data = (_read(path) for path in paths)
    key = _parse_key(key_data, paths[0])
    cert = _parse_cert(cert_data, str(paths[1]))
    _parse_cert(ca_data, str(paths[2]))
    if not verify_issued_by(cert_data, ca_data):
        raise IdentityError(f"{paths[1]} is not issued by the CA in {paths[2]}")
    if _spki(key.public_key()) != _spki(cert.public_key()):
        raise IdentityError(f"{paths[0]} does not match the certificate in {paths[1]}")
    return AgentCredentials(key_pem=key_data, cert_pem=cert_data, ca_pem=ca_data)


def _recover(directory: Path) -> None:
    pending = [_pending(directory / name) for name in _FILES]
    if pending[0].exists():  # crashed before the commit: the old files are intact
        for path in pending:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        return
    for name, path in zip(_FILES, pending, strict=True):
        if path.exists():  # crashed after the commit: finish it
            os.replace(path, directory / name)
    _fsync_dir(directory)


def _pending(path: Path) -> Path:
    return path.with_name(path.name + _PENDING)


def _write_synced(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)  # an existing file keeps its old mode otherwise
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise IdentityError(f"cannot read {path}: {exc.strerror}") from None


def _parse_cert(data: bytes, what: str) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(data)
    except ValueError:
        raise IdentityError(f"{what} is not a PEM X.509 certificate") from None


def _parse_key(data: bytes, path: Path) -> ec.EllipticCurvePrivateKey:
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise IdentityError(f"{path} is not an unencrypted PEM private key") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise IdentityError(f"{path} holds a {type(key).__name__}, expected an EC key")
    return key


def _spki(public_key: object) -> bytes:
    if not isinstance(public_key, ec.EllipticCurvePublicKey):
        return b""
    return public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
