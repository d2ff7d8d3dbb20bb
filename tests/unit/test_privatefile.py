"""The shared private-file writer: modes, refused directories and links, and what a failed
or interrupted write leaves (the old files). Ownership cases need root (chown)."""

from __future__ import annotations

import os
import re
import secrets
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from bulkhead.privatefile import (
    PrivateFile,
    UnsafeLocation,
    check_private_dir,
    pending_name,
    recover_private_group,
    write_private_file,
    write_private_group,
)
from tests.pki_support import CRASHED_WRITE

NOBODY = 65534  # the unprivileged user that plays the attacker
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="chown to another user needs root")
REPO = Path(__file__).resolve().parents[2]

# A child that writes under a 1 KiB file size limit, so the kernel fails the write (EFBIG)
# halfway, as a full disk would. argv: directory, then name=size pairs (one name: a single
# file; more: a group).
LIMITED_WRITE = """
import resource, signal, sys
from pathlib import Path
from bulkhead.privatefile import PrivateFile, write_private_file, write_private_group
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (1024, 1024))
directory, *pairs = sys.argv[1:]
files = [PrivateFile(name, b"n" * int(size)) for name, size in (p.split("=") for p in pairs)]
try:
    if len(files) == 1:
        write_private_file(Path(directory) / files[0].name, files[0].data)
    else:
        write_private_group(Path(directory), files)
except OSError as exc:
    print(exc.strerror)
    sys.exit(3)
"""


def mode_of(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


def snapshot(directory: Path) -> dict[str, tuple[int, bytes | str]]:
    """Each entry's mode and content (a link's target), to compare before and after."""
    return {
        path.name: (
            path.lstat().st_mode,
            os.readlink(path) if path.is_symlink() else path.read_bytes(),
        )
        for path in sorted(directory.iterdir())
    }


def limited_write(directory: Path, *pairs: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", LIMITED_WRITE, str(directory), *pairs],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


@pytest.fixture
def loot(tmp_path: Path) -> Path:
    """The attacker's file that a followed link would fill."""
    path = tmp_path / "attacker" / "loot"
    path.parent.mkdir()
    path.write_bytes(b"bait")
    return path


# --- writing ---------------------------------------------------------------------------------


def test_a_new_file_is_0600_in_a_new_0700_directory_whatever_the_umask(tmp_path: Path) -> None:
    target = tmp_path / "made" / "here" / "secret.key"
    old_umask = os.umask(0)
    try:
        write_private_file(target, b"key")
    finally:
        os.umask(old_umask)

    assert target.read_bytes() == b"key"
    assert mode_of(target) == 0o600
    assert mode_of(target.parent) == 0o700
    assert [p.name for p in target.parent.iterdir()] == ["secret.key"]


def test_an_old_file_is_replaced_with_the_mode_asked(tmp_path: Path) -> None:
    target = tmp_path / "ca.crt"
    target.write_bytes(b"old")
    target.chmod(0o666)

    write_private_file(target, b"new", mode=0o644)

    assert target.read_bytes() == b"new"
    assert mode_of(target) == 0o644


def test_a_cache_write_without_fsync_still_lands_whole(tmp_path: Path) -> None:
    write_private_file(tmp_path / "agent.key", b"k" * 100_000, durable=False)

    assert (tmp_path / "agent.key").read_bytes() == b"k" * 100_000
    assert [p.name for p in tmp_path.iterdir()] == ["agent.key"]


def test_temporary_names_are_unpredictable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[str] = []
    real_open = os.open

    def recording_open(
        path: str, flags: int, mode: int = 0o777, *, dir_fd: int | None = None
    ) -> int:
        seen.append(str(path))
        return real_open(path, flags, mode, dir_fd=dir_fd)

    monkeypatch.setattr(os, "open", recording_open)
    write_private_file(tmp_path / "operator.key", b"1")
    write_private_file(tmp_path / "operator.key", b"2")

    temporaries = [name for name in seen if name.startswith(".operator.key.")]
    assert len(temporaries) == 2
    assert temporaries[0] != temporaries[1]
    assert all(re.fullmatch(r"\.operator\.key\.[0-9a-f]{16}\.tmp", name) for name in temporaries)


# --- links -----------------------------------------------------------------------------------


def test_a_target_that_is_a_link_is_refused_and_its_target_unchanged(
    tmp_path: Path, loot: Path
) -> None:
    out = tmp_path / "out"
    out.mkdir(mode=0o700)
    (out / "operator.key").symlink_to(loot)

    with pytest.raises(UnsafeLocation, match=r"operator\.key: it is a symbolic link"):
        write_private_file(out / "operator.key", b"PRIVATE KEY")

    assert loot.read_bytes() == b"bait"
    assert (out / "operator.key").is_symlink()
    assert [p.name for p in out.iterdir()] == ["operator.key"]


def test_a_directory_that_is_a_link_is_neither_chmodded_nor_written_through(
    tmp_path: Path,
) -> None:
    # Someone swaps the directory about to be written for a link to another place (an
    # /etc of theirs): nothing may be changed or written there.
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir(mode=0o755)
    elsewhere.chmod(0o755)
    out = tmp_path / "out"
    out.symlink_to(elsewhere)

    with pytest.raises(UnsafeLocation, match=r"its directory .*out is a symbolic link"):
        write_private_file(out / "operator.key", b"PRIVATE KEY")

    assert stat.S_IMODE(elsewhere.stat().st_mode) == 0o755
    assert list(elsewhere.iterdir()) == []


def test_a_link_planted_at_the_old_temporary_name_is_never_followed(
    tmp_path: Path, loot: Path
) -> None:
    out = tmp_path / "out"
    out.mkdir(mode=0o700)
    (out / "operator.key.new").symlink_to(loot)  # the name the old writer used

    write_private_file(out / "operator.key", b"PRIVATE KEY")

    assert loot.read_bytes() == b"bait"
    assert (out / "operator.key").read_bytes() == b"PRIVATE KEY"
    assert not (out / "operator.key").is_symlink()
    assert os.readlink(out / "operator.key.new") == str(loot)


def test_a_link_planted_at_a_guessed_temporary_name_is_not_followed(
    tmp_path: Path, loot: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Suppose the attacker guessed the random part: O_EXCL | O_NOFOLLOW still refuse the link.
    monkeypatch.setattr(secrets, "token_hex", lambda _: CRASHED_WRITE)
    out = tmp_path / "out"
    out.mkdir(mode=0o700)
    (out / "operator.key").write_bytes(b"old key")
    (out / f".operator.key.{CRASHED_WRITE}.tmp").symlink_to(loot)
    before = snapshot(out)

    with pytest.raises(FileExistsError):
        write_private_file(out / "operator.key", b"PRIVATE KEY")

    assert loot.read_bytes() == b"bait"
    assert snapshot(out) == before


def test_a_group_member_that_is_a_link_is_refused_before_anything_is_written(
    tmp_path: Path, loot: Path
) -> None:
    out = tmp_path / "out"
    out.mkdir(mode=0o700)
    (out / "operator.crt").write_bytes(b"old crt")
    (out / "operator.key").symlink_to(loot)
    before = snapshot(out)

    with pytest.raises(UnsafeLocation, match="symbolic link"):
        write_private_group(
            out, [PrivateFile("operator.crt", b"crt"), PrivateFile("operator.key", b"key")]
        )

    assert snapshot(out) == before
    assert loot.read_bytes() == b"bait"


# --- directories -----------------------------------------------------------------------------


@needs_root
def test_a_directory_another_user_owns_is_refused(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir(mode=0o755)
    os.chown(out, NOBODY, NOBODY)

    with pytest.raises(UnsafeLocation) as refused:
        write_private_file(out / "operator.key", b"PRIVATE KEY")

    assert str(refused.value).startswith(f"refusing to write {out}/operator.key: ")
    assert f"owned by uid {NOBODY}" in str(refused.value)
    assert list(out.iterdir()) == []


@pytest.mark.parametrize(
    ("mode", "who"),
    [(0o770, "writable by its group,"), (0o757, "group and others"), (0o1777, "group and others")],
)
def test_a_directory_others_can_write_is_refused(tmp_path: Path, mode: int, who: str) -> None:
    out = tmp_path / "shared"
    out.mkdir()
    out.chmod(mode)  # 1777: sticky, like /tmp

    with pytest.raises(UnsafeLocation, match=who):
        write_private_file(out / "state.json", b"{}")

    assert list(out.iterdir()) == []
    with pytest.raises(UnsafeLocation, match=f"mode {mode:04o}"):
        check_private_dir(out)


def test_a_directory_of_this_user_or_root_is_accepted_whatever_its_other_bits(
    tmp_path: Path,
) -> None:
    out = tmp_path / "etc"
    out.mkdir()
    out.chmod(0o755)  # like /etc/bulkhead: readable by all, writable by its owner only

    write_private_file(out / "agent.yaml", b"controller: x\n")
    check_private_dir(out, ["agent.yaml"])
    check_private_dir(tmp_path / "missing")  # created 0700 by the writer when needed

    assert mode_of(out) == 0o755


def test_check_private_dir_refuses_a_linked_name(tmp_path: Path, loot: Path) -> None:
    (tmp_path / "ca.crt").symlink_to(loot)

    with pytest.raises(UnsafeLocation, match=r"ca\.crt: it is a symbolic link"):
        check_private_dir(tmp_path, ["operator.crt", "ca.crt"])


# --- failures and crashes --------------------------------------------------------------------


def test_a_write_the_kernel_fails_leaves_the_old_file(tmp_path: Path) -> None:
    (tmp_path / "snapshot.json").write_bytes(b"old")
    before = snapshot(tmp_path)

    done = limited_write(tmp_path, "snapshot.json=4096")

    assert done.returncode == 3, done.stderr
    assert "too large" in done.stdout
    assert snapshot(tmp_path) == before  # no temporary file left either


def test_a_group_whose_last_file_fails_leaves_the_whole_old_group(tmp_path: Path) -> None:
    write_private_group(tmp_path, [PrivateFile("a.key", b"old key"), PrivateFile("a.crt", b"c")])
    before = snapshot(tmp_path)

    done = limited_write(tmp_path, "a.key=10", "a.crt=4096")

    assert done.returncode == 3, done.stderr
    assert snapshot(tmp_path) == before


def test_a_group_interrupted_before_its_commit_keeps_the_old_files(tmp_path: Path) -> None:
    write_private_group(tmp_path, [PrivateFile("a.key", b"old key"), PrivateFile("a.crt", b"old")])
    before = snapshot(tmp_path)
    for name in ("a.key", "a.crt"):
        (tmp_path / pending_name(name, CRASHED_WRITE)).write_bytes(b"half")

    recover_private_group(tmp_path, ["a.key", "a.crt"])

    assert snapshot(tmp_path) == before


def test_a_group_interrupted_after_its_commit_is_finished(tmp_path: Path) -> None:
    write_private_group(tmp_path, [PrivateFile("a.key", b"old key"), PrivateFile("a.crt", b"old")])
    (tmp_path / "a.key").write_bytes(b"new key")  # renamed: the commit point
    (tmp_path / pending_name("a.crt", CRASHED_WRITE)).write_bytes(b"new")

    recover_private_group(tmp_path, ["a.key", "a.crt"])

    assert (tmp_path / "a.crt").read_bytes() == b"new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.crt", "a.key"]


def test_the_next_group_write_finishes_an_interrupted_one_first(tmp_path: Path) -> None:
    # Else the old pending certificate could later be renamed over the new one.
    (tmp_path / "a.key").write_bytes(b"new key")
    (tmp_path / pending_name("a.crt", CRASHED_WRITE)).write_bytes(b"new")

    write_private_group(tmp_path, [PrivateFile("a.key", b"k3"), PrivateFile("a.crt", b"c3")])
    recover_private_group(tmp_path, ["a.key", "a.crt"])

    assert snapshot(tmp_path) == {
        "a.crt": (stat.S_IFREG | 0o600, b"c3"),
        "a.key": (stat.S_IFREG | 0o600, b"k3"),
    }


@needs_root
def test_recovery_in_a_directory_another_user_owns_is_refused(tmp_path: Path) -> None:
    (tmp_path / pending_name("a.crt", CRASHED_WRITE)).write_bytes(b"planted")
    os.chown(tmp_path, NOBODY, NOBODY)
    before = snapshot(tmp_path)

    with pytest.raises(UnsafeLocation, match=f"owned by uid {NOBODY}"):
        recover_private_group(tmp_path, ["a.key", "a.crt"])

    assert snapshot(tmp_path) == before


def test_bad_names_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not a file name"):
        write_private_group(tmp_path, [PrivateFile("../x", b"")])
    with pytest.raises(ValueError, match="distinct"):
        write_private_group(tmp_path, [PrivateFile("x", b""), PrivateFile("x", b"")])


# --- one writer ------------------------------------------------------------------------------

# Renames into place outside the shared writer, and why each may stay.
OTHER_RENAMES = {
    # `bulkhead map -o FILE`: an output file the operator names, not a private one (often
    # in /tmp, which the private writer refuses); written O_EXCL under a random name.
    "controller/observe/graph.py",
}


def test_no_module_writes_a_file_into_place_by_itself() -> None:
    sources = [
        path
        for package in ("agent", "controller", "lab", "proto/bulkhead")
        for path in (REPO / package).rglob("*.py")
        if path.name != "privatefile.py" and "_pb2" not in path.name
    ]
    writers = {
        str(path.relative_to(REPO))
        for path in sources
        if re.search(r"os\.(replace|rename)\(|O_TRUNC|\.tmp\b", path.read_text())
    }

    assert writers == OTHER_RENAMES
