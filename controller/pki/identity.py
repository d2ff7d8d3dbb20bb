"""Who a client certificate names: its one URI SAN, an agent or an operator.

Agents:    spiffe://bulkhead/agent/<agent_id>
Operators: spiffe://bulkhead/operator/<role>/<name>   (role: admin or viewer)
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from cryptography import x509

from bulkhead.v1.contract import AGENT_ID_RULE, is_valid_agent_id
from controller.pki.errors import PkiError

CONTROLLER_NAME = "bulkhead-controller"
AGENT_URI_PREFIX = "spiffe://bulkhead/agent/"
OPERATOR_URI_PREFIX = "spiffe://bulkhead/operator/"
OPERATOR_ROLES = ("admin", "viewer")
OPERATOR_NAME_RULE = (
    "1-63 lowercase letters, digits, '.', '_' or '-', starting with a letter or digit"
)
_OPERATOR_NAME = re.compile(r"[a-z0-9][a-z0-9._-]{0,62}")

IdentityKind = Literal["agent", "operator"]


@dataclass(frozen=True)
class Identity:
    """A checked identity: constructing one with a bad name or role raises PkiError."""

    kind: IdentityKind
    name: str
    role: str | None = None

    def __post_init__(self) -> None:
        if self.kind == "agent":
            check_agent_id(self.name)
            if self.role is not None:
                raise PkiError(f"agent identity {self.name!r} cannot have a role")
        elif self.kind == "operator":
            check_operator(self.name, self.role)
        else:
            raise PkiError(f"identity kind must be 'agent' or 'operator', not {self.kind!r}")

    @property
    def uri(self) -> str:
        if self.kind == "agent":
            return AGENT_URI_PREFIX + self.name
        return f"{OPERATOR_URI_PREFIX}{self.role}/{self.name}"


def check_agent_id(agent_id: str) -> None:
    if not is_valid_agent_id(agent_id):
        raise PkiError(f"agent id {agent_id!r} is invalid: must be {AGENT_ID_RULE}")


def check_operator(name: str, role: str | None) -> None:
    if _OPERATOR_NAME.fullmatch(name) is None:
        raise PkiError(f"operator name {name!r} is invalid: must be {OPERATOR_NAME_RULE}")
    if role not in OPERATOR_ROLES:
        raise PkiError(f"operator role {role!r} is invalid: must be one of {OPERATOR_ROLES}")


def identity_from_uri(uri: str) -> Identity:
    if uri.startswith(AGENT_URI_PREFIX):
        return Identity("agent", uri.removeprefix(AGENT_URI_PREFIX))
    if uri.startswith(OPERATOR_URI_PREFIX):
        role, sep, name = uri.removeprefix(OPERATOR_URI_PREFIX).partition("/")
        if not sep:
            raise PkiError(f"operator URI {uri!r} must be {OPERATOR_URI_PREFIX}<role>/<name>")
        return Identity("operator", name, role)
    raise PkiError(
        f"URI SAN {uri!r} is not a Bulkhead identity: "
        f"expected {AGENT_URI_PREFIX}... or {OPERATOR_URI_PREFIX}..."
    )


def identity_from_certificate(cert: x509.Certificate) -> Identity:
    """The identity in CERT's only URI SAN; PkiError unless there is exactly one, well formed."""
    try:
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        raise PkiError("certificate has no subjectAltName: expected one Bulkhead URI SAN") from None
    except ValueError as exc:
        raise PkiError(f"certificate extensions do not parse: {exc}") from None
    uris = sans.get_values_for_type(x509.UniformResourceIdentifier)
    if len(uris) != 1:
        raise PkiError(f"certificate has {len(uris)} URI SANs: expected exactly one")
    return identity_from_uri(uris[0])


def certificate_from_pem(pem: bytes) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(pem)
    except ValueError as exc:
        raise PkiError(f"not a PEM X.509 certificate: {exc}") from None


def identity_from_pem(pem: bytes) -> Identity:
    return identity_from_certificate(certificate_from_pem(pem))
