"""Simulated agents' credentials on disk, so a later run reuses them instead of enrolling
every agent again (the controller refuses to enroll an id that already holds a live
certificate).

    DIR/ca.crt                       the controller's CA, pinned when the first agent enrolled
    DIR/agents/<agent id>.key, .crt  each agent's key and certificate (0600)

Files are written by the shared private-file writer (bulkhead.privatefile), without its
fsyncs: this is a load tool's cache, and ten thousand fsyncs would cost more than the
enrollments themselves.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization

from bulkhead.privatefile import write_private_file
from controller.sim.errors import SimError

CA_FILE = "ca.crt"
AGENTS_DIR = "agents"


@dataclass(frozen=True)
class AgentCredentials:
    """One simulated agent's PEM key and certificate (the CA is the cache's)."""

    key_pem: bytes
    cert_pem: bytes


class CredentialCache:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._agents = directory / AGENTS_DIR

    def ca_pem(self) -> bytes | None:
        """The pinned CA certificate, None before the first enrollment."""
        try:
            return (self.directory / CA_FILE).read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise SimError(f"--credentials: cannot read {self.directory / CA_FILE}: {exc}") from exc

    def save_ca(self, pem: bytes) -> None:
        self._prepare()
        _write(self.directory / CA_FILE, pem)

    def save(self, agent_id: str, credentials: AgentCredentials) -> None:
        self._prepare()
        _write(self._agents / f"{agent_id}.key", credentials.key_pem)
        _write(self._agents / f"{agent_id}.crt", credentials.cert_pem)

    def load(
        self, agent_ids: list[str], *, now: datetime | None = None
    ) -> tuple[dict[str, AgentCredentials], dict[str, str]]:
        """The usable cached credentials of AGENT_IDS, and why each unusable one is not
        (absent ids are in neither: they still need enrolling)."""
        ca_pem = self.ca_pem()
        if ca_pem is None:
            return {}, {}
        ca = _certificate(ca_pem, self.directory / CA_FILE)
        moment = now or datetime.now(UTC)
        usable: dict[str, AgentCredentials] = {}
        problems: dict[str, str] = {}
        for agent_id in agent_ids:
            key_path, cert_path = self._agents / f"{agent_id}.key", self._agents / f"{agent_id}.crt"
            if not key_path.exists() and not cert_path.exists():
                continue
            try:
                credentials = AgentCredentials(key_path.read_bytes(), cert_path.read_bytes())
            except OSError as exc:
                problems[agent_id] = f"cannot read its files: {exc.strerror}"
                continue
            problem = _problem(credentials, ca, moment)
            if problem is None:
                usable[agent_id] = credentials
            else:
                problems[agent_id] = problem
        return usable, problems

    def _prepare(self) -> None:
        try:
            self._agents.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as exc:
            raise SimError(f"--credentials: cannot create {self._agents}: {exc}") from exc


def _problem(credentials: AgentCredentials, ca: x509.Certificate, now: datetime) -> str | None:
    """Why cached credentials cannot be used, or None."""
    try:
        cert = x509.load_pem_x509_certificate(credentials.cert_pem)
        key = serialization.load_pem_private_key(credentials.key_pem, password=None)
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm):
        return "key or certificate unreadable, or not issued by the cached CA"
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    der = serialization.Encoding.DER
    if key.public_key().public_bytes(der, spki) != cert.public_key().public_bytes(der, spki):
        return "the key does not belong to the certificate"
    if cert.not_valid_after_utc <= now:
        return f"certificate expired at {cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC"
    return None


def _certificate(pem: bytes, path: Path) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(pem)
    except ValueError as exc:
        raise SimError(f"--credentials: {path} is not a PEM certificate") from exc


def _write(path: Path, data: bytes) -> None:
    try:
        write_private_file(path, data, durable=False)
    except OSError as exc:  # UnsafeLocation included: its text names the path and why
        raise SimError(f"--credentials: cannot write {path}: {exc}") from exc
