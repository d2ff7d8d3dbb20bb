"""Agent configuration: a YAML file validated with field-precise errors."""

from __future__ import annotations

import ipaddress
import re
import socket
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from agent.dataplane.baseline import Mode, PortSpec, parse_port_spec

DEFAULT_CONFIG = Path("/etc/bulkhead/agent.yaml")
DEFAULT_STATE_DIR = Path("/var/lib/bulkhead/agent")
_AGENT_ID = re.compile(r"^[a-z0-9]([a-z0-9._-]{0,61}[a-z0-9])?$")


class ConfigError(Exception):
    """The configuration file is missing or invalid; the message names the field."""


class FailsafeConfig(BaseModel):
    """Ports no policy can close, so operators can always get back in."""

    model_config = ConfigDict(extra="forbid")
    inbound: list[str] = Field(default_factory=lambda: ["tcp/22"])
    outbound: list[str] = Field(default_factory=list)

    @field_validator("inbound", "outbound")
    @classmethod
    def _ports(cls, value: list[str]) -> list[str]:
        for text in value:
            parse_port_spec(text)
        return value

    def inbound_specs(self) -> tuple[PortSpec, ...]:
        return tuple(parse_port_spec(t) for t in self.inbound)

    def outbound_specs(self) -> tuple[PortSpec, ...]:
        return tuple(parse_port_spec(t) for t in self.outbound)


class AgentConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    agent_id: str
    controller: str
    hostname: str = Field(default_factory=socket.gethostname)
    labels: dict[str, str] = Field(default_factory=dict)
    mode: Mode = Mode.ENFORCE
    failsafe: FailsafeConfig = Field(default_factory=FailsafeConfig)
    state_dir: Path = DEFAULT_STATE_DIR
    dataplane: Literal["nftables"] = "nftables"
    heartbeat_interval: float = Field(default=5.0, gt=0)
    address_poll_interval: float = Field(default=2.0, gt=0)

    @field_validator("agent_id")
    @classmethod
    def _agent_id(cls, value: str) -> str:
        if not _AGENT_ID.match(value):
            raise ValueError(
                "must be 1-63 lowercase letters, digits, '.', '_' or '-', "
                "starting and ending with a letter or digit"
            )
        return value

    @field_validator("controller")
    @classmethod
    def _controller(cls, value: str) -> str:
        split_host_port(value)
        return value


def split_host_port(text: str) -> tuple[str, int]:
    """'198.18.0.1:50151', '[2001:db8::1]:50151' or 'ctl.example:50151' -> (host, port)."""
    host, sep, port_text = text.rpartition(":")
    if not sep or not host or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError(f"'{text}' is not HOST:PORT (IPv6 as [ADDR]:PORT)")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        ipaddress.IPv6Address(host)
    return host, int(port_text)


def load_config(path: Path) -> AgentConfig:
    try:
        raw = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read ({exc.strerror})") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc})") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of settings")
    try:
        return AgentConfig.model_validate(raw)
    except ValidationError as exc:
        lines = []
        for error in exc.errors():
            where = ".".join(str(p) for p in error["loc"]) or "(top level)"
            message = error["msg"].removeprefix("Value error, ")
            if error["type"] == "extra_forbidden":
                message = "unknown setting"
            lines.append(f"{path}: {where}: {message}")
        raise ConfigError("\n".join(lines)) from exc
