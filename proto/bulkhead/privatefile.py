"""The one writer of private files: keys, certificates, tokens, state and configs.

Shared by the agent, the controller, the lab and the simulator (which never import each
other). A file is written as a temporary file with an unpredictable name in the same
directory, created with ``O_CREAT | O_EXCL | O_NOFOLLOW`` and its final mode, fsynced and
renamed over the target; then the directory is fsynced. Every step works through one
descriptor of the directory, opened and checked first, so a directory swapped for another
after the check is never written.

A directory is refused when a user other than this one (or root) owns it, or when its
group or others may write it (sticky ``/tmp``-like directories included): such a user
could plant a symlink or a file where ours will be. A missing directory is created 0700.
A target that is a symlink is refused, never replaced or followed.

``write_private_group`` writes files that must change together (a key and its
certificate). Each is first written in full as ``.<name>.<token>.pending`` (one token per
write) and fsynced. Renaming the FIRST file of the group into place is the commit point:
``recover_private_group`` (and every later group write, before it starts) removes the
pending files of a write that had not committed, and renames into place those of a
write that had, so a reader never sees a new key beside an old certificate.

Errors are OSError: ``UnsafeLocation`` for a refused directory or target, the system's
own otherwise; both name the path.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import secrets
import stat
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import NamedTuple

PRIVATE_MODE = 0o600
PRIVATE_DIR_MODE = 0o700
_TEMPORARY_SUFFIX = ".tmp"
_PENDING_SUFFIX = ".pending"
_TOKEN_BYTES = 8  # 16 hex digits: not guessable, so never worth planting in advance
_CREATE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_WRITABLE_BY_OTHERS = stat.S_IWGRP | stat.S_IWOTH


class UnsafeLocation(OSError):
    """A file that is not written because another user could redirect or replace it."""

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(errno.EPERM, reason, str(path))
        self.path = path
        self.reason = reason

    def __str__(self) -> str:
        return f"refusing to write {self.path}: {self.reason}"


class PrivateFile(NamedTuple):
    """One file of a group: its name in the directory, its content and its mode."""

    name: str
    data: bytes
    mode: int = PRIVATE_MODE


def write_private_file(
    path: Path, data: bytes, *, mode: int = PRIVATE_MODE, durable: bool = True
) -> None:
    """Replace PATH by a file holding DATA with MODE, atomically. DURABLE=False skips the
    fsyncs (for caches, where a crash may lose the file but never leaves half of it)."""
    _check_name(path.name)
    with _directory(path.parent, path) as directory_fd:
        _refuse_symlink(directory_fd, path)
        temporary = _temporary_name(path.name, _TEMPORARY_SUFFIX)
        _create(directory_fd, temporary, data, mode, durable=durable)
        _rename(directory_fd, temporary, path.name)
        if durable:
            os.fsync(directory_fd)


def write_private_group(directory: Path, files: Sequence[PrivateFile]) -> None:
    """Write FILES into DIRECTORY so that they appear together (see the module's doc)."""
    names = [file.name for file in files]
    for name in names:
        _check_name(name)
    if len(set(names)) != len(names) or not names:
        raise ValueError(f"a group needs distinct file names, got {names}")
    with _directory(directory, directory / names[0]) as directory_fd:
        for name in names:
            _refuse_symlink(directory_fd, directory / name)
        _recover(directory_fd, directory, names)
        token = secrets.token_hex(_TOKEN_BYTES)
        try:
            for file in files:
                pending = pending_name(file.name, token)
                _create(directory_fd, pending, file.data, file.mode, durable=True)
            os.fsync(directory_fd)
        except BaseException:
            _discard(directory_fd, [pending_name(name, token) for name in names])
            raise
        # No cleanup on failure from here: after the first rename, recovery finishes the rest.
        for name in names:
            os.replace(
                pending_name(name, token), name, src_dir_fd=directory_fd, dst_dir_fd=directory_fd
            )
        os.fsync(directory_fd)


def recover_private_group(directory: Path, names: Sequence[str]) -> None:
    """Finish or undo a ``write_private_group`` of NAMES that a crash interrupted; nothing
    to do (and no check of the directory) when none is pending or DIRECTORY is missing."""
    try:
        directory_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except FileNotFoundError:
        return
    try:
        if _pending_by_token(directory_fd, names):
            _check_directory(directory_fd, directory, directory)
            _recover(directory_fd, directory, names)
    finally:
        os.close(directory_fd)


def check_private_dir(directory: Path, names: Sequence[str] = ()) -> None:
    """UnsafeLocation if the writers here would refuse DIRECTORY or one of the NAMES in it;
    a missing directory passes (they create it 0700). For commands that check first."""
    try:
        directory_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except FileNotFoundError:
        return
    try:
        _check_directory(directory_fd, directory, directory)
        for name in names:
            _check_name(name)
            _refuse_symlink(directory_fd, directory / name)
    finally:
        os.close(directory_fd)


def pending_name(name: str, token: str) -> str:
    """What a group write calls NAME's file before its rename (TOKEN: 16 hex digits, one
    per write); tests replay a crash with it."""
    return f".{name}.{token}{_PENDING_SUFFIX}"


@contextlib.contextmanager
def _directory(directory: Path, target: Path) -> Iterator[int]:
    """A checked descriptor of DIRECTORY (created 0700 if missing) for writing TARGET."""
    created = False
    try:
        directory.mkdir(mode=PRIVATE_DIR_MODE, parents=True)
        created = True
    except FileExistsError:
        pass
    try:
        # Not through a link: one put where the directory was made would redirect the
        # chmod below and the write to wherever it points.
        directory_fd = os.open(
            directory, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
        )
    except OSError as exc:
        # Linux answers ENOTDIR for a link under O_DIRECTORY, ELOOP without it.
        if exc.errno not in (errno.ELOOP, errno.ENOTDIR) or not directory.is_symlink():
            raise
        raise UnsafeLocation(
            target, f"its directory {directory} is a symbolic link; give the real directory"
        ) from exc
    try:
        if created and os.fstat(directory_fd).st_uid == os.geteuid():
            os.fchmod(directory_fd, PRIVATE_DIR_MODE)  # mkdir's mode is filtered by the umask
        _check_directory(directory_fd, directory, target)
        yield directory_fd
    finally:
        os.close(directory_fd)


def _check_directory(directory_fd: int, directory: Path, target: Path) -> None:
    status = os.fstat(directory_fd)
    me = os.geteuid()
    if status.st_uid not in (me, 0):
        raise UnsafeLocation(
            target,
            f"its directory {directory} is owned by uid {status.st_uid}, not by this user "
            f"(uid {me}) or root, so that user could put a link where the file goes; "
            "use a directory of your own",
        )
    if status.st_mode & _WRITABLE_BY_OTHERS:
        who = "its group and others" if status.st_mode & stat.S_IWOTH else "its group"
        raise UnsafeLocation(
            target,
            f"its directory {directory} (mode {stat.S_IMODE(status.st_mode):04o}) is "
            f"writable by {who}, who could put a link where the file goes; "
            f"run `chmod go-w {directory}` or use a private directory",
        )


def _refuse_symlink(directory_fd: int, target: Path) -> None:
    try:
        status = os.stat(target.name, dir_fd=directory_fd, follow_symlinks=False)
    except FileNotFoundError:
        return
    if stat.S_ISLNK(status.st_mode):
        raise UnsafeLocation(
            target, "it is a symbolic link; remove the link or write somewhere else"
        )
    if stat.S_ISDIR(status.st_mode):
        raise UnsafeLocation(target, "it is a directory")


def _create(directory_fd: int, name: str, data: bytes, mode: int, *, durable: bool) -> None:
    """Create NAME (new, never through a link) holding DATA with MODE; removed on failure."""
    fd = os.open(name, _CREATE_FLAGS, mode, dir_fd=directory_fd)
    try:
        os.fchmod(fd, mode)  # O_CREAT's mode is filtered by the umask
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        if durable:
            os.fsync(fd)
    except BaseException:
        os.close(fd)
        _discard(directory_fd, [name])
        raise
    os.close(fd)


def _rename(directory_fd: int, source: str, target: str) -> None:
    try:
        os.replace(source, target, src_dir_fd=directory_fd, dst_dir_fd=directory_fd)
    except BaseException:
        _discard(directory_fd, [source])
        raise


def _recover(directory_fd: int, directory: Path, names: Sequence[str]) -> None:
    """Undo every pending write of NAMES that had not committed; finish the ones that had."""
    changed = False
    for token, pending in _pending_by_token(directory_fd, names).items():
        changed = True
        if names[0] in pending:  # the commit point was not reached: the old files stand
            _discard(directory_fd, [pending_name(name, token) for name in pending])
            continue
        for name in names:
            if name in pending:
                _finish(directory_fd, directory, pending_name(name, token), name)
    if changed:
        os.fsync(directory_fd)


def _finish(directory_fd: int, directory: Path, pending: str, name: str) -> None:
    status = os.stat(pending, dir_fd=directory_fd, follow_symlinks=False)
    if not stat.S_ISREG(status.st_mode):  # not ours: we only ever make regular files
        raise UnsafeLocation(directory / pending, "a pending file is not a regular file")
    _refuse_symlink(directory_fd, directory / name)
    os.replace(pending, name, src_dir_fd=directory_fd, dst_dir_fd=directory_fd)


def _pending_by_token(directory_fd: int, names: Sequence[str]) -> dict[str, set[str]]:
    """token -> the NAMES that have a pending file of that write."""
    patterns = {
        name: re.compile(
            rf"\.{re.escape(name)}\.([0-9a-f]{{{2 * _TOKEN_BYTES}}}){re.escape(_PENDING_SUFFIX)}"
        )
        for name in names
    }
    found: dict[str, set[str]] = {}
    for entry in os.listdir(directory_fd):
        for name, pattern in patterns.items():
            match = pattern.fullmatch(entry)
            if match:
                found.setdefault(match.group(1), set()).add(name)
    return found


def _discard(directory_fd: int, names: Sequence[str]) -> None:
    for name in names:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(name, dir_fd=directory_fd)


def _temporary_name(name: str, suffix: str) -> str:
    return f".{name}.{secrets.token_hex(_TOKEN_BYTES)}{suffix}"


def _check_name(name: str) -> None:
    if not name or name in (".", "..") or "/" in name or "\0" in name:
        raise ValueError(f"{name!r} is not a file name")
