"""The iptables backend's command sequence and scripts, against a recording fake runner."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

import pytest

from agent.dataplane.backend import DataplaneError, RulesetError
from agent.dataplane.baseline import Baseline, Mode, parse_port_spec
from agent.dataplane.fingerprint import differences
from agent.dataplane.iptables import IptablesBackend, SubprocessRunner, render_iptables
from agent.dataplane.iptables.backend import table_components
from agent.dataplane.iptables.ipsets import fill_script, swap_script
from agent.dataplane.iptables.plan import Family, IpSet, Table
from agent.dataplane.iptables.tables import TableState, apply_script, parse_table, removal_script
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
EMPTY_SECURITY = """*security
:INPUT ACCEPT [0:0]
:FORWARD ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
COMMIT
"""
HOOKED_SECURITY = """*security
:INPUT ACCEPT [0:0]
:FORWARD ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:BULKHEAD-INPUT - [0:0]
:BULKHEAD-OUTPUT - [0:0]
-A FORWARD -i eth0 -j DROP
-A INPUT -j BULKHEAD-INPUT
-A OUTPUT -j BULKHEAD-OUTPUT
-A BULKHEAD-INPUT -i lo -j RETURN
COMMIT
"""
# What iptables-legacy-save prints without -t: every loaded table, filter first.
EMPTY = EMPTY_FILTER + EMPTY_SECURITY
HOOKED = HOOKED_FILTER + HOOKED_SECURITY
V4_COMMIT = "iptables-legacy-restore -w 10 --noflush"
V6_COMMIT = "ip6tables-legacy-restore -w 10 --noflush"
V4_TEST = V4_COMMIT + " --test"
V6_TEST = V6_COMMIT + " --test"


def table_section(saved: str, table: str) -> str:
    """What `iptables-save -t TABLE` prints of SAVED (which holds every table)."""
    lines = saved.splitlines(keepends=True)
    start = lines.index(f"*{table}\n")
    return "".join(lines[start : lines.index("COMMIT\n", start) + 1])


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
        if argv[0] in ("iptables-legacy-save", "ip6tables-legacy-save"):
            family: Family = 4 if argv[0].startswith("iptables") else 6
            return table_section(self.saved[family], argv[argv.index("-t") + 1])
        return ""

    def _track_sets(self, script: str) -> None:
        for verb, name, *_ in (line.split() for line in script.splitlines()):
            if verb == "create":
                self.ipsets.append(name)
            elif verb == "destroy":
                self.ipsets.remove(name)

    def commands(self) -> list[str]:
        return [" ".join(argv) for argv, _ in self.calls]

    def scripts(self, command: str) -> list[str]:
        """The scripts given to COMMAND (the whole command line), in order."""
        return [stdin or "" for argv, stdin in self.calls if " ".join(argv) == command]

    def script(self, command: str) -> str:
        """The one script given to COMMAND (the whole command line)."""
        (stdin,) = self.scripts(command)
        return stdin


def backend(runner: FakeRunner, names_files: dict[Family, Path]) -> IptablesBackend:
    return IptablesBackend(runner, table_names=names_files, ipv6=True)


def test_a_host_without_ipv6_gets_ipv4_rules_only(names_files: dict[Family, Path]) -> None:
    # Booted with ipv6.disable=1, ip6tables cannot open its tables: every apply would fail.
    runner = FakeRunner({4: EMPTY, 6: EMPTY})
    ipv4_only = IptablesBackend(runner, table_names=names_files, ipv6=False)
    ipv4_only.apply(RULESET, BASELINE)
    ipv4_only.is_present()
    ipv4_only.state_fingerprint()
    ipv4_only.remove()
    assert not [c for c in runner.commands() if c.startswith("ip6tables")]
    assert V4_COMMIT in runner.commands()
    first_restore = next(
        stdin for argv, stdin in runner.calls if list(argv) == ["ipset", "restore"]
    )
    assert "create bh6-" in (first_restore or ""), "IPv6 sets stay, as deltas expect them"


def test_ipv6_is_detected_from_the_socket_family(monkeypatch: pytest.MonkeyPatch) -> None:
    import errno
    import socket

    from agent.dataplane.iptables.backend import ipv6_available

    assert ipv6_available()  # this machine has IPv6

    def no_ipv6(family: int, *args: object) -> socket.socket:
        if family == socket.AF_INET6:
            raise OSError(errno.EAFNOSUPPORT, "Address family not supported by protocol")
        raise AssertionError("only AF_INET6 is probed")

    monkeypatch.setattr(socket, "socket", no_ipv6)
    assert not ipv6_available()


def test_apply_fills_sets_tests_both_families_then_swaps_and_commits_each(
    names_files: dict[Family, Path],
) -> None:
    runner = FakeRunner({4: EMPTY, 6: EMPTY})
    backend(runner, names_files).apply(RULESET, BASELINE)
    assert runner.commands() == [
        "ipset list -n",
        "ipset restore",  # fill the temporaries, create the missing sets: nothing live changes
        "iptables-legacy-save -t filter",
        "iptables-legacy-save -t security",
        "ip6tables-legacy-save -t filter",
        "ip6tables-legacy-save -t security",
        V4_TEST,
        V6_TEST,  # both families pass before any set is swapped
        "ipset restore",  # the swaps
        V4_COMMIT,
        V6_COMMIT,
        "ipset list -n",
        "ipset restore",  # the temporaries, holding the old members now
    ]
    fill, swap, destroy = runner.scripts("ipset restore")
    assert "swap" not in fill
    assert "flush" not in fill
    assert swap == "swap bh4-web-new bh4-web\nswap bh6-web-new bh6-web\n"
    assert destroy == "destroy bh4-web-new\ndestroy bh6-web-new\n"
    assert runner.script(V4_TEST) == runner.script(V4_COMMIT)
    assert runner.script(V6_TEST) == runner.script(V6_COMMIT)
    plan = render_iptables(RULESET, BASELINE)
    v4 = runner.script(V4_COMMIT).splitlines()
    hooks = ["-I INPUT 1 -j BULKHEAD-INPUT", "-I OUTPUT 1 -j BULKHEAD-OUTPUT", "COMMIT"]
    chains = [":BULKHEAD-INPUT - [0:0]", ":BULKHEAD-OUTPUT - [0:0]"]
    # One input, two sections: filter, which sees packets first, is committed first.
    assert v4 == [
        "*filter", *chains, *plan.v4.filter, *hooks,
        "*security", *chains, *plan.v4.security, *hooks,
    ]  # fmt: skip
    assert "--match-set bh6-web src" in runner.script(V6_COMMIT)


def test_a_table_not_loaded_yet_is_not_read_but_created_by_the_restore(
    names_files: dict[Family, Path],
) -> None:
    names_files[4].write_text("filter\n")  # reading security would make the kernel create it
    runner = FakeRunner({4: EMPTY, 6: EMPTY})
    backend(runner, names_files).apply(RULESET, BASELINE)
    assert "iptables-legacy-save -t security" not in runner.commands()
    assert "iptables-legacy-save -t filter" in runner.commands()
    script = runner.script(V4_COMMIT).splitlines()
    assert "*security" in script
    assert script.count("-I INPUT 1 -j BULKHEAD-INPUT") == 2


def test_fill_script_fills_every_temporary_then_creates_missing_sets_and_swaps_nothing() -> None:
    sets = [IpSet("bh4-a", 4, ("198.18.0.1/32",)), IpSet("bh6-a", 6, ())]
    script = fill_script(sets, existing={"bh4-a", "bh6-a-new", "other"}).splitlines()
    assert script == [
        "create bh4-a-new hash:net family inet hashsize 1024 maxelem 65536",
        "add bh4-a-new 198.18.0.1/32",
        "destroy bh6-a-new",  # left over by an interrupted apply
        "create bh6-a-new hash:net family inet6 hashsize 1024 maxelem 65536",
        # Created empty, so that --test finds every set the rules name; no rule uses it yet.
        "create bh6-a hash:net family inet6 hashsize 1024 maxelem 65536",
    ]
    assert swap_script(sets).splitlines() == ["swap bh4-a-new bh4-a", "swap bh6-a-new bh6-a"]


def test_big_sets_get_room_for_all_members() -> None:
    members = tuple(f"198.18.{i // 256}.{i % 256}/32" for i in range(70_000))
    first = fill_script([IpSet("bh4-big", 4, members)], existing=set()).splitlines()[0]
    assert first == "create bh4-big-new hash:net family inet hashsize 131072 maxelem 70000"


def test_jump_already_first_is_kept_with_its_counters(names_files: dict[Family, Path]) -> None:
    runner = FakeRunner({4: HOOKED, 6: HOOKED})
    backend(runner, names_files).apply(RULESET, BASELINE)
    script = runner.script(V4_COMMIT)
    assert "-I INPUT" not in script
    assert "-D " not in script
    assert "DOCKER" not in script
    assert "9999" not in script
    assert "eth0" not in script


def test_a_jump_missing_from_one_table_is_put_back_in_that_table_only() -> None:
    unhooked = parse_table(HOOKED_SECURITY.replace("-A INPUT -j BULKHEAD-INPUT\n", ""))
    states: dict[Table, TableState] = {"security": unhooked, "filter": parse_table(HOOKED_FILTER)}
    script = apply_script(render_iptables(RULESET, BASELINE).v4, states)
    filter_, security = script.split("*security\n")
    assert "-I INPUT 1 -j BULKHEAD-INPUT" in security
    assert "-I " not in filter_


def test_jump_elsewhere_or_repeated_is_moved_to_the_top_once() -> None:
    saved = parse_table(
        HOOKED_FILTER.replace(
            "-A INPUT -j BULKHEAD-INPUT\n-A INPUT -p tcp -m tcp --dport 9999 -j DROP\n",
            "-A INPUT -p tcp -m tcp --dport 9999 -j DROP\n-A INPUT -j BULKHEAD-INPUT\n"
            "-A INPUT -j BULKHEAD-INPUT\n",
        )
    )
    assert not saved.is_hooked()
    plan = render_iptables(RULESET, BASELINE)
    filter_section = apply_script(plan.v4, {"filter": saved}).split("*security\n")[0]
    tail = filter_section.splitlines()[-4:]
    assert tail == [
        "-D INPUT -j BULKHEAD-INPUT",
        "-D INPUT -j BULKHEAD-INPUT",
        "-I INPUT 1 -j BULKHEAD-INPUT",
        "COMMIT",
    ]


def test_stale_chains_of_ours_are_unhooked_and_deleted() -> None:
    saved = parse_table(
        HOOKED_FILTER.replace(
            ":DOCKER - [0:0]\n", ":BULKHEAD-POLICY-IN - [0:0]\n:DOCKER - [0:0]\n"
        ).replace(
            "-A OUTPUT -j BULKHEAD-OUTPUT\n",
            "-A OUTPUT -j BULKHEAD-OUTPUT\n-A FORWARD -i veth0 -j BULKHEAD-POLICY-IN\n"
            "-A BULKHEAD-INPUT -j BULKHEAD-POLICY-IN\n",
        )
    )
    plan = render_iptables(RULESET, BASELINE)
    filter_section = apply_script(plan.v4, {"filter": saved}).split("*security\n")[0]
    tail = filter_section.splitlines()[-4:]
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
        {4: EMPTY, 6: EMPTY},
        ipsets=["bh4-web", "bh4-gone", "bh6-gone", "docker-set", "bh4-web-new"],
    )
    backend(runner, names_files).apply(RULESET, BASELINE)
    destroy = runner.calls[-1][1]
    assert destroy == (
        "destroy bh4-gone\ndestroy bh6-gone\ndestroy bh4-web-new\ndestroy bh6-web-new\n"
    )


def test_an_invalid_ruleset_runs_no_command(names_files: dict[Family, Path]) -> None:
    runner = FakeRunner({4: EMPTY, 6: EMPTY})
    bad = pb.Ruleset(sets=[pb.AddressSet(name="Bad")])
    with pytest.raises(RulesetError, match=r"sets\[0\]\.name"):
        backend(runner, names_files).apply(bad, BASELINE)
    assert runner.calls == []


@pytest.mark.parametrize(
    ("tool", "failed"),
    [
        ("ipset", "ipset list -n"),
        ("iptables-legacy-restore", V4_TEST),
        ("ip6tables-legacy-restore", V6_TEST),
    ],
)
def test_a_failing_tool_stops_the_apply_with_its_message_before_any_swap(
    names_files: dict[Family, Path], tool: str, failed: str
) -> None:
    runner = FakeRunner({4: EMPTY, 6: EMPTY})
    runner.fail_on = tool
    with pytest.raises(DataplaneError, match=f"{tool}: line 3 failed"):
        backend(runner, names_files).apply(RULESET, BASELINE)
    assert failed in runner.commands()
    assert V4_COMMIT not in runner.commands()
    assert not [script for script in runner.scripts("ipset restore") if "swap" in script]


def test_remove_deletes_every_jump_into_our_chains_then_the_chains_and_our_sets(
    names_files: dict[Family, Path],
) -> None:
    saved = HOOKED.replace(
        "-A OUTPUT -j BULKHEAD-OUTPUT\n-A BULKHEAD-INPUT -i lo -j ACCEPT\n",
        "-A OUTPUT -j BULKHEAD-OUTPUT\n"
        '-A FORWARD -m comment --comment "x y" -j BULKHEAD-INPUT\n'
        "-A BULKHEAD-INPUT -i lo -j ACCEPT\n",
    )
    runner = FakeRunner({4: saved, 6: EMPTY}, ipsets=["bh4-web", "bh6-web", "mine"])
    backend(runner, names_files).remove()
    assert runner.script(V4_COMMIT).splitlines() == [
        "*filter",
        "-D INPUT -j BULKHEAD-INPUT",
        "-D OUTPUT -j BULKHEAD-OUTPUT",
        '-D FORWARD -m comment --comment "x y" -j BULKHEAD-INPUT',
        "-F BULKHEAD-INPUT",
        "-F BULKHEAD-OUTPUT",
        "-X BULKHEAD-INPUT",
        "-X BULKHEAD-OUTPUT",
        "COMMIT",
        "*security",
        "-D INPUT -j BULKHEAD-INPUT",
        "-D OUTPUT -j BULKHEAD-OUTPUT",
        "-F BULKHEAD-INPUT",
        "-F BULKHEAD-OUTPUT",
        "-X BULKHEAD-INPUT",
        "-X BULKHEAD-OUTPUT",
        "COMMIT",
    ]
    assert V6_COMMIT not in runner.commands()  # nothing ours
    assert runner.calls[-1][1] == "destroy bh4-web\ndestroy bh6-web\n"


def test_remove_never_reads_a_table_that_does_not_exist(
    names_files: dict[Family, Path],
) -> None:
    names_files[4].write_text("nat\n")
    names_files[6].unlink()
    runner = FakeRunner({4: HOOKED, 6: HOOKED})
    backend(runner, names_files).remove()
    backend(runner, names_files).is_present()
    assert runner.commands() == ["ipset list -n"]
    assert removal_script({}) is None
    empty: dict[Table, TableState] = {
        "security": parse_table(EMPTY_SECURITY),
        "filter": parse_table(EMPTY_FILTER),
    }
    assert removal_script(empty) is None


def test_remove_takes_the_copy_left_in_one_table_only() -> None:
    states: dict[Table, TableState] = {
        "security": parse_table(HOOKED_SECURITY),
        "filter": parse_table(EMPTY_FILTER),
    }
    script = removal_script(states)
    assert script is not None
    assert script.startswith("*security\n")
    assert "*filter" not in script


@pytest.mark.parametrize(
    ("v4", "v6", "present"),
    [
        (HOOKED, HOOKED, True),
        (HOOKED, EMPTY, False),
        (HOOKED_FILTER + EMPTY_SECURITY, HOOKED, False),
        (EMPTY_FILTER + HOOKED_SECURITY, HOOKED, False),
        (HOOKED.replace("-A OUTPUT -j BULKHEAD-OUTPUT\n", "", 1), HOOKED, False),
        (
            HOOKED.replace(
                "-A INPUT -j BULKHEAD-INPUT\n", "-A INPUT -j ACCEPT\n-A INPUT -j BULKHEAD-INPUT\n"
            ),
            HOOKED,
            False,
        ),
    ],
)
def test_is_present_means_both_tables_of_both_families_hooked(
    names_files: dict[Family, Path], v4: str, v6: str, present: bool
) -> None:
    assert backend(FakeRunner({4: v4, 6: v6}), names_files).is_present() is present


def test_is_present_is_false_while_security_is_not_loaded(names_files: dict[Family, Path]) -> None:
    names_files[6].write_text("filter\n")
    assert backend(FakeRunner({4: HOOKED, 6: HOOKED}), names_files).is_present() is False


def test_the_fingerprint_covers_both_copies_and_both_jumps_and_names_the_table(
    names_files: dict[Family, Path],
) -> None:
    assert table_components(4, "security", parse_table(HOOKED_SECURITY)) == {
        "ipv4 security chain BULKHEAD-INPUT": ["-A BULKHEAD-INPUT -i lo -j RETURN"],
        "ipv4 security chain BULKHEAD-OUTPUT": [],
        "ipv4 security jump from INPUT": [[0, "-A INPUT -j BULKHEAD-INPUT"]],
        "ipv4 security jump from OUTPUT": [[0, "-A OUTPUT -j BULKHEAD-OUTPUT"]],
    }
    # Filter keeps the names it had alone: iptables' default table goes unnamed.
    assert set(table_components(6, "filter", parse_table(HOOKED_FILTER))) == {
        "ipv6 chain BULKHEAD-INPUT",
        "ipv6 chain BULKHEAD-OUTPUT",
        "ipv6 jump from INPUT",
        "ipv6 jump from OUTPUT",
    }
    applied = backend(FakeRunner({4: HOOKED, 6: HOOKED}), names_files).state_fingerprint()
    tampered = {
        HOOKED_FILTER + HOOKED_SECURITY.replace("-A BULKHEAD-INPUT -i lo -j RETURN\n", ""): (
            "ipv4 security chain BULKHEAD-INPUT: rules differ"
        ),
        HOOKED_FILTER + HOOKED_SECURITY.replace("-A OUTPUT -j BULKHEAD-OUTPUT\n", ""): (
            "ipv4 security jump from OUTPUT missing"
        ),
        HOOKED_FILTER.replace("-A BULKHEAD-INPUT -i lo -j ACCEPT\n", "") + HOOKED_SECURITY: (
            "ipv4 chain BULKHEAD-INPUT: rules differ"
        ),
    }
    for saved, found in tampered.items():
        live = backend(FakeRunner({4: saved, 6: HOOKED}), names_files).state_fingerprint()
        assert differences(applied, live) == [found]


def test_parse_table_reads_chains_and_jump_targets_through_quoted_comments() -> None:
    state = parse_table(HOOKED_FILTER)
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
    runner = FakeRunner({4: EMPTY, 6: EMPTY})
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
