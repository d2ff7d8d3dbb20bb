"""One family's legacy `filter` table: read with iptables-legacy-save, written with restore.

Every write is one `iptables-legacy-restore --noflush` script ending in a single COMMIT:
libiptc swaps the whole table in one go, with every chain and rule that is not ours
carried over unchanged (counters too). Our scripts name only our chains, the jumps into
them, and rules elsewhere that jump into them.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from pathlib import Path

from agent.dataplane.iptables.commands import CommandRunner
from agent.dataplane.iptables.plan import (
    CHAIN_PREFIX,
    HOOKS,
    OUR_CHAINS,
    Family,
    FamilyRules,
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
class FilterState:
    """The chains of a saved filter table and its rules, as (chain, save line) in order."""

    chains: tuple[str, ...]
    rules: tuple[tuple[str, str], ...]

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


def parse_filter(saved: str) -> FilterState:
    """The filter table's part of iptables-save output."""
    chains: list[str] = []
    rules: list[tuple[str, str]] = []
    for line in saved.splitlines():
        if line.startswith(":"):
            chains.append(line[1:].split()[0])
        elif line.startswith("-A "):
            rules.append((line.split()[1], line))
    return FilterState(tuple(chains), tuple(rules))


def _jump_target(line: str) -> str | None:
    # A jump to a user chain takes no target options, so it ends the line.
    words = shlex.split(line)
    if len(words) >= 2 and words[-2] in ("-j", "-g"):
        return words[-1]
    return None


def _delete(line: str) -> str:
    return "-D" + line.removeprefix("-A")


def _drop_chains(state: FilterState, chains: list[str]) -> list[str]:
    """Script lines removing chains: first what jumps into them, then their rules, then them."""
    lines = [_delete(line) for line in state.jumps_into(set(chains))]
    lines += [f"-F {chain}" for chain in chains]
    lines += [f"-X {chain}" for chain in chains]
    return lines


def apply_script(rules: FamilyRules, state: FilterState) -> str:
    """Replace our chains' rules and make each jump the first rule of its built-in chain."""
    # Declaring a chain creates it, or flushes it if it exists.
    lines = ["*filter", *(f":{chain} - [0:0]" for chain in OUR_CHAINS), *rules.rules]
    for builtin, ours in HOOKS.items():
        jump = jump_rule(builtin)
        present = state.chain_rules(builtin)
        if present[:1] == [jump] and present.count(jump) == 1:
            continue  # in place: keep it, and its counters
        lines += [_delete(jump)] * present.count(jump)
        lines.append(f"-I {builtin} 1 -j {ours}")
    # Chains of ours this version no longer uses (e.g. left by an older agent).
    stale = [chain for chain in state.our_chains() if chain not in OUR_CHAINS]
    lines += _drop_chains(state, stale)
    lines.append("COMMIT")
    return "".join(line + "\n" for line in lines)


def removal_script(state: FilterState) -> str | None:
    """Delete our chains and every jump into them; None if there is nothing of ours."""
    ours = state.our_chains()
    if not ours:
        return None
    return "".join(line + "\n" for line in ["*filter", *_drop_chains(state, ours), "COMMIT"])


class LegacyFilterTable:
    """The legacy filter table of one family, in the caller's network namespace."""

    def __init__(self, family: Family, runner: CommandRunner, names_file: Path | None = None):
        self.family = family
        self._runner = runner
        self._names_file = names_file or TABLE_NAMES[family]

    def is_loaded(self) -> bool:
        """Whether the table exists; reading it otherwise would make the kernel create it."""
        try:
            return "filter" in self._names_file.read_text().split()
        except FileNotFoundError:  # x_tables not even loaded
            return False

    def state(self) -> FilterState:
        return parse_filter(self._runner.run([SAVE[self.family], "-t", "filter"]))

    def restore(self, script: str) -> None:
        argv = [RESTORE[self.family], "-w", str(LOCK_WAIT_SECONDS), "--noflush"]
        self._runner.run(argv, stdin=script)
