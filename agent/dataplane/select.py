"""Which dataplane backend to run on this host.

The iptables backend programs the *legacy* x_tables. On a host whose `iptables` command
is nf_tables-based, rules written there are invisible to `iptables` and `nft`, and the kernel
runs both rule sets: operators would debug a firewall they cannot see. So `auto` follows
the host's own iptables, and the iptables backend on an nf_tables host needs an explicit
yes in the config.
"""

from __future__ import annotations

import shutil
import subprocess
from enum import StrEnum

from agent.dataplane.backend import Backend, DataplaneError


class Flavour(StrEnum):
    NF_TABLES = "nf_tables"
    LEGACY = "legacy"
    NONE = "none"  # no iptables command at all


def detect_iptables_flavour() -> Flavour:
    """What the host's `iptables` command writes to: `iptables -V` says it in brackets."""
    binary = shutil.which("iptables")
    if binary is None:
        return Flavour.NONE
    try:
        version = subprocess.run(
            [binary, "-V"], capture_output=True, text=True, timeout=5, check=False
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        return Flavour.NONE
    return Flavour.LEGACY if "(legacy)" in version else Flavour.NF_TABLES


def choose_backend(wanted: str, flavour: Flavour, *, allow_iptables_on_nft_host: bool) -> str:
    """'nftables' or 'iptables' for the configured WANTED ('auto', 'nftables', 'iptables')."""
    if wanted == "auto":
        return "iptables" if flavour is Flavour.LEGACY else "nftables"
    if wanted == "iptables" and flavour is Flavour.NF_TABLES and not allow_iptables_on_nft_host:
        raise DataplaneError(
            "dataplane: iptables programs the legacy x_tables, but this host's `iptables` is "
            "nf_tables-based: Bulkhead's rules would be invisible to `iptables -S` and `nft "
            "list ruleset` while the kernel enforces both. Use `dataplane: nftables` (or "
            "auto), or set `allow_iptables_on_nft_host: true` if nothing else on this host "
            "writes iptables rules"
        )
    return wanted


def make_backend(name: str, *, own_table: bool = True) -> Backend:
    """The backend object for NAME ('nftables' or 'iptables').

    OWN_TABLE=False leaves the nftables table unowned, as on kernels before 6.9 (tests of
    tamper repair use it: an owned table cannot be tampered with)."""
    if name == "iptables":
        # Imported only when chosen: a host on nftables never needs the iptables tools.
        from agent.dataplane.iptables import IptablesBackend

        return IptablesBackend()
    from agent.dataplane.libnftables import LibNftables
    from agent.dataplane.nftables import NftablesBackend

    nft = LibNftables()
    return NftablesBackend(nft, owner=nft if own_table else None)
