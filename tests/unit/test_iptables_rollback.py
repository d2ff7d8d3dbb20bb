"""A failed iptables apply leaves the previous policy whole: tables of both families and
sets, never new IPv4 rules and new sets beside old IPv6 rules.

The fake kernel below holds both families' tables and the ipsets and carries out the
scripts the backend writes, line by line, committing each table section at its COMMIT as
libiptc does. It refuses what it is told to refuse: at --test and commit (a rule the
parser rejects), at commit only (a rule the kernel's own check rejects), or one set's swap.
"""

from __future__ import annotations

import copy
import itertools
import shlex
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from agent.dataplane.backend import DataplaneError
from agent.dataplane.baseline import Baseline, Mode, parse_port_spec
from agent.dataplane.iptables import IptablesBackend
from agent.dataplane.iptables.plan import TABLES, Family, Table
from agent.dataplane.iptables.tables import parse_table, revert_script
from bulkhead.v1 import ruleset_pb2 as pb

BASELINE = Baseline(Mode.ENFORCE, failsafe_inbound=(parse_port_spec("tcp/22"),))
BUILTINS = ("INPUT", "FORWARD", "OUTPUT")
TARGETS = frozenset({"ACCEPT", "DROP", "RETURN", "REJECT", "NFLOG"})
V4_COMMIT = "iptables-legacy-restore -w 10 --noflush"
V6_COMMIT = "ip6tables-legacy-restore -w 10 --noflush"


def ingress(peer_set: str, port: int, rule_id: str) -> pb.Rule:
    return pb.Rule(
        direction=pb.DIRECTION_INGRESS,
        protocol=pb.PROTOCOL_TCP,
        ports=[pb.PortRange(first=port, last=port)],
        peer_set=peer_set,
        action=pb.ACTION_ALLOW,
        policy=f"{peer_set}-in",
        id=rule_id,
    )


OLD = pb.Ruleset(
    sets=[
        pb.AddressSet(name="db", hosts=["198.18.0.2", "2001:db8::2"]),
        pb.AddressSet(name="web", hosts=["198.18.0.1", "2001:db8::1"]),
    ],
    rules=[ingress("web", 5432, "r1"), ingress("db", 6000, "r2")],
)
# web moves, db goes, api comes: sets swapped, created and left stale, and rules changed.
NEW = pb.Ruleset(
    sets=[
        pb.AddressSet(name="api", hosts=["198.18.0.9", "2001:db8::9"]),
        pb.AddressSet(name="web", hosts=["198.18.0.3", "2001:db8::3"]),
    ],
    rules=[ingress("web", 5432, "r1"), ingress("api", 8080, "r3")],
)


@dataclass
class Chains:
    """One table: its chains in order, each with its rules (the words after `-A CHAIN`)."""

    chains: dict[str, list[str]] = field(default_factory=lambda: {c: [] for c in BUILTINS})

    def save(self, table: str) -> str:
        lines = [f"*{table}"]
        for chain in self.chains:
            policy = "ACCEPT [0:0]" if chain in BUILTINS else "- [0:0]"
            lines.append(f":{chain} {policy}")
        for chain, rules in self.chains.items():
            lines += [f"-A {chain} {rule}" for rule in rules]
        return "\n".join([*lines, "COMMIT"]) + "\n"


@dataclass
class Ipset:
    serial: int  # stands for the kernel's set object (and its random initval)
    family: str
    members: list[str] = field(default_factory=list)


class FakeKernel:
    """Both families' filter and security tables and the ipsets, changed by our scripts."""

    def __init__(self) -> None:
        self.tables: dict[Family, dict[str, Chains]] = {
            family: {table: Chains() for table in TABLES} for family in (4, 6)
        }
        self.sets: dict[str, Ipset] = {}
        self.serials = itertools.count()
        self.commands: list[str] = []
        self.unparsable: set[tuple[Family, str]] = set()  # (family, word): refused at --test
        self.refused: set[tuple[Family, Table, str]] = set()  # refused at COMMIT only
        self.unswappable: str | None = None  # this set's swap fails
        self.swaps_time_out = False  # the swap script fails without naming a line

    def state(self) -> tuple[object, ...]:
        """Everything a rollback must put back, set objects included."""
        sets = {name: (s.serial, s.family, sorted(s.members)) for name, s in self.sets.items()}
        saved = {f: {t: c.save(t) for t, c in tables.items()} for f, tables in self.tables.items()}
        return (saved, sets)

    def run(self, argv: Sequence[str], stdin: str | None = None) -> str:
        command = " ".join(argv)
        self.commands.append(command)
        if command == "ipset list -n":
            return "".join(name + "\n" for name in self.sets)
        if command == "ipset restore":
            self._ipset_restore(stdin or "")
            return ""
        family: Family = 6 if argv[0].startswith("ip6") else 4
        if argv[0].endswith("-save"):
            table = argv[argv.index("-t") + 1]
            return self.tables[family][table].save(table)
        if argv[0].endswith("-restore"):
            self._restore(family, stdin or "", test="--test" in argv, tool=argv[0])
            return ""
        raise AssertionError(f"unexpected command {command}")

    def _ipset_restore(self, script: str) -> None:
        if self.swaps_time_out and script.startswith("swap "):
            raise DataplaneError("ipset: timed out after 120.0 seconds")
        for number, line in enumerate(script.splitlines(), start=1):
            words = line.split()
            problem = self._ipset_line(words)
            if problem:
                raise DataplaneError(f"ipset: ipset v7.17: Error in line {number}: {problem}")

    def _ipset_line(self, words: list[str]) -> str | None:
        verb, name = words[0], words[1]
        if verb == "create":
            if name in self.sets:
                return "Set cannot be created: set with the same name already exists"
            family = words[words.index("family") + 1]
            self.sets[name] = Ipset(next(self.serials), family)
        elif verb == "add":
            self.sets[name].members.append(words[2])
        elif verb == "destroy":
            if name not in self.sets:
                return "The set with the given name does not exist"
            if self._used(name):
                return "Set cannot be destroyed: it is in use by a kernel component"
            del self.sets[name]
        elif verb == "swap":
            other = words[2]
            if self.unswappable in (name, other):
                return "The sets cannot be swapped: their type does not match"
            self.sets[name], self.sets[other] = self.sets[other], self.sets[name]
        return None

    def _used(self, name: str) -> bool:
        every_rule = (
            rule
            for tables in self.tables.values()
            for chains in tables.values()
            for rules in chains.chains.values()
            for rule in rules
        )
        return any(f"--match-set {name} " in rule for rule in every_rule)

    def _restore(self, family: Family, script: str, *, test: bool, tool: str) -> None:
        table, working = "", Chains()
        for number, line in enumerate(script.splitlines(), start=1):
            failed = DataplaneError(f"{tool}: line {number} failed")
            if line.startswith("*"):
                table = line[1:]
                working = copy.deepcopy(self.tables[family][table])
            elif line == "COMMIT":
                refused = any(
                    (family, table) == (f, t) and word in script for f, t, word in self.refused
                )
                if refused and not test:
                    raise failed
                if not test:
                    self.tables[family][table] = working
            elif not self._apply_line(family, working, line):
                raise failed

    def _apply_line(self, family: Family, chains: Chains, line: str) -> bool:
        """Carry out one line on CHAINS; False where iptables-restore would fail."""
        words = shlex.split(line)
        if any((family, word) in self.unparsable for word in words):
            return False
        if line.startswith(":"):
            chains.chains[line[1:].split(maxsplit=1)[0]] = []
            return True
        verb, chain, rest = words[0], words[1], line.split(" ", 2)[2:]
        if chain not in chains.chains:
            return False
        rules = chains.chains[chain]
        if verb in ("-A", "-I", "-D"):
            spec = rest[0]
            if verb == "-I":
                position, spec = spec.split(" ", 1)
            if not self._valid(family, chains, shlex.split(spec)):
                return False
            if verb == "-A":
                rules.append(spec)
            elif verb == "-I":
                if not 0 < int(position) <= len(rules) + 1:
                    return False
                rules.insert(int(position) - 1, spec)
            elif spec in rules:
                rules.remove(spec)
            else:
                return False
        elif verb == "-F":
            rules.clear()
        elif verb == "-X":
            referenced = any(
                spec.split()[-2:] == ["-j", chain]
                for specs in chains.chains.values()
                for spec in specs
            )
            if rules or referenced:
                return False
            del chains.chains[chain]
        return True

    def _valid(self, family: Family, chains: Chains, words: list[str]) -> bool:
        """The target exists, and every set named exists with this family."""
        target = words[words.index("-j") + 1]
        if target not in TARGETS and target not in chains.chains:
            return False
        wanted = "inet" if family == 4 else "inet6"
        for at, word in enumerate(words):
            if word == "--match-set":
                found = self.sets.get(words[at + 1])
                if found is None or found.family != wanted:
                    return False
        return True


@pytest.fixture
def kernel() -> FakeKernel:
    return FakeKernel()


@pytest.fixture
def backend(kernel: FakeKernel, names_files: dict[Family, Path]) -> IptablesBackend:
    """A backend that has applied OLD."""
    backend = IptablesBackend(kernel, table_names=names_files, ipv6=True)
    backend.apply(OLD, BASELINE)
    kernel.commands.clear()
    return backend


def test_the_fake_kernel_carries_out_an_apply_as_planned(
    backend: IptablesBackend, kernel: FakeKernel
) -> None:
    backend.apply(NEW, BASELINE)
    assert sorted(kernel.sets) == ["bh4-api", "bh4-web", "bh6-api", "bh6-web"]
    assert kernel.sets["bh6-web"].members == ["2001:db8::3/128"]
    assert "--match-set bh6-api src" in kernel.tables[6]["security"].save("security")
    assert backend.is_present()


@pytest.mark.parametrize("table", TABLES)
def test_a_refused_ipv6_commit_puts_ipv4_rules_and_every_set_back(
    backend: IptablesBackend, kernel: FakeKernel, table: Table
) -> None:
    before = kernel.state()
    kernel.refused.add((6, table, "bh6-api"))  # passes --test; the kernel refuses it
    with pytest.raises(DataplaneError) as caught:
        backend.apply(NEW, BASELINE)
    assert str(caught.value).startswith("ip6tables-legacy-restore: line ")
    assert str(caught.value).endswith("; the previous rules and sets are back")
    # It got that far: both families tested, sets swapped, IPv4 committed.
    assert kernel.commands.index(V4_COMMIT) < kernel.commands.index(V6_COMMIT)
    assert kernel.state() == before


@pytest.mark.parametrize("family", [4, 6])
def test_a_script_failing_its_test_changes_nothing_and_commits_nothing(
    backend: IptablesBackend, kernel: FakeKernel, family: Family
) -> None:
    before = kernel.state()
    kernel.unparsable.add((family, f"bh{family}-api"))
    with pytest.raises(DataplaneError, match=r"line \d+ failed$"):
        backend.apply(NEW, BASELINE)
    assert V4_COMMIT not in kernel.commands
    assert V6_COMMIT not in kernel.commands
    assert kernel.state() == before  # the temporaries and the new sets are gone again


def test_a_swap_failing_half_way_swaps_back_the_sets_before_it(
    backend: IptablesBackend, kernel: FakeKernel
) -> None:
    before = kernel.state()
    kernel.unswappable = "bh4-web"  # the third of four swaps: two were done
    with pytest.raises(
        DataplaneError, match=r"cannot be swapped.*\(in `swap bh4-web-new bh4-web`\)"
    ):
        backend.apply(NEW, BASELINE)
    assert V4_COMMIT not in kernel.commands
    assert kernel.state() == before


def test_a_swap_failing_at_no_known_line_commits_nothing_and_says_so(
    backend: IptablesBackend, kernel: FakeKernel
) -> None:
    tables_before = kernel.state()[0]
    kernel.swaps_time_out = True
    with pytest.raises(DataplaneError, match=r"timed out .*; the sets may be partly swapped$"):
        backend.apply(NEW, BASELINE)
    assert V4_COMMIT not in kernel.commands
    assert kernel.state()[0] == tables_before


def test_the_first_apply_refused_on_ipv6_leaves_no_chain_and_no_set(
    kernel: FakeKernel, names_files: dict[Family, Path]
) -> None:
    before = kernel.state()
    kernel.refused.add((6, "filter", "bh6-api"))
    with pytest.raises(DataplaneError, match="previous rules and sets are back"):
        IptablesBackend(kernel, table_names=names_files, ipv6=True).apply(NEW, BASELINE)
    assert kernel.state() == before


def test_jumps_pushed_down_and_stale_chains_go_back_where_they_were(
    kernel: FakeKernel, names_files: dict[Family, Path]
) -> None:
    # An older agent's chain with a jump from FORWARD, and our jump below a host's rule.
    filter_ = kernel.tables[4]["filter"].chains
    filter_["INPUT"] += ["-p udp -m udp --dport 9 -j RETURN", "-j BULKHEAD-INPUT"]
    filter_["FORWARD"] += ["-i veth0 -j DROP", "-i veth1 -j BULKHEAD-POLICY-IN", "-j ACCEPT"]
    filter_["BULKHEAD-INPUT"] = ["-i lo -j RETURN", "-j BULKHEAD-POLICY-IN"]
    filter_["BULKHEAD-POLICY-IN"] = ["-p tcp -m tcp --dport 80 -j RETURN"]
    before = kernel.state()
    kernel.refused.add((6, "security", "bh6-api"))
    with pytest.raises(DataplaneError, match="previous rules and sets are back"):
        IptablesBackend(kernel, table_names=names_files, ipv6=True).apply(NEW, BASELINE)
    assert kernel.state() == before


def test_revert_script_leaves_a_table_that_did_not_change_alone() -> None:
    table = parse_table(FakeKernel().tables[4]["filter"].save("filter"))
    assert revert_script({"filter": table}, {"filter": table}) is None


def test_when_the_tables_cannot_be_put_back_the_sets_stay_new_and_the_error_says_so(
    backend: IptablesBackend, kernel: FakeKernel
) -> None:
    kernel.refused.add((6, "filter", "bh6-api"))
    kernel.refused.add((4, "filter", "--match-set bh4-db "))  # only the revert names db
    with pytest.raises(DataplaneError) as caught:
        backend.apply(NEW, BASELINE)
    assert "putting the previous rules back failed too" in str(caught.value)
    # New rules under new sets on IPv4, old rules on IPv6: both states an apply goes through.
    assert kernel.sets["bh4-web"].members == ["198.18.0.3/32"]
    assert "bh4-api" in kernel.sets
