"""Choosing the dataplane: auto follows the host's iptables; legacy iptables on an
nf_tables host only with an explicit yes."""

from __future__ import annotations

import pytest

from agent.dataplane.backend import DataplaneError
from agent.dataplane.select import Flavour, choose_backend


@pytest.mark.parametrize(
    ("flavour", "expected"),
    [(Flavour.NF_TABLES, "nftables"), (Flavour.LEGACY, "iptables"), (Flavour.NONE, "nftables")],
)
def test_auto_follows_the_hosts_iptables(flavour: Flavour, expected: str) -> None:
    assert choose_backend("auto", flavour, allow_iptables_on_nft_host=False) == expected


def test_iptables_on_an_nf_tables_host_is_refused_with_the_reason() -> None:
    with pytest.raises(DataplaneError, match="invisible to `iptables -S`") as raised:
        choose_backend("iptables", Flavour.NF_TABLES, allow_iptables_on_nft_host=False)
    assert "allow_iptables_on_nft_host: true" in str(raised.value)


def test_explicit_choices_stand_where_they_are_safe_or_allowed() -> None:
    assert (
        choose_backend("iptables", Flavour.LEGACY, allow_iptables_on_nft_host=False) == "iptables"
    )
    assert (
        choose_backend("iptables", Flavour.NF_TABLES, allow_iptables_on_nft_host=True) == "iptables"
    )
    assert (
        choose_backend("nftables", Flavour.LEGACY, allow_iptables_on_nft_host=False) == "nftables"
    )
