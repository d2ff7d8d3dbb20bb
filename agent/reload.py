"""Hot reload: the agent's labels and mode follow its config file and a labels drop-in
directory (`labels.d/*.yaml`, each a mapping of labels, merged in file-name order over
the config's own), without a restart. watchdog delivers file events; a short debounce
turns an editor's burst of writes into one reload."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import yaml
from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer

from agent.config import AgentConfig, ConfigError, load_config
from agent.dataplane.baseline import Mode
from bulkhead.v1.contract import (
    LABEL_KEY_RULE,
    LABEL_VALUE_RULE,
    is_valid_label_key,
    is_valid_label_value,
)

log = logging.getLogger(__name__)

DEBOUNCE_S = 0.2


@dataclass(frozen=True)
class HostSettings:
    """What the host says about itself: its labels and its mode."""

    labels: dict[str, str]
    mode: Mode


def labels_dir(config_path: Path, config: AgentConfig) -> Path:
    return config.labels_dir or config_path.parent / "labels.d"


def read_drop_ins(directory: Path) -> dict[str, str]:
    """Labels from DIRECTORY/*.yaml in file-name order; ConfigError naming a bad file."""
    merged: dict[str, str] = {}
    if not directory.is_dir():
        return merged
    for path in sorted(directory.glob("*.yaml")):
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
            raise ConfigError(f"{path}: cannot read ({exc})") from exc
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping of labels")
        for key, value in data.items():
            if not isinstance(key, str) or not is_valid_label_key(key):
                raise ConfigError(f"{path}: {key!r}: label keys are {LABEL_KEY_RULE}")
            if not isinstance(value, str) or not is_valid_label_value(value):
                raise ConfigError(f"{path}: {key}: {value!r}: label values are {LABEL_VALUE_RULE}")
            merged[key] = value
    return merged


def host_settings(config_path: Path) -> tuple[AgentConfig, HostSettings]:
    """Read the config and the drop-ins; ConfigError if either is invalid."""
    config = load_config(config_path)
    labels = {**config.labels, **read_drop_ins(labels_dir(config_path, config))}
    return config, HostSettings(labels=labels, mode=config.mode)


class _Events(FileSystemEventHandler):
    def __init__(self, relevant: Callable[[str], bool], changed: Callable[[], None]) -> None:
        self._relevant = relevant
        self._changed = changed

    def on_any_event(self, event: FileSystemEvent) -> None:
        paths = [str(event.src_path), str(getattr(event, "dest_path", "") or "")]
        if any(self._relevant(p) for p in paths if p):
            self._changed()


async def watch_settings(
    config_path: Path,
    current: HostSettings,
    apply: Callable[[HostSettings], Awaitable[None]],
) -> None:
    """Call APPLY with the new settings whenever the config or a drop-in changes them.
    An invalid edit is logged and ignored: the agent keeps what it has."""
    config, _ = host_settings(config_path)
    drop_ins = labels_dir(config_path, config)
    loop = asyncio.get_running_loop()
    wake = asyncio.Event()

    def relevant(path: str) -> bool:
        candidate = Path(path)
        return candidate in (config_path, drop_ins) or (
            candidate.parent == drop_ins and candidate.suffix == ".yaml"
        )

    def notify() -> None:  # called on watchdog's thread
        loop.call_soon_threadsafe(wake.set)

    observer = Observer()
    handler = _Events(relevant, notify)
    observer.schedule(handler, str(config_path.parent), recursive=False)
    watching_drop_ins = drop_ins.is_dir()
    if watching_drop_ins:
        observer.schedule(handler, str(drop_ins), recursive=False)
    observer.start()
    try:
        while True:
            await wake.wait()
            await asyncio.sleep(DEBOUNCE_S)
            wake.clear()
            if not watching_drop_ins and drop_ins.is_dir():
                # Created after the agent started: watch it from now on.
                observer.schedule(handler, str(drop_ins), recursive=False)
                watching_drop_ins = True
            try:
                _, settings = host_settings(config_path)
            except ConfigError as exc:
                log.error("ignoring the edit, keeping the current settings: %s", exc)
                continue
            if settings != current:
                log.info("host settings changed: labels %s, mode %s", settings.labels,
                         settings.mode.value)  # fmt: skip
                current = settings
                await apply(settings)
    finally:
        observer.stop()
        observer.join(timeout=2)
