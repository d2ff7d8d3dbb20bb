"""The last applied snapshot, persisted atomically and checked on load; and the writer
of the agent's state files.

At start the agent re-applies it before talking to the controller, so a
restarted agent enforces what it enforced before, with no open moment.
"""

from __future__ import annotations

import base64
import json
import os
from dataclasses import dataclass
from pathlib import Path

from google.protobuf.message import DecodeError

from bulkhead.v1 import ruleset_pb2
from bulkhead.v1.contract import legacy_ruleset_hash, ruleset_hash

SNAPSHOT_FILE = "snapshot.json"


class StateCorrupt(Exception):
    """The state file exists but cannot be trusted."""


@dataclass(frozen=True)
class AppliedSnapshot:
    revision: int
    hash: str
    ruleset: ruleset_pb2.Ruleset


def save_snapshot(state_dir: Path, snapshot: AppliedSnapshot) -> None:
    """Write, fsync and rename, so a crash leaves the old file or the new one."""
    payload = {
        "revision": snapshot.revision,
        "hash": snapshot.hash,
        "ruleset": base64.b64encode(
            snapshot.ruleset.SerializeToString(deterministic=True)
        ).decode(),
    }
    write_state_file(state_dir, SNAPSHOT_FILE, json.dumps(payload).encode())


def write_state_file(state_dir: Path, name: str, data: bytes) -> None:
    """Put DATA in STATE_DIR/NAME (mode 0600): written to a temporary, fsynced and renamed,
    so a crash leaves the old file or the new one."""
    state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    target = state_dir / name
    tmp = target.with_suffix(".tmp")
    with open(tmp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.chmod(tmp, 0o600)
    os.replace(tmp, target)
    dir_fd = os.open(state_dir, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def load_snapshot(state_dir: Path) -> AppliedSnapshot | None:
    """The persisted snapshot, None if there is none; StateCorrupt if it fails its checks."""
    path = state_dir / SNAPSHOT_FILE
    try:
        payload = json.loads(path.read_bytes())
        ruleset = ruleset_pb2.Ruleset.FromString(
            base64.b64decode(payload["ruleset"], validate=True)
        )
        revision = int(payload["revision"])
        expected = str(payload["hash"])
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError, DecodeError) as exc:
        raise StateCorrupt(f"{path}: unreadable ({exc})") from exc
    if not 0 <= revision < 2**64:
        raise StateCorrupt(f"{path}: revision {revision} is out of range")
    digest = ruleset_hash(ruleset)
    # A file from before the hash was built from parts: its content is as trustworthy, and
    # dropping it would leave a rebooted host with the baseline alone until the controller
    # is reached.
    if expected not in (digest, legacy_ruleset_hash(ruleset)):
        raise StateCorrupt(f"{path}: content does not match its hash (truncated or edited?)")
    return AppliedSnapshot(revision=revision, hash=digest, ruleset=ruleset)
