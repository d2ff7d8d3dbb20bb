"""Crash-safe writes of a group of files that must change together (a key and its certificate).

Every file is first written in full beside its final name as ``<name>.new`` and fsynced.
Renaming the FIRST file of the group into place is the commit point: before it, the
pending files are debris and are removed; after it, the remaining pending files are
complete and are renamed into place. ``recover`` applies that rule after a crash, so a
reader never sees a new key beside an old (or missing) certificate.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

PENDING_SUFFIX = ".new"


def pending_path(path: Path) -> Path:
    return path.with_name(path.name + PENDING_SUFFIX)


def ensure_private_dir(directory: Path) -> None:
    """Create DIRECTORY (and parents) 0700; an existing directory keeps its mode."""
    if not directory.is_dir():
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        # mkdir's mode is filtered by the umask; set it explicitly.
        directory.chmod(0o700)


def write_group(directory: Path, files: Sequence[tuple[str, bytes, int]]) -> None:
    """Write (name, data, mode) files into DIRECTORY so that they appear together."""
    for name, data, mode in files:
        _write_synced(pending_path(directory / name), data, mode)
    _fsync_dir(directory)
    for name, _, _ in files:
        os.replace(pending_path(directory / name), directory / name)
    _fsync_dir(directory)


def write_private_files(directory: Path, contents: Mapping[str, bytes]) -> None:
    """Write name -> data as 0600 files into DIRECTORY (created 0700), each one atomically."""
    ensure_private_dir(directory)
    write_group(directory, [(name, data, 0o600) for name, data in contents.items()])


def recover(directory: Path, names: Sequence[str]) -> None:
    """Finish or discard a ``write_group`` of NAMES that a crash interrupted."""
    pending = [pending_path(directory / name) for name in names]
    if pending[0].exists():
        for path in pending:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
    else:
        for name, path in zip(names, pending, strict=True):
            if path.exists():
                os.replace(path, directory / name)
    _fsync_dir(directory)


def _write_synced(path: Path, data: bytes, mode: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        # O_CREAT's mode is filtered by the umask, and an old file keeps its mode.
        os.fchmod(fd, mode)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
