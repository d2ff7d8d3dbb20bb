"""One apply of a plan across the ipsets and both families' tables: all of it, or as before.

Legacy x_tables commit one table at a time, so an apply is a sequence, ordered so that a
failure can be undone:

1. one `ipset restore` fills every set's temporary and creates the missing sets empty; no
   live set changes;
2. each family's script is run through `iptables-legacy-restore --test` (and ip6tables'),
   against the sets as they now exist; a failure here discards what step 1 made and
   leaves everything as it was;
3. one `ipset restore` swaps every temporary with its live set;
4. each family's script is committed, IPv4 first;
5. the caller destroys the temporaries (now holding the old members) and stale sets.

If a swap or a commit fails (the kernel refuses something only at commit, or another
process changed a table or a set in between), the rollback runs the same steps backwards:
the tables of every family already written are put back as they were read before step 1,
then the sets swapped so far are swapped back, then what step 1 made is destroyed. So a
failed IPv6 commit never leaves new IPv4 rules and new sets beside old IPv6 rules. If
putting a table back fails too, the sets stay new (new sets under old or new rules are
both states an apply passes through) and the error says so; the next apply repairs it.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import NoReturn

from agent.dataplane.backend import DataplaneError
from agent.dataplane.iptables.ipsets import (
    Ipsets,
    IpsetScriptError,
    destroy_script,
    fill_script,
    swap_script,
)
from agent.dataplane.iptables.plan import Family, IpSet, IptablesPlan, Table
from agent.dataplane.iptables.tables import (
    LegacyTables,
    TableState,
    apply_script,
    revert_script,
)

log = logging.getLogger(__name__)

States = dict[Table, TableState]


def apply_plan(plan: IptablesPlan, ipsets: Ipsets, families: Sequence[LegacyTables]) -> None:
    """Load PLAN's sets and both families' rules, or raise DataplaneError with everything
    put back as it was read at the start (see the module's docstring)."""
    existing = set(ipsets.names())
    made = [ipset.temporary_name for ipset in plan.ipsets]
    made += [ipset.name for ipset in plan.ipsets if ipset.name not in existing]
    try:
        ipsets.restore(fill_script(plan.ipsets, existing))
        previous: dict[Family, States] = {tables.family: tables.states() for tables in families}
        scripts = {
            tables.family: apply_script(plan.family(tables.family), previous[tables.family])
            for tables in families
        }
        for tables in families:
            tables.test(scripts[tables.family])
    except DataplaneError:
        try:
            _discard(ipsets, made)  # nothing live changed: only what step 1 made goes
        except DataplaneError as exc:
            log.warning("could not destroy the sets a failed apply made: %s", exc)
        raise
    try:
        ipsets.restore(swap_script(plan.ipsets))
    except IpsetScriptError as exc:
        if exc.line is None:  # no telling which sets were swapped: the next apply swaps all
            raise DataplaneError(f"{exc}; the sets may be partly swapped") from exc
        swapped = plan.ipsets[: exc.line - 1]  # the lines before the failing one
        _roll_back(exc, ipsets, written=[], previous=previous, swapped=swapped, made=made)
    written: list[LegacyTables] = []
    for tables in families:
        written.append(tables)  # a failed script may have committed its first table
        try:
            tables.restore(scripts[tables.family])
        except DataplaneError as exc:
            _roll_back(
                exc, ipsets, written=written, previous=previous, swapped=plan.ipsets, made=made
            )


def _roll_back(
    error: DataplaneError,
    ipsets: Ipsets,
    *,
    written: Sequence[LegacyTables],
    previous: dict[Family, States],
    swapped: Sequence[IpSet],
    made: Sequence[str],
) -> NoReturn:
    """Undo an apply that failed with ERROR, then raise it with what became of the undo."""
    try:
        for tables in reversed(written):
            script = revert_script(previous[tables.family], tables.states())
            if script is not None:
                tables.restore(script)
    except DataplaneError as exc:
        log.error("could not put the tables back after a failed apply: %s", exc)
        raise DataplaneError(
            f"{error}; putting the previous rules back failed too ({exc}): the new sets stay"
        ) from error
    try:
        ipsets.restore(swap_script(swapped))
        _discard(ipsets, made)
    except DataplaneError as exc:
        log.error("could not put the sets back after a failed apply: %s", exc)
        raise DataplaneError(
            f"{error}; the previous rules are back, putting the sets back failed ({exc})"
        ) from error
    log.warning("apply failed (%s); the previous rules and sets are back", error)
    raise DataplaneError(f"{error}; the previous rules and sets are back") from error


def _discard(ipsets: Ipsets, names: Sequence[str]) -> None:
    """Destroy those of NAMES that exist: sets this apply made and no rule uses."""
    present = set(ipsets.names())
    ipsets.restore(destroy_script(name for name in names if name in present))
