"""The legacy-iptables dataplane backend: our own chains, copied in the filter and security
tables, peers in ipsets.

Modules: ``plan`` (what gets loaded: rule lines per family and table, ipsets, names),
``render`` (ruleset -> plan, pure), ``commands`` (running the tools), ``ipsets`` (set
swaps), ``elements`` (a policy delta's member updates, pure), ``tables`` (one family's
filter and security tables), ``transaction`` (one apply across sets and families, rolled
back if it fails), ``backend`` (IptablesBackend).
"""

from agent.dataplane.iptables.backend import IptablesBackend
from agent.dataplane.iptables.commands import CommandRunner, SubprocessRunner
from agent.dataplane.iptables.plan import (
    INPUT_CHAIN,
    OUTPUT_CHAIN,
    FamilyRules,
    IpSet,
    IptablesPlan,
    ipset_name,
)
from agent.dataplane.iptables.render import render_iptables
from agent.dataplane.model import NFLOG_GROUP

__all__ = [
    "INPUT_CHAIN",
    "NFLOG_GROUP",
    "OUTPUT_CHAIN",
    "CommandRunner",
    "FamilyRules",
    "IpSet",
    "IptablesBackend",
    "IptablesPlan",
    "SubprocessRunner",
    "ipset_name",
    "render_iptables",
]
