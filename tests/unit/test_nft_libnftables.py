"""The ctypes binding's own failure modes (kernel-facing calls are integration tests)."""

from __future__ import annotations

import pytest

from agent.dataplane.libnftables import LibNftables, NftError


def test_a_missing_library_is_a_clear_nft_error() -> None:
    with pytest.raises(NftError, match=r"cannot load libnftables\.so\.404.*libnftables1"):
        LibNftables("libnftables.so.404")


def test_a_closed_context_refuses_commands_without_touching_the_kernel() -> None:
    nft = LibNftables()
    nft.close()
    nft.close()  # closing twice is harmless
    with pytest.raises(NftError, match="closed"):
        nft.json_cmd({"nftables": [{"list": {"tables": None}}]})
