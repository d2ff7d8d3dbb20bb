"""Policy deltas in the iptables backend: the `ipset restore` lines a delta becomes, the
deltas refused (left to a full apply), and the backend's one-command path, its fallback
and what it remembers, against a recording fake runner (no kernel)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pytest

from agent.dataplane.backend import DataplaneError, RulesetError
from agent.dataplane.baseline import Baseline, Mode, parse_port_spec
from agent.dataplane.iptables import IptablesBackend
from agent.dataplane.iptables.elements import LoadedSets
from agent.dataplane.iptables.plan import Family
from agent.dataplane.iptables.render import render_compiled
from agent.dataplane.model import load_ruleset
from bulkhead.v1 import agent_pb2
from bulkhead.v1 import ruleset_pb2 as pb
from bulkhead.v1.contract import apply_set_changes
from tests.unit.test_iptables_backend import EMPTY, FakeRunner

ENFORCE = Baseline(Mode.ENFORCE, failsafe_inbound=(parse_port_spec("tcp/22"),))
VISIBILITY = Baseline(Mode.VISIBILITY)


def rule(peer_set: str, *, allow: bool = True, port: int = 5432) -> pb.Rule:
    return pb.Rule(
        direction=pb.DIRECTION_INGRESS,
        protocol=pb.PROTOCOL_TCP,
        ports=[pb.PortRange(first=port, last=port)],
        peer_set=peer_set,
        action=pb.ACTION_ALLOW if allow else pb.ACTION_DENY,
        policy="p",
        id=f"r-{peer_set}",
    )


RULESET = pb.Ruleset(
    sets=[
        pb.AddressSet(name="web", hosts=["198.18.0.1", "198.18.0.2", "2001:db8::1"]),
        pb.AddressSet(name="bad", hosts=["198.18.0.65"]),
        pb.AddressSet(name="office", hosts=["198.18.4.9"], networks=["198.18.4.0/25"]),
    ],
    rules=[rule("bad", allow=False), rule("web"), rule("office")],
)


def loaded(ruleset: pb.Ruleset = RULESET, baseline: Baseline = ENFORCE) -> LoadedSets:
    compiled = load_ruleset(ruleset)
    return LoadedSets.of(ruleset, compiled, render_compiled(compiled, baseline), baseline)


def change(name: str, **elements: list[str]) -> agent_pb2.SetChange:
    return agent_pb2.SetChange(name=name, **elements)


def script_for(
    sets: LoadedSets,
    changes: Sequence[agent_pb2.SetChange],
    base: pb.Ruleset = RULESET,
    baseline: Baseline = ENFORCE,
) -> list[str] | None:
    """The restore lines CHANGES become (committed, as after the kernel took them)."""
    update = sets.update(changes, apply_set_changes(base, changes), baseline)
    if update is None:
        return None
    sets.commit(update)
    return update.script.splitlines()


# -- the lines -------------------------------------------------------------------------


def test_an_allow_set_loses_hosts_before_it_gains_any_per_family_set() -> None:
    web = change("web", add_hosts=["198.18.0.5", "2001:db8::5"], remove_hosts=["198.18.0.2"])
    assert script_for(loaded(), [web]) == [
        "del -exist bh4-web 198.18.0.2/32",
        "add -exist bh4-web 198.18.0.5/32",
        "add -exist bh6-web 2001:db8::5/128",
    ]


def test_every_narrowing_line_of_every_set_comes_before_any_widening_one() -> None:
    # A deny set narrows by growing: its additions go first, its deletions last.
    changes = [
        change("web", add_hosts=["198.18.0.3"], remove_hosts=["198.18.0.1"]),
        change("bad", add_hosts=["198.18.0.66"], remove_hosts=["198.18.0.65"]),
    ]
    assert script_for(loaded(), changes) == [
        "del -exist bh4-web 198.18.0.1/32",
        "add -exist bh4-bad 198.18.0.66/32",
        "add -exist bh4-web 198.18.0.3/32",
        "del -exist bh4-bad 198.18.0.65/32",
    ]


def test_networks_are_collapsed_again_and_the_wider_one_goes_in_first() -> None:
    sets = loaded()
    grow = change("office", add_networks=["198.18.4.128/25"])
    assert script_for(sets, [grow]) == [
        "add -exist bh4-office 198.18.4.0/24",
        "del -exist bh4-office 198.18.4.0/25",
    ]
    base = apply_set_changes(RULESET, [grow])
    shrink = change("office", remove_networks=["198.18.4.0/25"])
    # The /25 left is inside the old /24: in first, then the /24 out (narrowing).
    assert script_for(sets, [shrink], base) == [
        "add -exist bh4-office 198.18.4.128/25",
        "del -exist bh4-office 198.18.4.0/24",
    ]
    # The host inside the removed half was a member of its own all along.
    assert sets.groups["office"].ipsets[4].members == {"198.18.4.9/32", "198.18.4.128/25"}


def test_a_host_that_is_also_a_network_stays_until_both_are_gone() -> None:
    base = pb.Ruleset(
        sets=[pb.AddressSet(name="web", hosts=["198.18.0.9"], networks=["198.18.0.9/32"])],
        rules=[rule("web")],
    )
    sets = loaded(base)
    no_host = change("web", remove_hosts=["198.18.0.9"])
    assert script_for(sets, [no_host], base) == []
    base = apply_set_changes(base, [no_host])
    host_back = change("web", add_hosts=["198.18.0.9"])
    assert script_for(sets, [host_back], base) == []
    base = apply_set_changes(base, [host_back])
    no_network = change("web", remove_networks=["198.18.0.9/32"])
    assert script_for(sets, [no_network], base) == []
    base = apply_set_changes(base, [no_network])
    assert script_for(sets, [no_host], base) == ["del -exist bh4-web 198.18.0.9/32"]


def test_updates_build_on_each_other_once_committed() -> None:
    sets = loaded()
    add = change("web", add_hosts=["198.18.0.5"])
    assert script_for(sets, [add]) == ["add -exist bh4-web 198.18.0.5/32"]
    base = apply_set_changes(RULESET, [add])
    assert sets.update([add], base, ENFORCE) is None, "already held"
    remove = change("web", remove_hosts=["198.18.0.5"])
    assert script_for(sets, [remove], base) == ["del -exist bh4-web 198.18.0.5/32"]


def test_visibility_mode_drops_nothing_so_any_set_takes_deltas() -> None:
    both = pb.Ruleset(
        sets=[pb.AddressSet(name="web")], rules=[rule("web"), rule("web", allow=False)]
    )
    add = [change("web", add_hosts=["198.18.0.5"])]
    assert script_for(loaded(both, VISIBILITY), add, both, VISIBILITY) == [
        "add -exist bh4-web 198.18.0.5/32"
    ]
    assert script_for(loaded(both), add, both) is None, "allowed and denied: no safe order"


# -- refused: the caller applies the result whole --------------------------------------


def test_a_result_with_other_rules_set_names_or_baseline_is_refused() -> None:
    sets = loaded()
    changes = [change("web", add_hosts=["198.18.0.5"])]
    result = apply_set_changes(RULESET, changes)
    other_port = pb.Ruleset()
    other_port.CopyFrom(result)
    other_port.rules[1].ports[0].first = 5433
    renamed = pb.Ruleset()
    renamed.CopyFrom(result)
    renamed.sets[1].name = "worse"
    assert sets.update(changes, other_port, ENFORCE) is None
    assert sets.update(changes, renamed, ENFORCE) is None
    assert sets.update(changes, result, VISIBILITY) is None
    assert sets.update(changes, result, ENFORCE) is not None


@pytest.mark.parametrize(
    "changes",
    [
        [change("db", add_hosts=["198.18.0.5"])],  # no such set
        [change("web", add_hosts=["198.18.0.5"]), change("web", add_hosts=["198.18.0.6"])],
        [change("web", remove_hosts=["198.18.0.99"])],  # not held
        [change("web", add_hosts=["2001:DB8::1"])],  # held, in another spelling
        [change("web", add_hosts=["2001:db8::5", "2001:DB8::5"])],  # twice
        [change("office", remove_networks=["198.18.5.0/24"])],  # not held
        [change("office", add_networks=["198.18.4.0/25"])],  # held
    ],
)
def test_a_delta_that_does_not_fit_what_is_loaded_is_refused(
    changes: list[agent_pb2.SetChange],
) -> None:
    sets = loaded()
    assert sets.update(changes, RULESET, ENFORCE) is None


def test_hosts_given_twice_in_two_spellings_refuse_host_changes() -> None:
    twice = pb.Ruleset(sets=[pb.AddressSet(name="web", hosts=["2001:db8::1", "2001:DB8::1"])])
    remove = [change("web", remove_hosts=["2001:db8::1"])]  # the other spelling stays
    assert loaded(twice).update(remove, apply_set_changes(twice, remove), ENFORCE) is None


def test_a_set_that_would_overflow_is_refused() -> None:
    sets = loaded()
    sets.groups["web"].ipsets[4].maxelem = 3  # holds 2: room for one more
    one, two = ["198.18.0.5"], ["198.18.0.5", "198.18.0.6"]
    assert sets.update([change("web", add_hosts=two)], RULESET, ENFORCE) is None
    assert sets.update([change("web", add_hosts=one)], RULESET, ENFORCE) is not None


def test_what_is_not_an_address_is_named() -> None:
    sets = loaded()
    bad_host = [change("web", add_hosts=["198.18.0.5", "nonsense"])]
    with pytest.raises(RulesetError, match=r"delta\.sets\[0\]\.add_hosts\[1\]: 'nonsense'"):
        sets.update(bad_host, RULESET, ENFORCE)
    bad_network = [change("office", add_networks=["198.18.9.1/24"])]
    with pytest.raises(RulesetError, match=r"delta\.sets\[0\]\.add_networks\[0\]: '198\.18\."):
        sets.update(bad_network, RULESET, ENFORCE)


# -- the backend -----------------------------------------------------------------------


class FailingElements(FakeRunner):
    """Fails the next element update's `ipset restore` as a kernel would (a set full)."""

    def __init__(self) -> None:
        super().__init__({4: EMPTY, 6: EMPTY})
        self.fail_elements = False

    def run(self, argv: Sequence[str], stdin: str | None = None) -> str:
        if self.fail_elements and list(argv) == ["ipset", "restore"] and "-exist" in (stdin or ""):
            self.fail_elements = False
            self.calls.append((list(argv), stdin))
            raise DataplaneError("ipset: Error in line 2: Hash is full, cannot add more elements")
        return super().run(argv, stdin)


@pytest.fixture
def runner() -> FailingElements:
    return FailingElements()


@pytest.fixture
def applied(runner: FailingElements, names_files: dict[Family, Path]) -> IptablesBackend:
    backend = IptablesBackend(runner, table_names=names_files)
    backend.apply(RULESET, ENFORCE)
    runner.calls.clear()
    return backend


WEB_MOVES = [change("web", add_hosts=["198.18.0.5"], remove_hosts=["198.18.0.1"])]
MOVED = apply_set_changes(RULESET, WEB_MOVES)


def test_a_delta_is_one_ipset_restore_and_nothing_else(
    applied: IptablesBackend, runner: FailingElements
) -> None:
    assert applied.update_elements(WEB_MOVES, MOVED, ENFORCE)
    assert runner.calls == [
        (
            ["ipset", "restore"],
            "del -exist bh4-web 198.18.0.1/32\nadd -exist bh4-web 198.18.0.5/32\n",
        )
    ]


def test_an_empty_delta_runs_nothing(applied: IptablesBackend, runner: FailingElements) -> None:
    assert applied.update_elements([], RULESET, ENFORCE)
    assert runner.calls == []


def test_a_refused_delta_runs_nothing(applied: IptablesBackend, runner: FailingElements) -> None:
    assert not applied.update_elements(WEB_MOVES, MOVED, VISIBILITY)
    assert runner.calls == []


def test_nothing_is_remembered_before_an_apply_after_a_failed_one_or_after_remove(
    runner: FailingElements, names_files: dict[Family, Path]
) -> None:
    backend = IptablesBackend(runner, table_names=names_files)
    assert not backend.update_elements(WEB_MOVES, MOVED, ENFORCE)
    backend.apply(RULESET, ENFORCE)
    runner.fail_on = "iptables-legacy-restore"
    with pytest.raises(DataplaneError):
        backend.apply(RULESET, ENFORCE)
    assert not backend.update_elements(WEB_MOVES, MOVED, ENFORCE)
    runner.fail_on = None
    backend.apply(RULESET, ENFORCE)
    backend.remove()
    assert not backend.update_elements(WEB_MOVES, MOVED, ENFORCE)


def test_a_failing_update_applies_the_result_whole(
    applied: IptablesBackend, runner: FailingElements
) -> None:
    runner.fail_elements = True
    assert applied.update_elements(WEB_MOVES, MOVED, ENFORCE)
    commands = runner.commands()
    assert commands[0] == "ipset restore"  # the element update, failed half-way
    assert commands[1:3] == ["ipset list -n", "ipset restore"]  # every set refilled
    assert "iptables-legacy-restore -w 10 --noflush" in commands
    refill = runner.calls[2][1] or ""  # the temporaries, filled before any swap
    assert "add bh4-web-new 198.18.0.5/32" in refill
    assert "198.18.0.1/32" not in refill
    # What the full apply loaded is what the next delta builds on.
    runner.calls.clear()
    back = [change("web", add_hosts=["198.18.0.1"])]
    assert applied.update_elements(back, apply_set_changes(MOVED, back), ENFORCE)
    assert runner.calls == [(["ipset", "restore"], "add -exist bh4-web 198.18.0.1/32\n")]


def test_a_failing_fallback_raises(applied: IptablesBackend, runner: FailingElements) -> None:
    runner.fail_elements = True
    runner.fail_on = "iptables-legacy-restore"
    with pytest.raises(DataplaneError, match="iptables-legacy-restore"):
        applied.update_elements(WEB_MOVES, MOVED, ENFORCE)
    runner.fail_on = None
    assert not applied.update_elements(WEB_MOVES, MOVED, ENFORCE), "nothing trusted any more"
