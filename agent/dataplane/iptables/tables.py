"""One family's legacy filter and security tables: read with iptables-legacy-save, written
with iptables-legacy-restore.

Every write is one `iptables-legacy-restore --noflush` script holding one section per
table, each ending in its own COMMIT: libiptc swaps each table whole, in one go, with every
chain and rule that is not ours carried over unchanged (counters too). Our scripts name
only our chains, the jumps into them, and rules elsewhere that jump into them.

`--test` runs a script through the same parser and libiptc without committing: it catches
a bad rule, a set that does not exist or has the wrong family, and a rule to delete that is
not there; it cannot catch what the kernel refuses only at commit (an extension's own
check, such as REJECT's tcp-reset on a rule not limited to TCP).
"""

from __future__ import annotations

import shlex
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from agent.dataplane.iptables.commands import CommandRunner
from agent.dataplane.iptables.plan import (
    CHAIN_PREFIX,
    HOOKS,
    OUR_CHAINS,
    TABLES,
    Family,
    FamilyRules,
    Table,
    jump_rule,
)

SAVE: dict[Family, str] = {4: "iptables-legacy-save", 6: "ip6tables-legacy-save"}
RESTORE: dict[Family, str] = {4: "iptables-legacy-restore", 6: "ip6tables-legacy-restore"}
# The legacy tables loaded in the caller's network namespace.
TABLE_NAMES: dict[Family, Path] = {
    4: Path("/proc/net/ip_tables_names"),
    6: Path("/proc/net/ip6_tables_names"),
}
LOCK_WAIT_SECONDS = 10  # for the xtables lock other iptables users hold while writing


@dataclass(frozen=True)
class TableState:
    """The chains of one saved table and its rules, as (chain, save line) in order."""

    chains: tuple[str, ...] = ()
    rules: tuple[tuple[str, str], ...] = ()

    def chain_rules(self, chain: str) -> list[str]:
        return [line for owner, line in self.rules if owner == chain]

    def our_chains(self) -> list[str]:
        return [chain for chain in self.chains if chain.startswith(CHAIN_PREFIX)]

    def jumps_into(self, chains: set[str]) -> list[str]:
        """Rules in chains not ours whose target is one of `chains`."""
        return [
            line
            for owner, line in self.rules
            if not owner.startswith(CHAIN_PREFIX) and _jump_target(line) in chains
        ]

    def is_hooked(self) -> bool:
        """Our chains exist, each jumped to by the first rule of its built-in chain alone."""
        for builtin, ours in HOOKS.items():
            rules, jump = self.chain_rules(builtin), jump_rule(builtin)
            if ours not in self.chains or rules[:1] != [jump] or rules.count(jump) != 1:
                return False
        return True


def parse_table(saved: str) -> TableState:
    """A table as `iptables-save -t TABLE` prints it."""
    chains: list[str] = []
    rules: list[tuple[str, str]] = []
    for line in saved.splitlines():
        if line.startswith(":"):
            chains.append(line[1:].split()[0])
        elif line.startswith("-A "):
            rules.append((line.split()[1], line))
    return TableState(tuple(chains), tuple(rules))


parse_filter = parse_table  # the name it had when filter was the only table


def _jump_target(line: str) -> str | None:
    # A jump to a user chain takes no target options, so it ends the line.
    words = shlex.split(line)
    if len(words) >= 2 and words[-2] in ("-j", "-g"):
        return words[-1]
    return None


def _delete(line: str) -> str:
    return "-D" + line.removeprefix("-A")


def _drop_chains(state: TableState, chains: list[str]) -> list[str]:
    """Script lines removing chains: first what jumps into them, then their rules, then them."""
    lines = [_delete(line) for line in state.jumps_into(set(chains))]
    lines += [f"-F {chain}" for chain in chains]
    lines += [f"-X {chain}" for chain in chains]
    return lines


def _section(table: Table, lines: list[str]) -> list[str]:
    return [f"*{table}", *lines, "COMMIT"]


def _apply_lines(rules: tuple[str, ...], state: TableState) -> list[str]:
    # Declaring a chain creates it, or flushes it if it exists.
    lines = [*(f":{chain} - [0:0]" for chain in OUR_CHAINS), *rules]
    for builtin, ours in HOOKS.items():
        jump = jump_rule(builtin)
        present = state.chain_rules(builtin)
        if present[:1] == [jump] and present.count(jump) == 1:
            continue  # in place: keep it, and its counters
        lines += [_delete(jump)] * present.count(jump)
        lines.append(f"-I {builtin} 1 -j {ours}")
    # Chains of ours this version no longer uses (e.g. left by an older agent).
    stale = [chain for chain in state.our_chains() if chain not in OUR_CHAINS]
    return lines + _drop_chains(state, stale)


def apply_script(rules: FamilyRules, states: Mapping[Table, TableState]) -> str:
    """Per table, filter first: replace our chains' rules and make each jump the first rule
    of its built-in chain. A table missing from STATES is not loaded yet: it holds nothing."""
    lines: list[str] = []
    for table in TABLES:
        lines += _section(table, _apply_lines(rules.table(table), states.get(table, TableState())))
    return "".join(line + "\n" for line in lines)


def _insert(line: str, position: int) -> str:
    """The `-I` line that puts saved rule LINE back at POSITION (1-based) of its chain."""
    chain, _, spec = line.removeprefix("-A ").partition(" ")
    return f"-I {chain} {position} {spec}"


def _revert_lines(previous: TableState, current: TableState) -> list[str]:
    lines = [_delete(line) for line in current.jumps_into(set(current.our_chains()))]
    was_ours = previous.our_chains()
    lines += [f":{chain} - [0:0]" for chain in was_ours]  # created, or flushed
    new = [chain for chain in current.our_chains() if chain not in was_ours]
    lines += [f"-F {chain}" for chain in new] + [f"-X {chain}" for chain in new]
    lines += [line for owner, line in previous.rules if owner in was_ours]
    # The jumps went first, so the other rules of their chains are as they were before
    # the apply: inserting the old jumps in ascending order puts each at its old place.
    for owner in dict.fromkeys(owner for owner, _ in previous.rules):
        if owner in was_ours:
            continue
        for index, line in enumerate(previous.chain_rules(owner)):
            if _jump_target(line) in was_ours:
                lines.append(_insert(line, index + 1))
    return lines


def revert_script(
    previous: Mapping[Table, TableState], current: Mapping[Table, TableState]
) -> str | None:
    """Put our chains, their rules and the jumps into them back as PREVIOUS held them, in
    every table whose CURRENT state differs; None if none does. Rules not ours are left
    as they are now (a table loaded by the apply stays loaded, with nothing of ours)."""
    lines: list[str] = []
    for table in TABLES:
        before, now = previous.get(table, TableState()), current.get(table, TableState())
        if before != now:
            lines += _section(table, _revert_lines(before, now))
    return "".join(line + "\n" for line in lines) or None


def removal_script(states: Mapping[Table, TableState]) -> str | None:
    """Delete our chains and every jump into them, in every table of STATES that holds
    some; None if none does."""
    lines: list[str] = []
    for table in TABLES:
        state = states.get(table, TableState())
        ours = state.our_chains()
        if ours:
            lines += _section(table, _drop_chains(state, ours))
    return "".join(line + "\n" for line in lines) or None


class LegacyTables:
    """The legacy filter and security tables of one family, in the caller's network namespace."""

    def __init__(self, family: Family, runner: CommandRunner, names_file: Path | None = None):
        self.family = family
        self._runner = runner
        self._names_file = names_file or TABLE_NAMES[family]

    def loaded(self) -> list[Table]:
        """Those of our tables that exist; reading one that does not would create it."""
        try:
            names = self._names_file.read_text().split()
        except FileNotFoundError:  # x_tables not even loaded
            return []
        return [table for table in TABLES if table in names]

    def states(self) -> dict[Table, TableState]:
        """Each loaded table of ours as the kernel holds it (saved without counters)."""
        return {table: self.state(table) for table in self.loaded()}

    def state(self, table: Table) -> TableState:
        return parse_table(self._runner.run([SAVE[self.family], "-t", table]))

    def restore(self, script: str) -> None:
        self._runner.run(self._restore_argv(), stdin=script)

    def test(self, script: str) -> None:
        """Run SCRIPT through iptables-legacy-restore --test: parsed, checked against the
        tables and sets as they are now, and not committed."""
        self._runner.run([*self._restore_argv(), "--test"], stdin=script)

    def _restore_argv(self) -> list[str]:
        return [RESTORE[self.family], "-w", str(LOCK_WAIT_SECONDS), "--noflush"]
