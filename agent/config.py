"""Agent configuration: a YAML file validated with field-precise errors.

Checked by hand (agent/config_fields.py) rather than with pydantic, which the controller
and the tools use: in the agent, a long-running process on every host, pydantic and
pydantic_core were about 15 MB of resident memory (docs/benchmarks.md).
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Literal, TypeVar, cast

import yaml

from agent import config_fields as check
from agent.config_fields import FieldError
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
DEFAULT_FAILSAFE_INBOUND = ("tcp/22",)
DATAPLANES = ("auto", "nftables", "iptables")
_T = TypeVar("_T")


class ConfigError(Exception):
    """The configuration file is missing or invalid; the message names the field."""


class ConfigInvalid(ValueError):
    """Settings that are wrong: PROBLEMS holds (where, what) pairs, where a dotted path
    ("failsafe.inbound") or "" for the whole mapping."""

    def __init__(self, problems: list[tuple[str, str]]) -> None:
        super().__init__("; ".join(f"{where}: {what}" for where, what in problems))
        self.problems = problems


@dataclass(frozen=True)
class FailsafeConfig:
    """Ports no policy can close, so operators can always get back in."""

    inbound: list[str] = field(default_factory=lambda: list(DEFAULT_FAILSAFE_INBOUND))
    outbound: list[str] = field(default_factory=list)

    def inbound_specs(self) -> tuple[PortSpec, ...]:
        return tuple(parse_port_spec(t) for t in self.inbound)

    def outbound_specs(self) -> tuple[PortSpec, ...]:
        return tuple(parse_port_spec(t) for t in self.outbound)


@dataclass(frozen=True)
class AgentConfig:
    """The settings of agent.yaml; parse_config makes one from a mapping (defaults there)."""

    agent_id: str
    controller: str
    # Where hosts without a certificate enroll; default: the controller's port + 1.
    enrollment: str | None
    # One-time enrollment token, used on first start when the state dir holds no
    # certificate (`bulkhead token create`). Not needed once enrolled.
    token: str | None
    hostname: str
    labels: dict[str, str]
    mode: Mode
    # Drop-in label files (*.yaml mappings), watched like the config; default:
    # labels.d beside the config file.
    labels_dir: Path | None
    failsafe: FailsafeConfig
    state_dir: Path
    # auto: nftables, unless the host's own iptables is the legacy one (agent.dataplane.select).
    dataplane: Literal["auto", "nftables", "iptables"]
    allow_iptables_on_nft_host: bool
    # After each apply the controller must be reachable over a new connection within this
    # many seconds, or the previous ruleset is put back. 0 turns the check off.
    commit_confirm_seconds: float
    heartbeat_interval: float
    address_poll_interval: float
    # Observation (agent/observe): flows and the socket-to-process table. At most
    # flow_capacity flows wait for the controller; beyond that the oldest are dropped.
    observe: bool
    flow_capacity: int
    flow_report_interval: float
    snapshot_interval: float
    # Prometheus metrics over HTTP at ADDRESS:PORT (e.g. 127.0.0.1:9471); off when unset.
    # Default-deny blocks remote scrapes unless a policy or failsafe port allows them.
    metrics_listen: str | None

    def enrollment_address(self) -> str:
        if self.enrollment is not None:
            return self.enrollment
        host, _, port = self.controller.rpartition(":")
        return f"{host}:{int(port) + 1}"


class _Settings:
    """Reads settings out of one mapping, collecting every problem before raising."""

    def __init__(self, raw: Mapping[str, object], known: set[str], prefix: str = "") -> None:
        self._raw = raw
        self._prefix = prefix
        self.problems: list[tuple[str, str]] = [
            (self.where(str(key)), "unknown setting") for key in raw if key not in known
        ]

    def value(self, name: str) -> object:
        """The raw value of NAME, None if absent."""
        return self._raw.get(name)

    def where(self, name: str) -> str:
        return f"{self._prefix}{name}"

    def get(self, name: str, read: Callable[[object], _T], default: Callable[[], _T]) -> _T:
        return self._read(name, read, default)

    def required(self, name: str, read: Callable[[object], _T]) -> _T:
        return self._read(name, read, None)

    def _read(
        self, name: str, read: Callable[[object], _T], default: Callable[[], _T] | None
    ) -> _T:
        if name not in self._raw:
            if default is not None:
                return default()
            self.problems.append((self.where(name), "Field required"))
        else:
            try:
                return read(self._raw[name])
            except FieldError as exc:
                where = self.where(f"{name}.{exc.at}" if exc.at else name)
                self.problems.append((where, str(exc)))
            except ValueError as exc:
                self.problems.append((self.where(name), str(exc)))
        # Never escapes: parse_config raises when there is a problem.
        return cast(_T, None)


def parse_config(raw: Mapping[str, object]) -> AgentConfig:
    """The AgentConfig RAW describes (defaults for what it leaves out); ConfigInvalid
    naming every wrong setting."""
    settings = _Settings(raw, {f.name for f in fields(AgentConfig)})
    config = AgentConfig(
        agent_id=settings.required("agent_id", _agent_id),
        controller=settings.required("controller", _address),
        enrollment=settings.get("enrollment", _optional_address, lambda: None),
        token=settings.get("token", check.optional_string, lambda: None),
        hostname=settings.get("hostname", check.string, socket.gethostname),
        labels=settings.get("labels", _labels, dict),
        mode=settings.get("mode", _mode, lambda: Mode.ENFORCE),
        labels_dir=settings.get("labels_dir", check.optional_path, lambda: None),
        failsafe=_failsafe(settings),
        state_dir=settings.get("state_dir", check.path, lambda: DEFAULT_STATE_DIR),
        dataplane=settings.get("dataplane", _dataplane, lambda: "auto"),
        allow_iptables_on_nft_host=settings.get(
            "allow_iptables_on_nft_host", check.boolean, lambda: False
        ),
        commit_confirm_seconds=settings.get(
            "commit_confirm_seconds", lambda v: check.number(v, ge=0, le=300), lambda: 10.0
        ),
        heartbeat_interval=settings.get("heartbeat_interval", _interval, lambda: 30.0),
        address_poll_interval=settings.get("address_poll_interval", _interval, lambda: 2.0),
        observe=settings.get("observe", check.boolean, lambda: True),
        flow_capacity=settings.get(
            "flow_capacity", lambda v: check.integer(v, ge=100, le=1_000_000), lambda: 10_000
        ),
        flow_report_interval=settings.get("flow_report_interval", _interval, lambda: 2.0),
        snapshot_interval=settings.get(
            "snapshot_interval", lambda v: check.number(v, ge=0.5, le=3600), lambda: 5.0
        ),
        metrics_listen=settings.get("metrics_listen", _optional_address, lambda: None),
    )
    if settings.problems:
        raise ConfigInvalid(settings.problems)
    return config


def _failsafe(settings: _Settings) -> FailsafeConfig:
    value = settings.value("failsafe")
    if value is None:
        return FailsafeConfig()
    if not isinstance(value, dict):
        settings.problems.append((settings.where("failsafe"), "Input should be a mapping"))
        return FailsafeConfig()
    inner = _Settings(value, {"inbound", "outbound"}, prefix=settings.where("failsafe."))
    failsafe = FailsafeConfig(
        inbound=inner.get("inbound", _ports, lambda: list(DEFAULT_FAILSAFE_INBOUND)),
        outbound=inner.get("outbound", _ports, list),
    )
    settings.problems.extend(inner.problems)
    return failsafe


def _agent_id(value: object) -> str:
    text = check.string(value)
    if not is_valid_agent_id(text):
        raise ValueError(f"must be {AGENT_ID_RULE}")
    return text


def _labels(value: object) -> dict[str, str]:
    labels = check.string_map(value)
    # The controller would refuse every hello carrying these: say so here, once.
    for key, label in labels.items():
        if not is_valid_label_key(key):
            raise ValueError(f"{key!r}: label keys are {LABEL_KEY_RULE}")
        if not is_valid_label_value(label):
            raise ValueError(f"{key}: {label!r}: label values are {LABEL_VALUE_RULE}")
    return labels


def _address(value: object) -> str:
    text = check.string(value)
    split_host_port(text)
    return text


def _optional_address(value: object) -> str | None:
    return None if value is None else _address(value)


def _mode(value: object) -> Mode:
    return Mode(check.choice(value, [m.value for m in Mode]))


def _dataplane(value: object) -> Literal["auto", "nftables", "iptables"]:
    return cast(Literal["auto", "nftables", "iptables"], check.choice(value, DATAPLANES))


def _interval(value: object) -> float:
    return check.number(value, gt=0, le=300)


def _ports(value: object) -> list[str]:
    texts = check.string_list(value)
    for text in texts:
        parse_port_spec(text)
    return texts


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
        return parse_config(raw)
    except ConfigInvalid as exc:
        lines = [f"{path}: {where or '(top level)'}: {what}" for where, what in exc.problems]
        raise ConfigError("\n".join(lines)) from exc
