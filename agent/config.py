"""Agent configuration: a YAML file validated with field-precise errors."""

from __future__ import annotations

import ipaddress
import socket
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from agent.dataplane.baseline import Mode, PortSpec, parse_port_spec
from bulkhead.v1.contract import (
    AGENT_ID_RULE,
    LABEL_KEY_RULE,
    LABEL_VALUE_RULE,
    is_valid_agent_id,
    is_valid_label_key,
    is_valid_label_value,
)

DEFAULT_CONFIG = Path("/etc/bulkhead/agent.yaml")
DEFAULT_STATE_DIR = Path("/var/lib/bulkhead/agent")


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
    # Where hosts without a certificate enroll; default: the controller's port + 1.
    enrollment: str | None = None
    # One-time enrollment token, used on first start when the state dir holds no
    # certificate (`bulkhead token create`). Not needed once enrolled.
    token: str | None = None
    hostname: str = Field(default_factory=socket.gethostname)
    labels: dict[str, str] = Field(default_factory=dict)
    mode: Mode = Mode.ENFORCE
    # Drop-in label files (*.yaml mappings), watched like the config; default:
    # labels.d beside the config file.
    labels_dir: Path | None = None
    failsafe: FailsafeConfig = Field(default_factory=FailsafeConfig)
    state_dir: Path = DEFAULT_STATE_DIR
    # auto: nftables, unless the host's own iptables is the legacy one (agent.dataplane.select).
    dataplane: Literal["auto", "nftables", "iptables"] = "auto"
    allow_iptables_on_nft_host: bool = False
    # After each apply the controller must be reachable over a new connection within this
    # many seconds, or the previous ruleset is put back. 0 turns the check off.
    commit_confirm_seconds: float = Field(default=10.0, ge=0, le=300, allow_inf_nan=False)
    heartbeat_interval: float = Field(default=30.0, gt=0, le=300, allow_inf_nan=False)
    address_poll_interval: float = Field(default=2.0, gt=0, le=300, allow_inf_nan=False)
    # Observation (agent/observe): flows and the socket-to-process table. At most
    # flow_capacity flows wait for the controller; beyond that the oldest are dropped.
    observe: bool = True
    flow_capacity: int = Field(default=10_000, ge=100, le=1_000_000)
    flow_report_interval: float = Field(default=2.0, gt=0, le=300, allow_inf_nan=False)
    snapshot_interval: float = Field(default=5.0, ge=0.5, le=3600, allow_inf_nan=False)
    # Prometheus metrics over HTTP at ADDRESS:PORT (e.g. 127.0.0.1:9471); off when unset.
    # Default-deny blocks remote scrapes unless a policy or failsafe port allows them.
    metrics_listen: str | None = None

    @field_validator("agent_id")
    @classmethod
    def _agent_id(cls, value: str) -> str:
        if not is_valid_agent_id(value):
            raise ValueError(f"must be {AGENT_ID_RULE}")
        return value

    @field_validator("labels")
    @classmethod
    def _labels(cls, value: dict[str, str]) -> dict[str, str]:
        # The controller would refuse every hello carrying these: say so here, once.
        for key, label in value.items():
            if not is_valid_label_key(key):
                raise ValueError(f"{key!r}: label keys are {LABEL_KEY_RULE}")
            if not is_valid_label_value(label):
                raise ValueError(f"{key}: {label!r}: label values are {LABEL_VALUE_RULE}")
        return value

    @field_validator("controller", "enrollment", "metrics_listen")
    @classmethod
    def _address(cls, value: str | None) -> str | None:
        if value is not None:
            split_host_port(value)
        return value

    def enrollment_address(self) -> str:
        if self.enrollment is not None:
            return self.enrollment
        host, _, port = self.controller.rpartition(":")
        return f"{host}:{int(port) + 1}"


def split_host_port(text: str) -> tuple[str, int]:
    """'198.18.0.1:50151' or '[2001:db8::1]:50151' -> (address, port).

    Only IP literals: under default-deny the DNS lookups a name needs would be blocked
    (and a name that resolves elsewhere later would not match the baseline's rule).
    """
    host, sep, port_text = text.rpartition(":")
    if not sep or not host or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError(f"{text!r} is not ADDRESS:PORT (IPv6 as [ADDRESS]:PORT)")
    bracketed = host.startswith("[") and host.endswith("]")
    try:
        if bracketed:
            address: ipaddress.IPv4Address | ipaddress.IPv6Address = ipaddress.IPv6Address(
                host[1:-1]
            )
        elif ":" in host:
            raise ValueError(f"{text!r}: write an IPv6 address in brackets, [ADDRESS]:PORT")
        else:
            address = ipaddress.IPv4Address(host)
    except ipaddress.AddressValueError as exc:
        raise ValueError(
            f"{host!r} is not an IP address; the agent dials its controller by address, "
            "since default-deny would block the DNS lookups a name needs"
        ) from exc
    return str(address), int(port_text)


def load_config(path: Path) -> AgentConfig:
    try:
        raw = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read ({exc.strerror})") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
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
