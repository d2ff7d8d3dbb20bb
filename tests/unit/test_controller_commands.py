"""bulkhead-controller's local commands: admin-cert and revoke-operator."""

from __future__ import annotations

import stat
from pathlib import Path

from click.testing import CliRunner

from controller.pki import certificate_from_pem
from controller.server.main import main
from controller.store.sqlite_store import SqliteStore


def test_admin_cert_then_revoke_operator(tmp_path: Path) -> None:
    state, out = tmp_path / "state", tmp_path / "alice"
    issued = CliRunner().invoke(
        main, ["admin-cert", "--state-dir", str(state), "--name", "alice", "--role", "admin",
               "--out", str(out)],
    )  # fmt: skip
    assert issued.exit_code == 0, issued.output
    for name in ("operator.crt", "operator.key", "ca.crt"):
        assert stat.S_IMODE((out / name).stat().st_mode) == 0o600
    serial = format(certificate_from_pem((out / "operator.crt").read_bytes()).serial_number, "x")
    store = SqliteStore(state / "controller.db")
    assert store.certificate_status(serial) == ("spiffe://bulkhead/operator/admin/alice", False)
    revoked = CliRunner().invoke(
        main, ["revoke-operator", "--state-dir", str(state), "--name", "alice"]
    )
    assert revoked.exit_code == 0, revoked.output
    assert "revoked 1 certificate" in revoked.output
    assert store.certificate_status(serial) == ("spiffe://bulkhead/operator/admin/alice", True)
    again = CliRunner().invoke(
        main, ["revoke-operator", "--state-dir", str(state), "--name", "alice"]
    )
    assert again.exit_code == 1
    assert "no live certificates" in again.output
    actions = [e.action for e in store.list_audit()]
    assert actions == ["operator.certificate.issued", "operator.revoked", "operator.revoked"]
