"""Everything the agent does with the cryptography package, and enrollment's first look
at the controller's certificate, run in a short-lived child process so the long-running
agent never loads cryptography (about 10 MB of resident memory) nor touches OpenSSL.

    python -m agent.keytool < request.json > answer.json

One JSON request on stdin, one JSON answer on stdout: private keys travel through the
pipes only, never on the command line or in a log. The requests (agent/identity.py
sends them):

    {"op": "csr", "agent_id": ID}
        -> {"key_pem": PKCS8 PEM of a new P-256 key, "csr_pem": PEM CSR with CN=ID}
    {"op": "check", "cert_pem": PEM, "ca_pem": PEM, "key_pem": PEM (optional),
     "names": {"key": ..., "cert": ..., "ca": ...}}
        -> {"not_before": ISO 8601, "not_after": ISO 8601}
        The certificate parses, the CA signed it and, when a key is given, it certifies
        that key. NAMES are how error messages call each part (file names, for instance).

    {"op": "presented", "host": IP, "port": PORT, "timeout": SECONDS}
        -> {"cert_pem": PEM} the certificate the TLS server there presents, unverified
        (enrollment checks it against the token next), or {"unreachable": WHY}. Here
        rather than in the agent: a TLS connection of the agent's own left about 1 MB of
        OpenSSL's pages resident in it for good (grpc brings its own TLS).

A request that cannot be served answers {"error": MESSAGE} (exit status 0); anything else
(a crash, no answer) is the parent's to report. The module's functions also serve tests.
"""

from __future__ import annotations

import json
import sys
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from agent.identity import IdentityError, Names, Validity
from bulkhead.presented import presented_certificate_pem
from bulkhead.v1.contract import AGENT_ID_RULE, is_valid_agent_id


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


def check(cert_data: bytes, ca_data: bytes, key_data: bytes | None, names: Names) -> Validity:
    """The certificate's validity once it parses, the CA signed it (signature and issuer
    name) and it certifies the key (if given); IdentityError naming the part at fault."""
    key = _parse_key(key_data, names.key) if key_data is not None else None
    cert = _parse_cert(cert_data, names.cert)
    ca = _parse_cert(ca_data, names.ca)
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm):
        raise IdentityError(f"{names.cert} is not issued by the CA in {names.ca}") from None
    if key is not None and _spki(key.public_key()) != _spki(cert.public_key()):
        raise IdentityError(f"{names.key} does not match the certificate in {names.cert}")
    return Validity(cert.not_valid_before_utc, cert.not_valid_after_utc)


def serve(request: dict[str, Any]) -> dict[str, str]:
    """The answer to one request (module docstring)."""
    try:
        if request["op"] == "csr":
            key = generate_key()
            return {
                "key_pem": key_pem(key).decode(),
                "csr_pem": make_csr(key, request["agent_id"]).decode(),
            }
        if request["op"] == "check":
            key_text = request.get("key_pem")
            validity = check(
                request["cert_pem"].encode(),
                request["ca_pem"].encode(),
                key_text.encode() if key_text is not None else None,
                Names(**request["names"]),
            )
            return validity.to_json()
        if request["op"] == "presented":
            return presented_certificate(
                request["host"], int(request["port"]), float(request["timeout"])
            )
        return {"error": f"unknown key tool operation {request['op']!r}"}
    except IdentityError as exc:
        return {"error": str(exc)}
    except (KeyError, TypeError, AttributeError) as exc:
        return {"error": f"malformed key tool request ({type(exc).__name__}: {exc})"}


def presented_certificate(host: str, port: int, timeout: float) -> dict[str, str]:
    """The PEM certificate the TLS server at HOST:PORT presents, not verified (that is the
    next step of enrollment), as {"cert_pem": PEM}; {"unreachable": WHY} if there is none
    to be had there now."""
    try:
        pem = presented_certificate_pem(host, port, timeout)
    except OSError as exc:
        return {"unreachable": str(exc)}
    if pem is None:
        return {"error": f"{host}:{port} presented no certificate"}
    return {"cert_pem": pem}


def _parse_cert(data: bytes, what: str) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(data)
    except ValueError:
        raise IdentityError(f"{what} is not a PEM X.509 certificate") from None


def _parse_key(data: bytes, what: str) -> ec.EllipticCurvePrivateKey:
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise IdentityError(f"{what} is not an unencrypted PEM private key") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise IdentityError(f"{what} holds a {type(key).__name__}, expected an EC key")
    return key


def _spki(public_key: object) -> bytes:
    if not isinstance(public_key, ec.EllipticCurvePublicKey):
        return b""
    return public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def main() -> None:
    try:
        request = json.load(sys.stdin)
    except ValueError as exc:  # the message names a position, never the content
        answer = {"error": f"the key tool's request is not JSON ({exc})"}
    else:
        answer = (
            serve(request)
            if isinstance(request, dict)
            else {"error": "the key tool's request is not a JSON object"}
        )
    json.dump(answer, sys.stdout)


if __name__ == "__main__":
    main()
