"""Hot reload of labels and mode from the config file and the labels drop-in directory."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from agent.config import ConfigError
from agent.dataplane.baseline import Mode
from agent.reload import HostSettings, host_settings, read_drop_ins, watch_settings

CONFIG = "agent_id: web\ncontroller: 198.18.0.1:50151\nlabels: {app: web, env: dev}\n"


def test_drop_ins_merge_in_file_order_over_the_config(tmp_path: Path) -> None:
    config = tmp_path / "agent.yaml"
    config.write_text(CONFIG)
    (tmp_path / "labels.d").mkdir()
    (tmp_path / "labels.d" / "10-env.yaml").write_text("env: prod\n")
    (tmp_path / "labels.d" / "20-role.yaml").write_text("role: db\nenv: staging\n")
    (tmp_path / "labels.d" / "notes.txt").write_text("ignored")
    _, settings = host_settings(config)
    assert settings.labels == {"app": "web", "env": "staging", "role": "db"}


def test_bad_drop_in_names_the_file(tmp_path: Path) -> None:
    (tmp_path / "x.yaml").write_text("- a list\n")
    with pytest.raises(ConfigError, match=r"x\.yaml: expected a mapping"):
        read_drop_ins(tmp_path)
    (tmp_path / "x.yaml").write_text("'bad key': v\n")
    with pytest.raises(ConfigError, match="label keys are"):
        read_drop_ins(tmp_path)


def test_edits_reach_the_callback_and_bad_edits_are_ignored(tmp_path: Path) -> None:
    config = tmp_path / "agent.yaml"
    config.write_text(CONFIG)
    drop_ins = tmp_path / "labels.d"
    drop_ins.mkdir()
    seen: list[HostSettings] = []

    async def scenario() -> None:
        _, current = host_settings(config)

        async def apply(settings: HostSettings) -> None:
            seen.append(settings)

        watcher = asyncio.create_task(watch_settings(config, current, apply))
        await asyncio.sleep(0.3)
        (drop_ins / "role.yaml").write_text("role: db\n")
        await _until(lambda: len(seen) == 1)
        (drop_ins / "broken.yaml").write_text("[not, a, mapping]\n")  # ignored, logged
        await asyncio.sleep(0.5)
        (drop_ins / "broken.yaml").unlink()
        config.write_text(CONFIG.replace("labels:", "mode: visibility\nlabels:"))
        await _until(lambda: len(seen) >= 2)
        watcher.cancel()

    asyncio.run(scenario())
    assert seen[0].labels == {"app": "web", "env": "dev", "role": "db"}
    assert seen[-1].mode is Mode.VISIBILITY


async def _until(condition: object, limit: float = 3.0) -> None:
    waited = 0.0
    while not condition():  # type: ignore[operator]
        assert waited < limit, "no reload within the time limit"
        await asyncio.sleep(0.05)
        waited += 0.05
