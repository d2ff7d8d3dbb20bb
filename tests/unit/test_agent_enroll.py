"""Agent enrollment against a real in-process enrollment server over TLS."""

from __future__ import annotations

import asyncio
import stat
from datetime import timedelta
from pathlib import Path

import pytest

from agent.enroll import EnrollmentError, enroll
from agent.identity import load_credentials
from agent.keytool import generate_key, key_pem, make_csr
from agent.link import ControllerLink
from bulkhead.v1 import agent_pb2
from controller.core import Controller
from controller.pki import CertificateAuthority, cert_pem
from controller.server.enrollment_throttle import EnrollmentThrottle
from tests.pki_support import with_enrollment_server


def test_enroll_stores_0600_credentials_and_returns_token_labels(tmp_path: Path) -> None:
    state = tmp_path / "agent"

    async def body(core: Controller, address: str) -> None:
        token, _ = core.enrollment.create_token({"app": "web"}, 600, 1, actor="operator:t")
        credentials, labels = await enroll(address, token, "web", "web", state)
        assert labels == {"app": "web"}
        assert load_credentials(state) == credentials
        for name in ("agent.key", "agent.crt", "ca.crt"):
            assert stat.S_IMODE((state / name).stat().st_mode) == 0o600
        assert stat.S_IMODE(state.stat().st_mode) == 0o700
        with pytest.raises(EnrollmentError, match="already used") as raised:
            await enroll(address, token, "web2", "web2", tmp_path / "agent2")
        assert not raised.value.retryable

    with_enrollment_server(tmp_path, body)


def test_token_is_not_sent_to_a_server_of_another_ca(tmp_path: Path) -> None:
    # The enrollment port presents a certificate from an impostor CA (a man in the middle):
    # the agent must stop before sending the token, so the token stays unused.
    async def body(core: Controller, address: str) -> None:
        token, _ = core.enrollment.create_token({}, 600, 1, actor="operator:t")
        with pytest.raises(EnrollmentError, match="not sending the token"):
            await enroll(address, token, "web", "web", tmp_path / "agent")
        stored = core.enrollment.tokens()[0]
        assert stored.used == 0
        assert load_credentials(tmp_path / "agent") is None

    with_enrollment_server(tmp_path, body, ca_dir="impostor-pki")


def test_unreachable_controller_is_retryable_and_bad_token_is_not(tmp_path: Path) -> None:
    async def body() -> None:
        with pytest.raises(EnrollmentError) as raised:
            await enroll("127.0.0.1:1", "0" * 12 + "." + "a" * 43 + "." + "0" * 64, "w", "w",
                         tmp_path)  # fmt: skip
        assert raised.value.retryable
        with pytest.raises(EnrollmentError, match="token") as bad:
            await enroll("127.0.0.1:1", "not-a-token", "w", "w", tmp_path)
        assert not bad.value.retryable

    asyncio.run(body())


def test_a_throttled_enrollment_is_retried_later(tmp_path: Path) -> None:
    # Another host behind the same address failed too often: this one is not at fault,
    # so the agent keeps trying with its backoff instead of giving up.
    async def body(core: Controller, address: str) -> None:
        token, _ = core.enrollment.create_token({}, 600, 1, actor="operator:t")
        token_id, secret, fingerprint = token.split(".")
        guess = ".".join((token_id, "A" * len(secret), fingerprint))
        with pytest.raises(EnrollmentError, match="not issued by this controller") as wrong:
            await enroll(address, guess, "web", "web", tmp_path / "guess")
        assert not wrong.value.retryable
        with pytest.raises(EnrollmentError, match="too many failed attempts") as throttled:
            await enroll(address, token, "web", "web", tmp_path / "agent")
        assert throttled.value.retryable

    with_enrollment_server(tmp_path, body, throttle=EnrollmentThrottle(failures_per_minute=1))


def test_renewed_certificate_replaces_the_old_only_when_it_matches(tmp_path: Path) -> None:
    async def body(core: Controller, address: str) -> None:
        token, _ = core.enrollment.create_token({}, 600, 1, actor="operator:t")
        first, _ = await enroll(address, token, "web", "web", tmp_path / "s")
        link = ControllerLink(
            address, agent_id="web", state_dir=tmp_path / "s", enforcer=None,  # type: ignore[arg-type]
            make_hello=agent_pb2.Hello, discover=list, heartbeat_interval=5,
            address_poll_interval=2,
        )  # fmt: skip
        ca = CertificateAuthority.load_or_create(tmp_path / "pki")
        # Unasked-for certificate: ignored.
        stray = ca.issue_agent(make_csr(generate_key(), "web"), "web", timedelta(hours=1))
        await link._store_renewed(cert_pem(stray))
        assert load_credentials(tmp_path / "s") == first
        # Asked for, but for another key: refused.
        link._renewal_key = key_pem(generate_key())
        await link._store_renewed(cert_pem(stray))
        assert load_credentials(tmp_path / "s") == first
        # The real answer to our CSR: stored.
        key = generate_key()
        link._renewal_key = key_pem(key)
        issued = ca.issue_agent(make_csr(key, "web"), "web", timedelta(hours=1))
        await link._store_renewed(cert_pem(issued))
        renewed = load_credentials(tmp_path / "s")
        assert renewed is not None
        assert renewed.key_pem == key_pem(key)
        assert renewed.cert_pem == cert_pem(issued)

    with_enrollment_server(tmp_path, body)


def test_an_unexpected_error_answers_internal_and_counts_as_a_failure(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # A bug reached by a stranger's request: one clean INTERNAL and one logged traceback,
    # and, counted as a failed attempt, a stranger repeating it is throttled.
    async def body(core: Controller, address: str) -> None:
        def broken(*_: object) -> None:
            raise KeyError("a bug")

        monkeypatch.setattr(core.enrollment, "enroll", broken)
        token, _ = core.enrollment.create_token({}, 600, 2, actor="operator:t")
        with pytest.raises(EnrollmentError, match=r"internal error \(KeyError\)"):
            await enroll(address, token, "web", "web", tmp_path / "a")
        with pytest.raises(EnrollmentError, match="too many failed attempts"):
            await enroll(address, token, "web", "web", tmp_path / "b")

    with_enrollment_server(tmp_path, body, throttle=EnrollmentThrottle(failures_per_minute=1))
    assert [r.levelname for r in caplog.records if r.exc_info] == ["ERROR"]
