"""The tamper guard around element updates: with iptables (no owner) it checks the kernel
before one and reads it back after, like an apply; with an owned nftables table it reads
nothing. Against a fake backend whose kernel state the tests change."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pytest

from agent.dataplane.backend import DataplaneError
from agent.dataplane.baseline import Baseline, Mode
from agent.dataplane.fingerprint import compose
from agent.enforcer import Enforcer
from agent.tamper import TamperGuard
from bulkhead.v1 import agent_pb2, ruleset_pb2
from bulkhead.v1.contract import apply_set_changes, ruleset_hash

ENFORCE = Baseline(Mode.ENFORCE)
R1 = ruleset_pb2.Ruleset(sets=[ruleset_pb2.AddressSet(name="web", hosts=["198.18.0.1"])])
MOVE = [agent_pb2.SetChange(name="web", add_hosts=["198.18.0.2"], remove_hosts=["198.18.0.1"])]
R2 = apply_set_changes(R1, MOVE)


class ElementKernel:
    """A backend whose 'kernel' holds one set the tests can change behind its back."""

    def __init__(self) -> None:
        self.components: dict[str, object] = {}
        self.updates = 0
        self.reads = 0
        self.fail_update = False

    def apply(self, ruleset: ruleset_pb2.Ruleset, baseline: Baseline) -> None:
        self.components = {"chain BULKHEAD-INPUT": "rules", "ipset bh4-web": _hosts(ruleset)}

    def update_elements(
        self,
        changes: Sequence[agent_pb2.SetChange],
        result: ruleset_pb2.Ruleset,
        baseline: Baseline,
    ) -> bool:
        self.updates += 1
        self.components["ipset bh4-web"] = _hosts(result)
        if self.fail_update:
            self.components["ipset bh4-web"] = ["half"]
            raise DataplaneError("ipset: Error in line 2")
        return True

    def remove(self) -> None:
        self.components = {}

    def is_present(self) -> bool:
        return bool(self.components)

    def state_fingerprint(self) -> str:
        self.reads += 1
        return compose(self.components)


def _hosts(ruleset: ruleset_pb2.Ruleset) -> list[str]:
    return sorted(ruleset.sets[0].hosts)


@pytest.fixture
def kernel() -> ElementKernel:
    return ElementKernel()


def test_an_iptables_element_update_is_read_back_so_later_tampering_is_repaired(
    kernel: ElementKernel,
) -> None:
    guard = TamperGuard.for_dataplane("iptables", kernel)
    guard.backend.apply(R1, ENFORCE)
    assert guard.backend.update_elements(MOVE, R2, ENFORCE)
    assert guard.expected_fingerprint == compose(kernel.components)
    kernel.components["ipset bh4-web"] = ["198.18.0.2", "198.18.9.9"]  # someone adds a peer
    event = guard.check()
    assert event is not None
    assert event.repaired
    assert kernel.components["ipset bh4-web"] == ["198.18.0.2"], "repaired to the delta's result"


def test_tampering_before_an_iptables_element_update_sends_the_delta_whole(
    kernel: ElementKernel,
) -> None:
    guard = TamperGuard.for_dataplane("iptables", kernel)
    guard.backend.apply(R1, ENFORCE)
    kernel.components["chain BULKHEAD-INPUT"] = "flushed"  # the update would keep it
    assert not guard.backend.update_elements(MOVE, R2, ENFORCE)
    assert kernel.updates == 0


def test_a_failed_iptables_element_update_is_not_tampering(kernel: ElementKernel) -> None:
    guard = TamperGuard.for_dataplane("iptables", kernel)
    guard.backend.apply(R1, ENFORCE)
    kernel.fail_update = True
    with pytest.raises(DataplaneError):
        guard.backend.update_elements(MOVE, R2, ENFORCE)
    assert guard.check() is None


def test_an_owned_nftables_element_update_reads_nothing(kernel: ElementKernel) -> None:
    guard = TamperGuard.for_dataplane("nftables", kernel)
    guard.backend.apply(R1, ENFORCE)
    reads = kernel.reads
    assert guard.backend.update_elements(MOVE, R2, ENFORCE)
    assert kernel.reads == reads
    assert guard.expected_fingerprint is None  # adopted at the next check


def test_the_enforcer_sends_a_delta_through_the_iptables_guard(
    kernel: ElementKernel, tmp_path: Path
) -> None:
    guard = TamperGuard.for_dataplane("iptables", kernel)
    enforcer = Enforcer(guard.backend, ENFORCE, tmp_path, cut_flows=lambda *_: 0)
    snapshot = agent_pb2.PolicySnapshot(revision=1, hash=ruleset_hash(R1), ruleset=R1)
    assert enforcer.apply(snapshot, []).ok
    delta = agent_pb2.PolicyDelta(
        base_revision=1, base_hash=ruleset_hash(R1), revision=2, hash=ruleset_hash(R2), sets=MOVE
    )
    assert enforcer.apply_delta(delta, []).ok
    assert kernel.updates == 1
    assert guard.check() is None
    assert guard.expected_fingerprint == compose(kernel.components)
