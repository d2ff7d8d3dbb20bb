"""The symlink attack on `bulkhead-controller admin-cert --out DIR`, replayed (issue 17).

An unprivileged user (uid 65534) plants `operator.key.new`, the temporary name the old
writer used, as a link to a file of theirs in an --out directory that already exists;
then root runs admin-cert. The old writer followed the link: the operator's private key
landed in the attacker's file. Needs root, as the attack does (chown to the attacker).
"""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from controller.pki import certificate_from_pem
from controller.server.main import main

NOBODY = 65534
pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the attacker is another user")


def admin_cert(state: Path, name: str, out: Path) -> Result:
    return CliRunner().invoke(
        main, ["admin-cert", "--state-dir", str(state), "--name", name, "--role", "admin",
               "--out", str(out)],
    )  # fmt: skip


def stored(state: Path) -> list[str]:
    """Every row of the controller's database, as SQL (read only)."""
    with sqlite3.connect(f"file:{state / 'controller.db'}?mode=ro", uri=True) as db:
        return list(db.iterdump())


def entries(directory: Path) -> dict[str, tuple[int, int, bytes | str]]:
    """Each entry's owner, mode and content (a link's target)."""
    result: dict[str, tuple[int, int, bytes | str]] = {}
    for path in sorted(directory.iterdir()):
        status = path.lstat()
        content = os.readlink(path) if path.is_symlink() else path.read_bytes()
        result[path.name] = (status.st_uid, status.st_mode, content)
    return result


@pytest.fixture
def state(tmp_path: Path) -> Path:
    """A controller state dir that has issued one operator certificate already."""
    directory = tmp_path / "state"
    assert admin_cert(directory, "bob", tmp_path / "bob").exit_code == 0
    return directory


@pytest.fixture
def loot(tmp_path: Path) -> Path:
    """The attacker's own file, which a followed link would fill with the key."""
    path = tmp_path / "attacker" / "loot"
    path.parent.mkdir()
    path.write_bytes(b"bait\n")
    os.chown(path.parent, NOBODY, NOBODY)
    os.chown(path, NOBODY, NOBODY)
    return path


def plant(out: Path, loot: Path) -> None:
    """What the attacker does: a link of theirs at the old writer's temporary name."""
    link = out / "operator.key.new"
    link.symlink_to(loot)
    os.lchown(link, NOBODY, NOBODY)


@pytest.mark.parametrize(
    ("owner", "mode", "reason"),
    [
        (NOBODY, 0o755, f"owned by uid {NOBODY}"),  # the attacker's own directory
        (0, 0o1777, "writable by its group and others"),  # a sticky /tmp-like directory
        (0, 0o775, "writable by its group"),
    ],
)
def test_admin_cert_refuses_an_out_directory_the_attacker_can_write(  # noqa: PLR0917
    tmp_path: Path, state: Path, loot: Path, owner: int, mode: int, reason: str
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    out.chmod(mode)
    os.chown(out, owner, owner)
    plant(out, loot)
    before_store, before_out = stored(state), entries(out)

    result = admin_cert(state, "alice", out)

    assert result.exit_code == 1
    assert f"error: refusing to write {out}: its directory {out}" in result.output
    assert reason in result.output
    assert loot.read_bytes() == b"bait\n"
    assert entries(out) == before_out
    assert stored(state) == before_store  # no certificate issued, nothing audited


def test_admin_cert_in_a_private_directory_never_follows_a_planted_link(
    tmp_path: Path, state: Path, loot: Path
) -> None:
    # The link was planted while the directory was open, and it was closed afterwards.
    out = tmp_path / "out"
    out.mkdir(mode=0o700)
    plant(out, loot)

    result = admin_cert(state, "alice", out)

    assert result.exit_code == 0, result.output
    assert loot.read_bytes() == b"bait\n"
    assert os.readlink(out / "operator.key.new") == str(loot)
    key = out / "operator.key"
    assert not key.is_symlink()
    assert key.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    assert (key.stat().st_uid, key.stat().st_mode & 0o777) == (0, 0o600)
    cert = certificate_from_pem((out / "operator.crt").read_bytes())
    assert "alice" in cert.subject.rfc4514_string()


def test_admin_cert_refuses_a_key_path_that_is_a_link(
    tmp_path: Path, state: Path, loot: Path
) -> None:
    out = tmp_path / "out"
    out.mkdir(mode=0o700)
    (out / "operator.key").symlink_to(loot)
    before_store, before_out = stored(state), entries(out)

    result = admin_cert(state, "alice", out)

    assert result.exit_code == 1
    assert f"error: refusing to write {out}/operator.key: it is a symbolic link" in result.output
    assert loot.read_bytes() == b"bait\n"
    assert entries(out) == before_out
    assert stored(state) == before_store
