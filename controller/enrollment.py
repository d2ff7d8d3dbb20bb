"""Enrollment tokens, agent certificates and their revocation.

A token is shown once; the store keeps only the sha256 of its secret. Enrollment is one
transaction: the token use, the issued certificate's record, the agent's token labels and
the audit entry commit together or not at all.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from cryptography import x509

from bulkhead.v1.contract import AGENT_ID_RULE, is_valid_agent_id
from controller.address_claims import canonical_ranges, parse_ranges
from controller.errors import Conflict, InvalidArgument, NotFound, Unauthenticated
from controller.host_reports import DEFAULT_MAX_AGENT_LABELS, hostname_problem, label_problems
from controller.pki import AGENT_URI_PREFIX, CertificateAuthority, PkiError, cert_pem
from controller.pki.tokens import new_token, parse_token, secret_digest
from controller.store.sqlite_store import AgentRecord, SqliteStore, TokenRecord, now_ms

log = logging.getLogger(__name__)

DEFAULT_AGENT_CERT_TTL = timedelta(hours=24)
MAX_TOKEN_TTL_S = 30 * 24 * 3600
MAX_TOKEN_USES = 10_000
# A certificate is renewed only in the last third of its life, once per stream: the agent
# asks at two thirds (agent/identity.py), so a stolen key cannot mint certificates at
# will. Asking up to RENEWAL_EARLY_MAX_MS (at most a thirtieth of the life) before that
# point is tolerated: the agent's clock may run a little ahead of the controller's.
RENEW_FROM_FRACTION = 2 / 3
RENEWAL_EARLY_MAX_MS = 5 * 60 * 1000


def agent_identity(agent_id: str) -> str:
    return AGENT_URI_PREFIX + agent_id


@dataclass(frozen=True, slots=True)
class Presented:
    """What a stream keeps of the certificate it was opened with: enough to check it again
    when the agent renews, in a few bytes (the parsed certificate is about 4 KB a stream)."""

    serial: str  # hex, as the store keeps it
    not_after_ms: int
    not_before_ms: int

    @classmethod
    def of(cls, certificate: x509.Certificate) -> Presented:
        return cls(
            format(certificate.serial_number, "x"),
            int(certificate.not_valid_after_utc.timestamp() * 1000),
            int(certificate.not_valid_before_utc.timestamp() * 1000),
        )

    def renewal_opens_ms(self) -> int:
        """When a renewal of this certificate is accepted from (clock skew tolerated)."""
        life = self.not_after_ms - self.not_before_ms
        early = min(RENEWAL_EARLY_MAX_MS, life // 30)
        return self.not_before_ms + int(life * RENEW_FROM_FRACTION) - early


# Renewals of one certificate, across streams. More than one, so that an agent whose answer
# was lost (a stream broken after issuing) can ask again; bounded, so that reconnecting with
# an old certificate does not mint one certificate per stream.
MAX_RENEWALS_PER_CERTIFICATE = 3


class RenewalRefused(Conflict):
    """A renewal asked for before the last third of the certificate's life, or a second
    one on one stream. The stream stays up: a legitimate agent does neither (see
    AgentServicer), so there is nothing to resync."""


class Enrollment:
    def __init__(
        self,
        store: SqliteStore,
        ca: CertificateAuthority,
        *,
        agent_cert_ttl: timedelta = DEFAULT_AGENT_CERT_TTL,
        max_labels: int = DEFAULT_MAX_AGENT_LABELS,
    ) -> None:
        self._store = store
        self._ca = ca
        self._agent_cert_ttl = agent_cert_ttl
        self._max_labels = max_labels  # a token gives no more labels than an agent may have

    @property
    def ca_pem(self) -> bytes:
        return self._ca.certificate_pem

    # -- tokens -------------------------------------------------------------------------

    def create_token(
        self,
        labels: Mapping[str, str],
        ttl_seconds: int,
        uses: int,
        *,
        actor: str,
        addresses: Sequence[str] = (),
    ) -> tuple[str, TokenRecord]:
        """A token whose agents get LABELS and may hold addresses only inside ADDRESSES
        (CIDRs; none: any workload address)."""
        problems = []
        if not 0 < ttl_seconds <= MAX_TOKEN_TTL_S:
            problems.append(f"ttl: {ttl_seconds} s must be above 0 and at most 30 days")
        if not 0 < uses <= MAX_TOKEN_USES:
            problems.append(f"uses: {uses} must be between 1 and {MAX_TOKEN_USES}")
        problems += label_problems(labels, "labels", self._max_labels)
        ranges, range_problems = parse_ranges(addresses, "addresses")
        problems += range_problems
        if problems:
            raise InvalidArgument(problems)
        text, token_id, digest = new_token(self._ca.fingerprint)
        created = now_ms()
        record = TokenRecord(
            token_id=token_id,
            secret_sha256=digest,
            labels=dict(labels),
            uses=uses,
            used=0,
            expires_ms=created + ttl_seconds * 1000,
            revoked=False,
            created_by=actor,
            created_ms=created,
            addresses=canonical_ranges(ranges),
        )
        with self._store.transaction():
            self._store.put_token(record)
            self._store.add_audit(
                actor, "token.created", f"token/{token_id}",
                {"labels": dict(labels), "uses": uses, "ttl_seconds": ttl_seconds,
                 "addresses": record.addresses},
            )  # fmt: skip
        return text, record

    def tokens(self) -> list[TokenRecord]:
        return self._store.list_tokens()

    def revoke_token(self, token_id: str, *, actor: str) -> None:
        token = self._store.get_token(token_id)
        if token is None:
            raise NotFound(f"token '{token_id}' does not exist")
        token.revoked = True
        with self._store.transaction():
            self._store.put_token(token)
            self._store.add_audit(actor, "token.revoked", f"token/{token_id}", {})

    # -- certificates --------------------------------------------------------------------

    def enroll(
        self, token_text: str, agent_id: str, csr_pem: bytes, hostname: str
    ) -> tuple[bytes, dict[str, str]]:
        """Check the token, issue the agent's certificate; returns it and the token's labels."""
        if not is_valid_agent_id(agent_id):
            raise InvalidArgument([f"agent_id: {agent_id[:80]!r} must be {AGENT_ID_RULE}"])
        if problem := hostname_problem(hostname, "hostname"):
            raise InvalidArgument([problem])
        token = self._usable_token(token_text)
        identity = agent_identity(agent_id)
        # Expired is not enough: a host that was off for a day must not have its id (and
        # the operator's labels for it) taken over by whoever holds any token.
        if self._store.has_certificates(identity) and not self._store.agent_revoked(identity):
            raise Conflict(
                f"agent id '{agent_id}' is already enrolled; revoke it first "
                f"(bulkhead agent revoke {agent_id}) to enroll it again"
            )
        certificate = self._issue(csr_pem, agent_id)
        token.used += 1
        with self._store.transaction():
            self._store.put_token(token)
            self._record(certificate, identity)
            agent = self._store.get_agent(agent_id) or AgentRecord(
                agent_id=agent_id, hostname=hostname, first_seen_ms=now_ms()
            )
            # Token labels are the operator's word: they win over what the host reports.
            # A re-enrolled id starts from its new token, not from the old holder's labels.
            agent.label_overrides = dict(token.labels)
            agent.allowed_ranges = list(token.addresses)
            self._store.put_agent(agent)
            self._store.add_audit(
                f"agent:{agent_id}", "agent.enrolled", f"agent/{agent_id}",
                {"token": token.token_id, "labels": token.labels, "hostname": hostname,
                 "allowed_ranges": token.addresses,
                 "serial": format(certificate.serial_number, "x")},
            )  # fmt: skip
        log.info("agent %s enrolled with token %s", agent_id, token.token_id)
        return cert_pem(certificate), dict(token.labels)

    def renew(
        self, agent_id: str, csr_pem: bytes, presented: Presented, *, renewed_on_stream: bool
    ) -> tuple[bytes, Presented]:
        """A fresh certificate (PEM, and what a stream opened with it would keep) for an
        agent whose stream was opened with PRESENTED, provided that one is still on record,
        unrevoked and unexpired (a long-lived stream must not outlive its certificate by
        renewing, nor a revocation that raced the request), is in the last third of its
        life, and no certificate was issued on this stream yet (RENEWED_ON_STREAM); else
        RenewalRefused."""
        if not self.is_trusted(presented, agent_identity(agent_id)):
            raise Unauthenticated(f"agent '{agent_id}': certificate revoked; not renewed")
        now = now_ms()
        if presented.not_after_ms <= now:
            raise Unauthenticated(f"agent '{agent_id}': certificate expired; enroll again")
        if renewed_on_stream:
            raise RenewalRefused(
                f"agent '{agent_id}': a certificate was issued on this stream already; one "
                "renewal per stream (the new one is used from the next connection)"
            )
        newer = [
            serial
            for serial, not_after in self._store.live_certificates(agent_identity(agent_id), now)
            if not_after > presented.not_after_ms
        ]
        if len(newer) >= MAX_RENEWALS_PER_CERTIFICATE:
            raise RenewalRefused(
                f"agent '{agent_id}': this certificate was renewed {len(newer)} times already; "
                "connect with the newest one"
            )
        opens = presented.renewal_opens_ms()
        if now < opens:
            life = presented.not_after_ms - presented.not_before_ms
            gone = (now - presented.not_before_ms) / life if life > 0 else 1.0
            raise RenewalRefused(
                f"agent '{agent_id}': renewal asked with {gone:.0%} of the certificate's life "
                f"gone; it is renewed in the last third, from {_utc_text(opens)}"
            )
        certificate = self._issue(csr_pem, agent_id)
        with self._store.transaction():
            self._record(certificate, agent_identity(agent_id))
        log.info("renewed the certificate of agent %s", agent_id)
        return cert_pem(certificate), Presented.of(certificate)

    def revoke_agent(self, agent_id: str, *, actor: str) -> int:
        identity = agent_identity(agent_id)
        if not self._store.has_certificates(identity):
            raise NotFound(f"agent '{agent_id}' has no certificates to revoke")
        with self._store.transaction():
            count = self._store.revoke_certificates(identity)
            self._store.add_audit(
                actor, "agent.revoked", f"agent/{agent_id}", {"certificates": count}
            )
        return count

    def is_trusted(self, presented: Presented, uri: str) -> bool:
        """Issued by this controller to URI (on record) and not revoked. The CA signature
        alone is not enough: with an operator-supplied CA, other certificates of that CA
        must not become Bulkhead identities, and a lost record must not revive anything."""
        return self._store.certificate_status(presented.serial) == (uri, False)

    def record_certificate(self, certificate: x509.Certificate, uri: str) -> None:
        """Put a certificate issued outside enrollment (an operator's) on record."""
        with self._store.transaction():
            self._record(certificate, uri)

    def revoked_agents(self) -> set[str]:
        """Every agent id whose certificates are all revoked, in one query."""
        return {
            identity.removeprefix(AGENT_URI_PREFIX)
            for identity in self._store.fully_revoked_identities(AGENT_URI_PREFIX)
        }

    def is_agent_revoked(self, agent_id: str) -> bool:
        return self._store.agent_revoked(agent_identity(agent_id))

    def certificate_expiry_ms(self, agent_id: str) -> int:
        live = self._store.live_certificates(agent_identity(agent_id), now_ms())
        return live[-1][1] if live else 0

    def certificate_expiries_ms(self) -> dict[str, int]:
        """certificate_expiry_ms of every agent with a live certificate, in one query."""
        latest = self._store.latest_live_certificates(AGENT_URI_PREFIX, now_ms())
        return {identity.removeprefix(AGENT_URI_PREFIX): ms for identity, ms in latest.items()}

    def _usable_token(self, token_text: str) -> TokenRecord:
        try:
            token_id, secret, fingerprint = parse_token(token_text)
        except PkiError as exc:
            raise Unauthenticated(f"token: {exc}") from exc
        token = self._store.get_token(token_id)
        if token is None or not hmac.compare_digest(token.secret_sha256, secret_digest(secret)):
            raise Unauthenticated("token: not issued by this controller")
        if fingerprint != self._ca.fingerprint:
            raise Unauthenticated("token: pins a different CA than this controller's")
        if token.revoked:
            raise Unauthenticated(f"token {token_id}: revoked")
        if token.expires_ms <= now_ms():
            raise Unauthenticated(f"token {token_id}: expired")
        if token.used >= token.uses:
            raise Unauthenticated(f"token {token_id}: already used")
        return token

    def _issue(self, csr_pem: bytes, agent_id: str) -> x509.Certificate:
        try:
            return self._ca.issue_agent(csr_pem, agent_id, self._agent_cert_ttl)
        except PkiError as exc:
            raise InvalidArgument([f"csr_pem: {exc}"]) from exc

    def _record(self, certificate: x509.Certificate, identity: str) -> None:
        not_after = int(certificate.not_valid_after_utc.timestamp() * 1000)
        self._store.put_certificate(format(certificate.serial_number, "x"), identity, not_after)


def _utc_text(unix_ms: int) -> str:
    return datetime.fromtimestamp(unix_ms / 1000, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
