"""The iptables backend: our chains in the legacy filter tables, peers in ipsets.

An apply runs in three steps: (1) one `ipset restore` fills every set under a temporary
name and swaps it in; (2) per family, one `iptables-legacy-restore --noflush` commit
replaces our chains' rules and puts the jumps into them first in INPUT and OUTPUT;
(3) sets no rule uses any more are destroyed. Nothing that is not ours is flushed or
rewritten. The two families are separate kernel tables, so each commit is atomic on its
own; if the second fails, the apply fails and the next one repairs it.

Rules go through iptables-legacy-restore rather than python-iptables: with iptables
1.8.9, python-iptables 1.2.0 hands the NFLOG extension a buffer it has already freed
(Target.reset keeps `udata` in a local), so setting `--nflog-prefix` corrupts the heap.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from agent.dataplane.baseline import Baseline
from agent.dataplane.iptables.commands import CommandRunner, SubprocessRunner
from agent.dataplane.iptables.ipsets import Ipsets, destroy_script, swap_script
from agent.dataplane.iptables.plan import FAMILIES, Family
from agent.dataplane.iptables.render import render_iptables
from agent.dataplane.iptables.tables import LegacyFilterTable, apply_script, removal_script
from bulkhead.v1 import ruleset_pb2


class IptablesBackend:
    """The Backend for legacy iptables; `apply` is the only writer of our chains and sets."""

    def __init__(
        self,
        runner: CommandRunner | None = None,
        table_names: Mapping[Family, Path] | None = None,
    ) -> None:
        runner = runner or SubprocessRunner()
        names = table_names or {}
        self._ipsets = Ipsets(runner)
        self._tables = [LegacyFilterTable(family, runner, names.get(family)) for family in FAMILIES]

    def apply(self, ruleset: ruleset_pb2.Ruleset, baseline: Baseline) -> None:
        plan = render_iptables(ruleset, baseline)  # RulesetError before anything changes
        self._ipsets.restore(swap_script(plan.ipsets, set(self._ipsets.names())))
        for table in self._tables:
            table.restore(apply_script(plan.family(table.family), table.state()))
        wanted = {ipset.name for ipset in plan.ipsets}
        self._ipsets.restore(
            destroy_script(name for name in self._ipsets.our_names() if name not in wanted)
        )

    def remove(self) -> None:
        for table in self._tables:
            if not table.is_loaded():
                continue  # nothing of ours can be in a table that does not exist
            script = removal_script(table.state())
            if script is not None:
                table.restore(script)
        self._ipsets.restore(destroy_script(self._ipsets.our_names()))

    def is_present(self) -> bool:
        return all(table.is_loaded() and table.state().is_hooked() for table in self._tables)
