"""bulkhead-sim: the on-disk credential cache and the enrollment token pool."""

from __future__ import annotations

import stat
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from controller.pki import CertificateAuthority, cert_pem
from controller.sim.credentials import AgentCredentials, CredentialCache
from controller.sim.enroll import TokenPool, new_key_and_csr
from controller.sim.errors import SimError


def _issue(ca: CertificateAuthority, agent_id: str) -> AgentCredentials:
    key_pem, csr_pem = new_key_and_csr(agent_id)
    certificate = ca.issue_agent(csr_pem, agent_id, timedelta(hours=1))
    return AgentCredentials(key_pem, cert_pem(certificate))


@pytest.fixture
def ca(tmp_path: Path) -> CertificateAuthority:
    return CertificateAuthority.load_or_create(tmp_path / "pki")


def test_saved_credentials_are_loaded_again(tmp_path: Path, ca: CertificateAuthority) -> None:
    cache = CredentialCache(tmp_path / "agents")
    cache.save_ca(ca.certificate_pem)
    saved = _issue(ca, "sim-000000")
    cache.save("sim-000000", saved)
    usable, problems = cache.load(["sim-000000", "sim-000001"])
    assert usable == {"sim-000000": saved}
    assert problems == {}  # sim-000001 has nothing cached: it still needs enrolling


def test_keys_are_private(tmp_path: Path, ca: CertificateAuthority) -> None:
    cache = CredentialCache(tmp_path / "agents")
    cache.save_ca(ca.certificate_pem)
    cache.save("sim-000000", _issue(ca, "sim-000000"))
    key = tmp_path / "agents" / "agents" / "sim-000000.key"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600


def test_nothing_is_cached_without_a_ca(tmp_path: Path) -> None:
    assert CredentialCache(tmp_path / "none").load(["sim-000000"]) == ({}, {})


def test_expired_certificates_are_reported(tmp_path: Path, ca: CertificateAuthority) -> None:
    cache = CredentialCache(tmp_path / "agents")
    cache.save_ca(ca.certificate_pem)
    cache.save("sim-000000", _issue(ca, "sim-000000"))
    later = datetime.now(UTC) + timedelta(days=2)
    usable, problems = cache.load(["sim-000000"], now=later)
    assert usable == {}
    assert "expired" in problems["sim-000000"]


def test_a_key_of_another_agent_is_reported(tmp_path: Path, ca: CertificateAuthority) -> None:
    cache = CredentialCache(tmp_path / "agents")
    cache.save_ca(ca.certificate_pem)
    mine, other = _issue(ca, "sim-000000"), _issue(ca, "sim-000001")
    cache.save("sim-000000", AgentCredentials(other.key_pem, mine.cert_pem))
    _, problems = cache.load(["sim-000000"])
    assert problems == {"sim-000000": "the key does not belong to the certificate"}


def test_certificates_of_another_ca_are_reported(tmp_path: Path, ca: CertificateAuthority) -> None:
    other_ca = CertificateAuthority.load_or_create(tmp_path / "other-pki")
    cache = CredentialCache(tmp_path / "agents")
    cache.save_ca(ca.certificate_pem)
    cache.save("sim-000000", _issue(other_ca, "sim-000000"))
    _, problems = cache.load(["sim-000000"])
    assert "not issued by the cached CA" in problems["sim-000000"]


def test_the_token_pool_moves_on_once_per_refused_token() -> None:
    pool = TokenPool(["first", "second"])
    assert pool.current() == "first"
    pool.retire("first", "token abc: already used")
    pool.retire("first", "token abc: already used")  # a second enrollment saw it too
    assert pool.current() == "second"
    pool.retire("second", "token def: expired")
    with pytest.raises(SimError, match=r"refused or used up \(last: token def: expired\)"):
        pool.current()


def test_an_empty_token_pool_says_what_to_do() -> None:
    with pytest.raises(SimError, match="--operator-credentials"):
        TokenPool([]).current()
