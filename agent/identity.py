"""The agent's own identity: its key, its certificate from the controller's CA, the CA
certificate it trusts, and the enrollment token that bootstraps them.

Self-contained on purpose (the agent never imports the controller): this mirrors the
controller's definitions of the CA fingerprint and the token format.

The agent never loads the cryptography package (about 10 MB that a long-running agent
would keep): making a key and a CSR, and checking a certificate, run in a short-lived
child process, agent/keytool.py. The CA fingerprint needs only the standard library.

Files in the state directory (0700), each 0600: agent.key, agent.crt, ca.crt and
agent.validity (the certificate's validity period, and a digest of the three others that
says which files it describes and that they were checked). They are replaced together by
the shared private-file writer (bulkhead.privatefile), key first. Renaming the key is the
commit point, so after a crash ``load_credentials`` either discards the pending files (the
key was not renamed) or finishes the renames (it was): the agent never pairs a new key
with an old certificate. A missing or stale
agent.validity (state directories written before it existed, or files changed by hand)
is recomputed by the key tool, which checks the files again, and written anew.
"""

from __future__ import annotations

import hashlib
import json
import logging
import ssl
import subprocess
import sys
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, NamedTuple

from bulkhead.privatefile import (
    PrivateFile,
    recover_private_group,
    write_private_file,
    write_private_group,
)
from bulkhead.v1 import contract
from bulkhead.v1.contract import EnrollmentToken

log = logging.getLogger(__name__)

KEY_FILE = "agent.key"
CERT_FILE = "agent.crt"
CA_FILE = "ca.crt"
VALIDITY_FILE = "agent.validity"
_PEM_FILES = (KEY_FILE, CERT_FILE, CA_FILE)
_FILES = (*_PEM_FILES, VALIDITY_FILE)  # the key first: its rename commits a save
RENEW_AFTER_FRACTION = 2 / 3
# The key tool's command line; -P keeps the working directory off its sys.path.
KEYTOOL = (sys.executable, "-P", "-m", "agent.keytool")
# It starts an interpreter and imports cryptography: well under a second on an idle host.
KEYTOOL_TIMEOUT_S = 30.0


class IdentityError(Exception):
    """The agent's credentials or enrollment token are unusable; the message names which."""


class KeytoolError(IdentityError):
    """The key tool did not do its work (did not start, crashed, timed out, answered
    nonsense), so nothing is known about the input; the message says what happened."""


@dataclass(frozen=True)
class Validity:
    """When a certificate starts and stops being valid (timezone-aware, UTC)."""

    not_before: datetime
    not_after: datetime

    def to_json(self) -> dict[str, str]:
        return {"not_before": self.not_before.isoformat(), "not_after": self.not_after.isoformat()}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Validity:
        """ValueError, KeyError or TypeError if DATA is not what to_json makes."""
        start, end = (datetime.fromisoformat(data[k]) for k in ("not_before", "not_after"))
        if start.tzinfo is None or end.tzinfo is None:
            raise ValueError("validity without a timezone")
        return cls(start, end)


class Names(NamedTuple):
    """What error messages call the key, the certificate and the CA certificate."""

    key: str = "the key"
    cert: str = "the certificate"
    ca: str = "the CA certificate"


GENERIC_NAMES = Names()


@dataclass(frozen=True)
class AgentCredentials:
    """PEM key, certificate and CA certificate, as handed to grpc.ssl_channel_credentials,
    and the certificate's validity (read from it when the three were checked)."""

    key_pem: bytes
    cert_pem: bytes
    ca_pem: bytes
    validity: Validity

    @property
    def not_before(self) -> datetime:
        return self.validity.not_before

    @property
    def not_after(self) -> datetime:
        return self.validity.not_after

    def needs_renewal(self, now: datetime) -> bool:
        """True once 2/3 of the certificate's lifetime has passed (NOW must be timezone-aware)."""
        start, end = self.not_before, self.not_after
        return now >= start + (end - start) * RENEW_AFTER_FRACTION


class Unreachable(IdentityError):
    """The key tool could not reach the server whose certificate it was to read."""


def presented_certificate(host: str, port: int, timeout: float) -> bytes:
    """The PEM certificate the TLS server at HOST:PORT presents, unverified, read by the
    key tool; Unreachable if it cannot be reached now."""
    request: dict[str, object] = {"op": "presented", "host": host, "port": port}
    request["timeout"] = timeout
    answer = _keytool(request, f"read the certificate presented at {host}:{port}")
    if "unreachable" in answer:
        raise Unreachable(answer["unreachable"])
    try:
        return answer["cert_pem"].encode()
    except KeyError:
        raise KeytoolError("the key tool answered without a certificate") from None


def new_key_and_csr(agent_id: str) -> tuple[bytes, bytes]:
    """A new private key and a CSR for AGENT_ID signed by it (PEM), made by the key tool."""
    answer = _keytool({"op": "csr", "agent_id": agent_id}, f"make a key for {agent_id!r}")
    try:
        return answer["key_pem"].encode(), answer["csr_pem"].encode()
    except KeyError:
        raise KeytoolError("the key tool answered without a key or CSR") from None


def check_certificate(
    cert_pem: bytes, ca_pem: bytes, *, key_pem: bytes | None = None, names: Names = GENERIC_NAMES
) -> Validity:
    """The certificate's validity, once the key tool found that it parses, that the CA
    signed it and (if KEY_PEM is given) that it certifies that key; else IdentityError
    naming the part at fault (as NAMES call them)."""
    request: dict[str, object] = {
        "op": "check",
        "cert_pem": cert_pem.decode(errors="replace"),
        "ca_pem": ca_pem.decode(errors="replace"),
        "names": names._asdict(),
    }
    if key_pem is not None:
        request["key_pem"] = key_pem.decode(errors="replace")
    answer = _keytool(request, f"check {names.cert}")
    try:
        return Validity.from_json(answer)
    except (KeyError, ValueError):
        raise KeytoolError(f"the key tool answered no validity for {names.cert}") from None


def checked_credentials(
    key_pem: bytes, cert_pem: bytes, ca_pem: bytes, names: Names = GENERIC_NAMES
) -> AgentCredentials:
    """Credentials from the three PEMs, once the key tool checked that they belong together."""
    validity = check_certificate(cert_pem, ca_pem, key_pem=key_pem, names=names)
    return AgentCredentials(key_pem, cert_pem, ca_pem, validity)


def ca_fingerprint(ca_pem: bytes) -> str:
    """Lowercase hex sha256 of the CA certificate's DER, as pinned by enrollment tokens."""
    try:
        der = ssl.PEM_cert_to_DER_cert(ca_pem.decode("ascii").strip())
    except ValueError:  # also the UnicodeDecodeError and binascii.Error of bad input
        raise IdentityError("CA certificate is not a PEM X.509 certificate") from None
    return hashlib.sha256(der).hexdigest()


def parse_token(text: str) -> EnrollmentToken:
    """Split and check a token (format in bulkhead.v1.contract); IdentityError if malformed."""
    try:
        return contract.parse_token(text)
    except contract.TokenFormatError as exc:
        raise IdentityError(str(exc)) from exc


def save_credentials(directory: Path, creds: AgentCredentials) -> None:
    """Write agent.key, agent.crt, ca.crt and agent.validity (0600) so that they change
    together. CREDS must have been checked (checked_credentials): loading trusts them."""
    pems = (creds.key_pem, creds.cert_pem, creds.ca_pem)
    contents = (*pems, _validity_record(creds.validity, pems))
    write_private_group(
        directory, [PrivateFile(*pair) for pair in zip(_FILES, contents, strict=True)]
    )


def load_credentials(directory: Path) -> AgentCredentials | None:
    """The saved credentials, None if there are none; IdentityError naming the bad file.
    Runs the key tool only when agent.validity does not describe the files (see above)."""
    if not directory.is_dir():
        return None
    try:
        recover_private_group(directory, _FILES)
    except OSError as exc:  # UnsafeLocation included: its text names the path and why
        raise IdentityError(f"cannot finish the interrupted save of credentials: {exc}") from exc
    paths = [directory / name for name in _PEM_FILES]
    present = [path for path in paths if path.exists()]
    if not present:
        return None
    if len(present) != len(paths):
        missing = ", ".join(path.name for path in paths if path not in present)
        raise IdentityError(
            f"{missing} missing in {directory}: the agent's credentials are incomplete; "
            "remove the rest and enroll again with a new token"
        )
    key_data, cert_data, ca_data = pems = (_read(paths[0]), _read(paths[1]), _read(paths[2]))
    validity = _recorded_validity(directory / VALIDITY_FILE, pems)
    if validity is None:
        names = Names(*(str(path) for path in paths))
        validity = check_certificate(cert_data, ca_data, key_pem=key_data, names=names)
        _store_validity(directory, validity, pems)
    return AgentCredentials(key_data, cert_data, ca_data, validity)


def _digest(pems: tuple[bytes, ...]) -> str:
    # Hash of hashes: no two different triples of files give the same input.
    return hashlib.sha256(b"".join(hashlib.sha256(pem).digest() for pem in pems)).hexdigest()


def _validity_record(validity: Validity, pems: tuple[bytes, ...]) -> bytes:
    return json.dumps({**validity.to_json(), "sha256": _digest(pems)}).encode()


def _recorded_validity(path: Path, pems: tuple[bytes, ...]) -> Validity | None:
    """What PATH says, if it describes exactly these files; else None."""
    try:
        record = json.loads(path.read_bytes())
        if record["sha256"] != _digest(pems):
            return None
        return Validity.from_json(record)
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _store_validity(directory: Path, validity: Validity, pems: tuple[bytes, ...]) -> None:
    """Write agent.validity alone (as a save would); the agent only loses time if it cannot."""
    path = directory / VALIDITY_FILE
    try:
        write_private_file(path, _validity_record(validity, pems))
    except OSError as exc:
        log.warning("cannot write %s (%s); the next start checks the credentials again",
                    path, exc.strerror)  # fmt: skip


def _keytool(request: dict[str, object], what: str) -> dict[str, str]:
    """The key tool's answer to REQUEST; IdentityError saying what failed (WHAT it was to do)."""
    try:
        done = subprocess.run(
            KEYTOOL,
            input=json.dumps(request).encode(),
            capture_output=True,
            timeout=KEYTOOL_TIMEOUT_S,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise KeytoolError(
            f"cannot {what}: the key tool gave no answer within {KEYTOOL_TIMEOUT_S:g} s"
        ) from None
    except OSError as exc:
        raise KeytoolError(f"cannot {what}: cannot start the key tool: {exc}") from None
    if done.returncode != 0:
        status = (
            f"killed by signal {-done.returncode}"
            if done.returncode < 0
            else f"exit status {done.returncode}"
        )
        # The last line of a traceback names the problem; the key tool prints no key there.
        last = (done.stderr.decode(errors="replace").strip().splitlines() or ["no message"])[-1]
        raise KeytoolError(f"cannot {what}: the key tool failed ({status}): {last[:300]}")
    try:
        answer = json.loads(done.stdout)
    except ValueError:
        answer = None
    if not isinstance(answer, dict) or not all(isinstance(v, str) for v in answer.values()):
        raise KeytoolError(f"cannot {what}: the key tool gave an unreadable answer")
    if "error" in answer:
        raise IdentityError(answer["error"])
    return answer


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise IdentityError(f"cannot read {path}: {exc.strerror}") from None
