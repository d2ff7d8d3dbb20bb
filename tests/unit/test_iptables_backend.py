"""The iptables backend's command sequence and scripts, against a recording fake runner."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

import pytest

from agent.dataplane.backend import DataplaneError, RulesetError
from agent.dataplane.baseline import Baseline, Mode, parse_port_spec
from agent.dataplane.iptables import IptablesBackend, SubprocessRunner, render_iptables
from agent.dataplane.iptables.ipsets import swap_script
from agent.dataplane.iptables.plan import Family, IpSet
from agent.dataplane.iptables.tables import apply_script, parse_filter, removal_script
from bulkhead.v1 import ruleset_pb2 as pb

BASELINE = Baseline(Mode.ENFORCE, failsafe_inbound=(parse_port_spec("tcp/22"),))
RULESET = pb.Ruleset(
    sets=[pb.AddressSet(name="web", hosts=["198.18.0.1", "2001:db8::1"])],
    rules=[
        pb.Rule(
            direction=pb.DIRECTION_INGRESS,
            protocol=pb.PROTOCOL_TCP,
            ports=[pb.PortRange(first=5432, last=5432)],
            peer_set="web",
            action=pb.ACTION_ALLOW,
            policy="web-to-db",
            id="r1",
        )
    ],
)
EMPTY_FILTER = """*filter
:INPUT ACCEPT [0:0]
:FORWARD ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
COMMIT
"""
HOOKED_FILTER = """*filter
:INPUT ACCEPT [0:0]
:FORWARD ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:BULKHEAD-INPUT - [0:0]
:BULKHEAD-OUTPUT - [0:0]
:DOCKER - [0:0]
-A INPUT -j BULKHEAD-INPUT
-A INPUT -p tcp -m tcp --dport 9999 -j DROP
-A OUTPUT -j BULKHEAD-OUTPUT
-A BULKHEAD-INPUT -i lo -j ACCEPT
-A DOCKER -m comment --comment "not -j BULKHEAD-INPUT" -j ACCEPT
COMMIT
"""


class FakeRunner:
    """Answers list/save commands from canned text and records every command run."""

    def __init__(self, saved: dict[Family, str], ipsets: Sequence[str] = ()) -> None:
        self.saved = saved
        self.ipsets = list(ipsets)
        self.calls: list[tuple[list[str], str | None]] = []
        self.fail_on: str | None = None  # the command (first words) that fails, with fail_message
        self.fail_message = "line 3 failed"

    def run(self, argv: Sequence[str], stdin: str | None = None) -> str:
        self.calls.append((list(argv), stdin))
        if self.fail_on is not None and " ".join(argv).startswith(self.fail_on):
            raise DataplaneError(f"{argv[0]}: {self.fail_message}")
        if list(argv) == ["ipset", "list", "-n"]:
            return "".join(name + "\n" for name in self.ipsets)
        if list(argv) == ["ipset", "restore"]:
            self._track_sets(stdin or "")
        if argv[0] == "iptables-legacy-save":
            return self.saved[4]
        if argv[0] == "ip6tables-legacy-save":
            return self.saved[6]
        return ""

    def _track_sets(self, script: str) -> None:
        for verb, name, *_ in (line.split() for line in script.splitlines()):
            if verb == "create":
                self.ipsets.append(name)
            elif verb == "destroy":
                self.ipsets.remove(name)

    def commands(self) -> list[str]:
        return [" ".join(argv) for argv, _ in self.calls]

    def script(self, command: str) -> str:
        """The one script given to COMMAND (its first words)."""
        words = command.split()
        (stdin,) = [stdin for argv, stdin in self.calls if argv[: len(words)] == words]
        assert stdin is not None
        return stdin


@pytest.fixture
def names_files(tmp_path: Path) -> dict[Family, Path]:
    files: dict[Family, Path] = {4: tmp_path / "ip_tables_names", 6: tmp_path / "ip6_tables_names"}
    for path in files.values():
        path.write_text("filter\n")
    return files


def backend(runner: FakeRunner, names_files: dict[Family, Path]) -> IptablesBackend:
    return IptablesBackend(runner, table_names=names_files)


def test_apply_fills_sets_then_commits_each_family_then_cleans_up(
    names_files: dict[Family, Path],
) -> None:
    runner = FakeRunner({4: EMPTY_FILTER, 6: EMPTY_FILTER})
    backend(runner, names_files).apply(RULESET, BASELINE)
    assert runner.commands() == [
        "ipset list -n",
        "ipset restore",
        "iptables-legacy-save -t filter",
        "iptables-legacy-restore -w 10 --noflush",
        "ip6tables-legacy-save -t filter",
        "ip6tables-legacy-restore -w 10 --noflush",
        "ipset list -n",  # nothing stale: no destroy script
    ]
    plan = render_iptables(RULESET, BASELINE)
    v4 = runner.script("iptables-legacy-restore").splitlines()
    assert v4[:3] == ["*filter", ":BULKHEAD-INPUT - [0:0]", ":BULKHEAD-OUTPUT - [0:0]"]
    assert v4[3 : 3 + len(plan.v4.rules)] == list(plan.v4.rules)
    assert v4[3 + len(plan.v4.rules) :] == [
        "-I INPUT 1 -j BULKHEAD-INPUT",
        "-I OUTPUT 1 -j BULKHEAD-OUTPUT",
        "COMMIT",
    ]
    assert "--match-set bh6-web src" in runner.script("ip6tables-legacy-restore")
    assert "flush" not in runner.script("ipset restore")


def test_swap_script_fills_every_set_before_the_first_swap() -> None:
    sets = [IpSet("bh4-a", 4, ("198.18.0.1/32",)), IpSet("bh6-a", 6, ())]
    script = swap_script(sets, existing={"bh4-a", "bh6-a-new", "other"}).splitlines()
    assert script == [
        "create bh4-a-new hash:net family inet hashsize 1024 maxelem 65536",
        "add bh4-a-new 198.18.0.1/32",
        "destroy bh6-a-new",  # left over by an interrupted apply
        "create bh6-a-new hash:net family inet6 hashsize 1024 maxelem 65536",
        "swap bh4-a-new bh4-a",
        "create bh6-a hash:net family inet6 hashsize 1024 maxelem 65536",
        "swap bh6-a-new bh6-a",
        "destroy bh4-a-new",
        "destroy bh6-a-new",
    ]


def test_big_sets_get_room_for_all_members() -> None:
    members = tuple(f"198.18.{i // 256}.{i % 256}/32" for i in range(70_000))
    first = swap_script([IpSet("bh4-big", 4, members)], existing=set()).splitlines()[0]
    assert first == "create bh4-big-new hash:net family inet hashsize 131072 maxelem 70000"


def test_jump_already_first_is_kept_with_its_counters(names_files: dict[Family, Path]) -> None:
    runner = FakeRunner({4: HOOKED_FILTER, 6: HOOKED_FILTER})
    backend(runner, names_files).apply(RULESET, BASELINE)
    script = runner.script("iptables-legacy-restore")
    assert "-I INPUT" not in script
    assert "-D " not in script
    assert "DOCKER" not in script
    assert "9999" not in script


def test_jump_elsewhere_or_repeated_is_moved_to_the_top_once() -> None:
    saved = parse_filter(
        HOOKED_FILTER.replace(
            "-A INPUT -j BULKHEAD-INPUT\n-A INPUT -p tcp -m tcp --dport 9999 -j DROP\n",
            "-A INPUT -p tcp -m tcp --dport 9999 -j DROP\n-A INPUT -j BULKHEAD-INPUT\n"
            "-A INPUT -j BULKHEAD-INPUT\n",
        )
    )
    assert not saved.is_hooked()
    plan = render_iptables(RULESET, BASELINE)
    tail = apply_script(plan.v4, saved).splitlines()[-4:]
    assert tail == [
        "-D INPUT -j BULKHEAD-INPUT",
        "-D INPUT -j BULKHEAD-INPUT",
        "-I INPUT 1 -j BULKHEAD-INPUT",
        "COMMIT",
    ]


def test_stale_chains_of_ours_are_unhooked_and_deleted() -> None:
    saved = parse_filter(
        HOOKED_FILTER.replace(
            ":DOCKER - [0:0]\n", ":BULKHEAD-POLICY-IN - [0:0]\n:DOCKER - [0:0]\n"
        ).replace(
            "-A OUTPUT -j BULKHEAD-OUTPUT\n",
            "-A OUTPUT -j BULKHEAD-OUTPUT\n-A FORWARD -i veth0 -j BULKHEAD-POLICY-IN\n"
            "-A BULKHEAD-INPUT -j BULKHEAD-POLICY-IN\n",
        )
    )
    plan = render_iptables(RULESET, BASELINE)
    tail = apply_script(plan.v4, saved).splitlines()[-4:]
    assert tail == [
        "-D FORWARD -i veth0 -j BULKHEAD-POLICY-IN",
        "-F BULKHEAD-POLICY-IN",
        "-X BULKHEAD-POLICY-IN",
        "COMMIT",
    ]


def test_apply_destroys_only_our_sets_that_are_no_longer_used(
    names_files: dict[Family, Path],
) -> None:
    runner = FakeRunner(
        {4: EMPTY_FILTER, 6: EMPTY_FILTER},
        ipsets=["bh4-web", "bh4-gone", "bh6-gone", "docker-set", "bh4-web-new"],
    )
    backend(runner, names_files).apply(RULESET, BASELINE)
    destroy = runner.calls[-1][1]
    assert destroy == "destroy bh4-gone\ndestroy bh6-gone\n"


def test_an_invalid_ruleset_runs_no_command(names_files: dict[Family, Path]) -> None:
    runner = FakeRunner({4: EMPTY_FILTER, 6: EMPTY_FILTER})
    bad = pb.Ruleset(sets=[pb.AddressSet(name="Bad")])
    with pytest.raises(RulesetError, match=r"sets\[0\]\.name"):
        backend(runner, names_files).apply(bad, BASELINE)
    assert runner.calls == []


@pytest.mark.parametrize(
    ("tool", "last_command"),
    [
        ("ipset", "ipset list -n"),
        ("iptables-legacy-restore", "iptables-legacy-restore -w 10 --noflush"),
        ("ip6tables-legacy-restore", "ip6tables-legacy-restore -w 10 --noflush"),
    ],
)
def test_a_failing_tool_stops_the_apply_with_its_message(
    names_files: dict[Family, Path], tool: str, last_command: str
) -> None:
    runner = FakeRunner({4: EMPTY_FILTER, 6: EMPTY_FILTER})
    runner.fail_on = tool
    with pytest.raises(DataplaneError, match=f"{tool}: line 3 failed"):
        backend(runner, names_files).apply(RULESET, BASELINE)
    assert runner.commands()[-1] == last_command


def test_remove_deletes_every_jump_into_our_chains_then_the_chains_and_our_sets(
    names_files: dict[Family, Path],
) -> None:
    saved = HOOKED_FILTER.replace(
        "-A OUTPUT -j BULKHEAD-OUTPUT\n",
        '-A OUTPUT -j BULKHEAD-OUTPUT\n-A FORWARD -m comment --comment "x y" -j BULKHEAD-INPUT\n',
    )
    runner = FakeRunner({4: saved, 6: EMPTY_FILTER}, ipsets=["bh4-web", "bh6-web", "mine"])
    backend(runner, names_files).remove()
    assert runner.script("iptables-legacy-restore").splitlines() == [
        "*filter",
        "-D INPUT -j BULKHEAD-INPUT",
        "-D OUTPUT -j BULKHEAD-OUTPUT",
        '-D FORWARD -m comment --comment "x y" -j BULKHEAD-INPUT',
        "-F BULKHEAD-INPUT",
        "-F BULKHEAD-OUTPUT",
        "-X BULKHEAD-INPUT",
        "-X BULKHEAD-OUTPUT",
        "COMMIT",
    ]
    assert "ip6tables-legacy-restore -w 10 --noflush" not in runner.commands()  # nothing ours
    assert runner.calls[-1][1] == "destroy bh4-web\ndestroy bh6-web\n"


def test_remove_never_reads_a_table_that_does_not_exist(
    names_files: dict[Family, Path],
) -> None:
    names_files[4].write_text("nat\n")
    names_files[6].unlink()
    runner = FakeRunner({4: HOOKED_FILTER, 6: HOOKED_FILTER})
    backend(runner, names_files).remove()
    backend(runner, names_files).is_present()
    assert runner.commands() == ["ipset list -n"]
    assert removal_script(parse_filter(EMPTY_FILTER)) is None


@pytest.mark.parametrize(
    ("v4", "v6", "present"),
    [
        (HOOKED_FILTER, HOOKED_FILTER, True),
        (HOOKED_FILTER, EMPTY_FILTER, False),
        (HOOKED_FILTER.replace("-A OUTPUT -j BULKHEAD-OUTPUT\n", ""), HOOKED_FILTER, False),
        (
            HOOKED_FILTER.replace(
                "-A INPUT -j BULKHEAD-INPUT\n", "-A INPUT -j ACCEPT\n-A INPUT -j BULKHEAD-INPUT\n"
            ),
            HOOKED_FILTER,
            False,
        ),
    ],
)
def test_is_present_means_both_families_hooked(
    names_files: dict[Family, Path], v4: str, v6: str, present: bool
) -> None:
    assert backend(FakeRunner({4: v4, 6: v6}), names_files).is_present() is present


def test_parse_filter_reads_chains_and_jump_targets_through_quoted_comments() -> None:
    state = parse_filter(HOOKED_FILTER)
    assert state.chains == (
        "INPUT",
        "FORWARD",
        "OUTPUT",
        "BULKHEAD-INPUT",
        "BULKHEAD-OUTPUT",
        "DOCKER",
    )
    assert state.our_chains() == ["BULKHEAD-INPUT", "BULKHEAD-OUTPUT"]
    assert state.jumps_into({"BULKHEAD-INPUT", "BULKHEAD-OUTPUT"}) == [
        "-A INPUT -j BULKHEAD-INPUT",
        "-A OUTPUT -j BULKHEAD-OUTPUT",
    ]


def test_an_ipset_error_quotes_the_script_line_it_names(
    names_files: dict[Family, Path],
) -> None:
    runner = FakeRunner({4: EMPTY_FILTER, 6: EMPTY_FILTER})
    runner.fail_on = "ipset restore"
    runner.fail_message = "ipset v7.17: Error in line 2: Hash is full"
    with pytest.raises(DataplaneError) as caught:
        backend(runner, names_files).apply(RULESET, BASELINE)
    assert str(caught.value) == (
        "ipset: ipset v7.17: Error in line 2: Hash is full (in `add bh4-web-new 198.18.0.1/32`)"
    )


def test_subprocess_runner_reports_the_tool_and_its_message() -> None:
    runner = SubprocessRunner(timeout=30)
    assert runner.run([sys.executable, "-c", "print('out')"]) == "out\n"
    failing = [sys.executable, "-c", "import sys; sys.exit('line 2: no such set')"]
    with pytest.raises(DataplaneError, match="no such set"):
        runner.run(failing)
    with pytest.raises(DataplaneError, match="not installed"):
        runner.run(["bulkhead-no-such-tool"])
