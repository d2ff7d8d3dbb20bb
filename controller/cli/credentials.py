"""The operator's mutual-TLS credentials: a directory with operator.crt, operator.key, ca.crt.

`bulkhead-controller admin-cert --out DIR` writes the directory. Everything is checked here,
before any connection, because gRPC reports a bad file only as an unreachable controller.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from controller.cli.errors import BadInputError

CREDENTIALS_ENV = "BULKHEAD_CREDENTIALS"
DEFAULT_CREDENTIALS_DIR = "/etc/bulkhead/operator"
CERT_FILE = "operator.crt"
KEY_FILE = "operator.key"
CA_FILE = "ca.crt"
HOW_TO_GET = (
    "run 'bulkhead-controller admin-cert --name NAME --role admin --out DIR' on the controller "
    f"host, then 'export {CREDENTIALS_ENV}=DIR' (or pass --credentials DIR)"
)


@dataclass(frozen=True)
class OperatorCredentials:
    """The PEM texts of one operator identity and of the CA that vouches for the controller."""

    directory: Path
    ca_pem: bytes
    key_pem: bytes
    cert_pem: bytes

    def channel_credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(
            root_certificates=self.ca_pem,
            private_key=self.key_pem,
            certificate_chain=self.cert_pem,
        )


def load_credentials(directory: Path) -> OperatorCredentials:
    """Read and check the three files; raise BadInputError naming the faulty one."""
    ca_pem = _read(directory / CA_FILE)
    cert_pem = _read(directory / CERT_FILE)
    key_pem = _read(directory / KEY_FILE)
    _certificate(directory / CA_FILE, ca_pem)
    certificate = _certificate(directory / CERT_FILE, cert_pem)
    _check_key(directory, key_pem, certificate)
    _check_not_expired(directory / CERT_FILE, certificate)
    return OperatorCredentials(directory, ca_pem=ca_pem, key_pem=key_pem, cert_pem=cert_pem)


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        reason = (exc.strerror or str(exc)).lower()
        raise BadInputError(f"cannot read {path} ({reason}): {HOW_TO_GET}") from exc


def _certificate(path: Path, pem: bytes) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(pem)
    except ValueError as exc:
        raise BadInputError(f"{path} is not a PEM X.509 certificate: {HOW_TO_GET}") from exc


def _check_key(directory: Path, pem: bytes, certificate: x509.Certificate) -> None:
    path = directory / KEY_FILE
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError) as exc:
        # TypeError: the key is encrypted; gRPC cannot ask for a passphrase.
        raise BadInputError(f"{path} is not an unencrypted PEM private key: {HOW_TO_GET}") from exc
    raw = serialization.PublicFormat.SubjectPublicKeyInfo
    der = serialization.Encoding.DER
    if key.public_key().public_bytes(der, raw) != certificate.public_key().public_bytes(der, raw):
        raise BadInputError(
            f"{path} does not belong to {directory / CERT_FILE}: "
            f"keep the pair written together; {HOW_TO_GET}"
        )


def _check_not_expired(path: Path, certificate: x509.Certificate) -> None:
    expiry = certificate.not_valid_after_utc
    if expiry <= datetime.datetime.now(tz=datetime.UTC):
        when = expiry.strftime("%Y-%m-%d %H:%M:%S UTC")
        raise BadInputError(f"{path} expired on {when}: to get a new one, {HOW_TO_GET}")
