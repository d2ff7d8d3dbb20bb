"""`bulkhead-agent install-service`: put the files a host needs to run the agent under systemd.

The config (/etc/bulkhead/agent.yaml, 0600: it may hold the enrollment token), the unit
(/etc/systemd/system/bulkhead-agent.service) and the state dir (/var/lib/bulkhead/agent,
0700), all below --root so images can be built offline. It never runs systemctl: enabling
a firewall agent is the operator's step.

The unit's one source is systemd/bulkhead-agent.service in the repository; the package
ships it as agent/units/bulkhead-agent.service (a symlink there).
"""

from __future__ import annotations

import shlex
import socket
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import click
import yaml

from agent.config import (
    DEFAULT_CONFIG,
    DEFAULT_STATE_DIR,
    AgentConfig,
    ConfigError,
    ConfigInvalid,
    load_config,
    parse_config,
)
from bulkhead.privatefile import UnsafeLocation, write_private_file

UNIT_NAME = "bulkhead-agent.service"
UNIT_DIR = Path("/etc/systemd/system")
# The command-line option each config field comes from, for error messages.
_OPTION_OF_FIELD = {
    "agent_id": "--agent-id",
    "controller": "--controller",
    "token": "--token",
    "labels": "--labels",
}


class InstallError(Exception):
    """Bad arguments or an unwritable target; the message says which and why."""


@dataclass(frozen=True)
class InstallReport:
    config: Path
    config_written: bool
    unit: Path
    state_dir: Path
    # The unit's ExecStart program, if it is missing below the root.
    missing_program: Path | None


def packaged_unit() -> str:
    """The text of the agent's unit as shipped in this package."""
    return resources.files("agent").joinpath("units", UNIT_NAME).read_text(encoding="utf-8")


def parse_labels(text: str) -> dict[str, str]:
    """'app=web,env=prod' -> {'app': 'web', 'env': 'prod'} (checked later, with the config)."""
    labels: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise InstallError(f"--labels: {item!r} is not KEY=VALUE")
        if key in labels:
            raise InstallError(f"--labels: {key!r} given twice")
        labels[key] = value
    return labels


def build_config(
    controller: str, agent_id: str, token: str | None, labels: dict[str, str]
) -> AgentConfig:
    """The agent config these arguments describe, validated as the agent will load it."""
    raw: dict[str, object] = {"agent_id": agent_id, "controller": controller, "labels": labels}
    if token is not None:
        raw["token"] = token
    try:
        return parse_config(raw)
    except ConfigInvalid as exc:
        problems = []
        for where, what in exc.problems:
            field = where.split(".", maxsplit=1)[0]
            problems.append(f"{_OPTION_OF_FIELD.get(field, field)}: {what}")
        raise InstallError("; ".join(problems)) from exc


def render_config(config: AgentConfig) -> str:
    fields: dict[str, object] = {"agent_id": config.agent_id, "controller": config.controller}
    if config.token is not None:
        fields["token"] = config.token
    fields["labels"] = dict(config.labels)
    header = (
        "# Written by `bulkhead-agent install-service`. Other settings (mode, failsafe,\n"
        "# dataplane, state_dir, ...) keep their defaults unless added here.\n"
    )
    return header + yaml.safe_dump(fields, sort_keys=False)


def exec_start_program(unit_text: str) -> Path | None:
    """The program the unit's ExecStart= runs (its first word, without prefixes like '-')."""
    for line in unit_text.splitlines():
        key, sep, value = line.partition("=")
        if sep and key.strip() == "ExecStart":
            words = shlex.split(value)
            program = Path(words[0].lstrip("-@:+!")) if words else None
            return program if program is not None and program.is_absolute() else None
    return None


def below(root: Path, path: Path) -> Path:
    """PATH (absolute) as seen from ROOT."""
    return root / path.relative_to("/")


def install(
    root: Path, config: AgentConfig | None, *, force: bool, unit_text: str
) -> InstallReport:
    """Place config (unless present and not FORCE; None keeps any), unit and state dir."""
    config_path = below(root, DEFAULT_CONFIG)
    unit_path = below(root, UNIT_DIR / UNIT_NAME)
    state_dir = below(root, DEFAULT_STATE_DIR)
    write_config = config is not None and (force or not config_path.exists())
    if not write_config and not config_path.exists():
        raise InstallError(f"--controller: needed to write {config_path}, which does not exist")
    try:
        if config is not None and write_config:
            config_path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
            write_private_file(config_path, render_config(config).encode())
        unit_path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
        write_private_file(unit_path, unit_text.encode(), mode=0o644)
        state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        state_dir.chmod(0o700)  # mkdir's mode is filtered by the umask; an old dir may be open
    except UnsafeLocation as exc:
        raise InstallError(str(exc)) from exc
    except OSError as exc:
        where = exc.filename or root
        message = f"cannot write {where}: {exc.strerror} (run as root, or use --root)"
        raise InstallError(message) from exc
    program = exec_start_program(unit_text)
    missing = program if program is not None and not below(root, program).exists() else None
    return InstallReport(config_path, write_config, unit_path, state_dir, missing)


@click.command("install-service")
@click.option(
    "--root",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("/"),
    show_default=True,
    help="Install below this directory (an image being built) instead of this host.",
)
@click.option("--controller", help="The controller's ADDRESS:PORT (an IP address).")
@click.option("--token", help="Enrollment token (`bulkhead token create`), used on first start.")
@click.option("--agent-id", help="This workload's id  [default: the host name].")
@click.option("--labels", default="", help="This host's labels: KEY=VALUE,KEY=VALUE.")
@click.option("--force", is_flag=True, help="Replace an existing config.")
def install_service(  # noqa: PLR0917 - click passes options positionally
    root: Path,
    controller: str | None,
    token: str | None,
    agent_id: str | None,
    labels: str,
    force: bool,
) -> None:
    """Install the agent's config, systemd unit and state dir (starts nothing).

    The unit reads /etc/bulkhead/agent.yaml; the --config before the command does not apply.
    """
    root = root.resolve()
    try:
        config = _config_from_options(controller, token, agent_id, labels)
        report = install(root, config, force=force, unit_text=_read_packaged_unit())
    except InstallError as exc:
        raise click.ClickException(str(exc)) from exc
    if report.config_written:
        click.echo(f"wrote {report.config} (0600)")
    else:
        click.echo(f"kept {report.config}" + (" (--force replaces it)" if config else ""))
        _warn_if_invalid(report.config)
    click.echo(f"wrote {report.unit}")
    click.echo(f"state dir {report.state_dir} (0700)")
    if report.missing_program is not None:
        click.echo(
            f"warning: the unit runs {report.missing_program}, which does not exist; install "
            "bulkhead there or override ExecStart= in a drop-in",
            err=True,
        )
    start = "systemctl daemon-reload && systemctl enable --now bulkhead-agent"
    if root == Path("/"):
        click.echo(f"next: {start}")
    else:
        click.echo(f"next, in the image: systemctl --root={root} enable bulkhead-agent")
        click.echo(f"  (or on the running host: {start})")


def _config_from_options(
    controller: str | None, token: str | None, agent_id: str | None, labels: str
) -> AgentConfig | None:
    if controller is None:
        options = (("--token", token), ("--agent-id", agent_id), ("--labels", labels))
        given = [name for name, value in options if value]
        if given:
            raise InstallError(f"--controller: needed with {', '.join(given)} (a new config)")
        return None
    return build_config(controller, agent_id or socket.gethostname(), token, parse_labels(labels))


def _read_packaged_unit() -> str:
    try:
        return packaged_unit()
    except OSError as exc:
        raise InstallError(
            f"the packaged {UNIT_NAME} cannot be read ({exc.strerror}); reinstall bulkhead"
        ) from exc


def _warn_if_invalid(config_path: Path) -> None:
    try:
        load_config(config_path)
    except ConfigError as exc:
        click.echo(f"warning: the agent will refuse the kept config:\n{exc}", err=True)
