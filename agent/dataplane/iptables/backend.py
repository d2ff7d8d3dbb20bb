"""The iptables backend: two copies of our chains, in the legacy filter and security tables
of both families, with peers in ipsets.

Why two copies: legacy x_tables have no owner, so any root process can change our chains,
and the agent only notices at its next poll (tamper.py, every 0.5 s). One copy alone can
be opened in that time: an ACCEPT inserted at its top, or a flush that lets packets fall
through to the host's policy. Security's INPUT and OUTPUT run after filter's at the same
hooks, a DROP in either table is final, and an ACCEPT or RETURN in one cannot undo the
other's DROP; so a packet passes only if both copies let it, and tampering with one copy
opens nothing while the other still denies. Only the filter copy, which sees packets
first, logs (NFLOG); the security copy is the same rules without the log. (Not mangle:
it runs before nat's OUTPUT, so it would judge a locally DNATed packet by the address it
is redirected from, unlike filter and our nftables table.)

An apply (transaction.py) fills every set under a temporary name, tests both families'
`iptables-legacy-restore --noflush` inputs with `--test`, swaps the sets in, then commits
per family one input that replaces our chains' rules in filter, then in security, and puts
the jumps into them first in INPUT and OUTPUT; last, the temporaries and the sets no rule
uses any more are destroyed. Nothing that is not ours is flushed or rewritten. Each table
of each family commits atomically on its own; between two commits a packet meets the old
rules in one table and the new in the other, so it passes only if both policies allow it.
If a swap or a commit fails, the tables already written are put back as they were and the
sets swapped back, so a failed apply leaves the previous policy, not a mix.

A policy delta that changes set elements only goes into the ipsets with one `ipset
restore` of `add`/`del` lines, rules untouched (elements.py); the backend remembers what
its last apply loaded to check that the delta fits it.

Rules go through iptables-legacy-restore rather than python-iptables: with iptables
1.8.9, python-iptables 1.2.0 hands the NFLOG extension a buffer it has already freed
(Target.reset keeps `udata` in a local), so setting `--nflog-prefix` corrupts the heap.
"""

from __future__ import annotations

import errno
import logging
import socket
from collections.abc import Mapping, Sequence
from pathlib import Path

from agent.dataplane.backend import DataplaneError
from agent.dataplane.baseline import Baseline
from agent.dataplane.fingerprint import compose
from agent.dataplane.iptables.commands import CommandRunner, SubprocessRunner
from agent.dataplane.iptables.elements import LoadedSets
from agent.dataplane.iptables.ipsets import IPSET, Ipsets, destroy_script
from agent.dataplane.iptables.plan import CHAIN_PREFIX, FAMILIES, TABLES, Family, Table, is_our_set
from agent.dataplane.iptables.render import render_compiled
from agent.dataplane.iptables.tables import LegacyTables, TableState, removal_script
from agent.dataplane.iptables.transaction import apply_plan
from agent.dataplane.model import load_ruleset
from bulkhead.v1 import agent_pb2, ruleset_pb2

log = logging.getLogger(__name__)


def ipv6_available() -> bool:
    """Whether this host has an IPv6 stack (not booted with ipv6.disable=1)."""
    try:
        socket.socket(socket.AF_INET6, socket.SOCK_DGRAM).close()
    except OSError as exc:
        if exc.errno == errno.EAFNOSUPPORT:
            return False
        raise
    return True


class IptablesBackend:
    """The Backend for legacy iptables; `apply` is the only writer of our chains and sets."""

    def __init__(
        self,
        runner: CommandRunner | None = None,
        table_names: Mapping[Family, Path] | None = None,
        *,
        ipv6: bool | None = None,
    ) -> None:
        runner = runner or SubprocessRunner()
        names = table_names or {}
        self._runner = runner
        self._ipsets = Ipsets(runner)
        if ipv6 is None:
            ipv6 = ipv6_available()
        if not ipv6:
            # Booted with ipv6.disable=1: ip6tables cannot even open its tables, and there
            # is no IPv6 traffic to filter. The IPv6 sets stay (ipset needs no IPv6 stack),
            # so policies and deltas are handled alike.
            log.warning("this host has no IPv6 stack: only IPv4 rules are loaded")
        families: tuple[Family, ...] = FAMILIES if ipv6 else (4,)
        self._tables = [LegacyTables(family, runner, names.get(family)) for family in families]
        # What the last apply loaded (None after a failed one), for element updates.
        self._loaded: LoadedSets | None = None

    def apply(self, ruleset: ruleset_pb2.Ruleset, baseline: Baseline) -> None:
        compiled = load_ruleset(ruleset)  # RulesetError before anything changes
        plan = render_compiled(compiled, baseline)
        self._loaded = None
        apply_plan(plan, self._ipsets, self._tables)
        # The temporaries (holding the old members now) go with the sets no longer used.
        wanted = {ipset.name for ipset in plan.ipsets}
        self._ipsets.restore(
            destroy_script(name for name in self._ipsets.our_names() if name not in wanted)
        )
        self._loaded = LoadedSets.of(ruleset, compiled, plan, baseline)

    def update_elements(
        self,
        changes: Sequence[agent_pb2.SetChange],
        result: ruleset_pb2.Ruleset,
        baseline: Baseline,
    ) -> bool:
        """Add and delete the delta's hosts and networks in the ipsets of the policy loaded
        last, in one `ipset restore`, rules untouched. False, with nothing changed, when
        RESULT is not that policy with other elements (or the delta does not fit it; see
        LoadedSets.update). Nothing here owns the sets: a caller that guards them reads
        them back (TamperGuard does)."""
        loaded = self._loaded
        if loaded is None:
            return False
        update = loaded.update(changes, result, baseline)
        if update is None:
            return False
        try:
            self._ipsets.restore(update.script)
        except DataplaneError as exc:
            # Only a kernel error or someone else's change to our sets gets here, and
            # the restore kept the lines before the failing one: the sets hold part of
            # the delta (never more open than the old or the new policy, by the order
            # of the lines). Swapping in whole sets puts exactly RESULT there.
            log.warning("element update failed (%s); applying the whole ruleset", exc)
            self.apply(result, baseline)
            return True
        loaded.commit(update)
        return True

    def remove(self) -> None:
        self._loaded = None
        for tables in self._tables:
            # Only loaded tables are read: nothing of ours can be in one that does not exist.
            script = removal_script(tables.states())
            if script is not None:
                tables.restore(script)
        self._ipsets.restore(destroy_script(self._ipsets.our_names()))

    def is_present(self) -> bool:
        for tables in self._tables:
            states = tables.states()
            if not all(table in states and states[table].is_hooked() for table in TABLES):
                return False
        return True

    def state_fingerprint(self) -> str:
        """Our chains' rules in both tables, the jumps into them with their positions, and
        our ipsets' members, as the kernel holds them (saved without -c: no counters)."""
        components: dict[str, object] = {}
        for tables in self._tables:
            for table, state in tables.states().items():
                components.update(table_components(tables.family, table, state))
        components.update(ipset_components(self._runner.run([IPSET, "save"])))
        return compose(components)


def table_components(family: Family, table: Table, state: TableState) -> dict[str, object]:
    """One table's fingerprint components: each of our chains with its rules in order, and
    per other chain the rules that jump into ours, with their positions (first is ours).

    Names start with the family, then the table, except filter's: like the iptables command,
    they leave the default table unnamed ("ipv4 chain X", "ipv4 security chain X").
    """
    label = f"ipv{family}" if table == "filter" else f"ipv{family} {table}"
    ours = state.our_chains()
    components: dict[str, object] = {
        f"{label} chain {chain}": state.chain_rules(chain) for chain in ours
    }
    jumps = set(state.jumps_into(set(ours)))
    for owner in dict.fromkeys(owner for owner, line in state.rules if line in jumps):
        if owner.startswith(CHAIN_PREFIX):
            continue
        positions = [
            [index, line] for index, line in enumerate(state.chain_rules(owner)) if line in jumps
        ]
        components[f"{label} jump from {owner}"] = positions
    return components


def filter_components(family: Family, state: TableState) -> dict[str, object]:
    """The filter table's fingerprint components (see table_components)."""
    return table_components(family, "filter", state)


def ipset_components(saved: str) -> dict[str, object]:
    """Our ipsets from `ipset save` output: type and options, and members in sorted order.

    The `initval` option is a random hash seed drawn each time a set is created (so at every
    apply, which swaps in fresh sets); it says nothing about what the set matches.
    """
    sets: dict[str, tuple[list[str], list[str]]] = {}
    for line in saved.splitlines():
        words = line.split()
        if len(words) >= 2 and words[0] == "create" and is_our_set(words[1]):
            options = words[2:]
            if "initval" in options:
                at = options.index("initval")
                del options[at : at + 2]
            sets[words[1]] = (options, [])
        elif len(words) >= 3 and words[0] == "add" and words[1] in sets:
            sets[words[1]][1].append(" ".join(words[2:]))
    return {
        f"ipset {name}": [options, sorted(members)] for name, (options, members) in sets.items()
    }
