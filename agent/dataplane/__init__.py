"""The agent's dataplane: renders a compiled Ruleset into the kernel.

Modules: ``baseline`` (mode, failsafe ports, controller endpoints), ``model`` (the
checked ruleset), ``nftables`` (renderer and backend), ``libnftables`` (ctypes binding),
``evaluate`` (would the policy allow a flow), ``conntrack`` (cut flows no longer
allowed; opens netlink sockets, so it is not re-exported here), ``apply_cli`` (drive a
backend inside a network namespace).
"""

from agent.dataplane.backend import Backend, DataplaneError, RulesetError
from agent.dataplane.baseline import Baseline, Endpoint, Mode, PortSpec, parse_port_spec
from agent.dataplane.evaluate import Flow, is_allowed
from agent.dataplane.libnftables import LibNftables, NftError, NftRunner
from agent.dataplane.nftables import NftablesBackend, render

__all__ = [
    "Backend",
    "Baseline",
    "DataplaneError",
    "Endpoint",
    "Flow",
    "LibNftables",
    "Mode",
    "NftError",
    "NftRunner",
    "NftablesBackend",
    "PortSpec",
    "RulesetError",
    "is_allowed",
    "parse_port_spec",
    "render",
]
