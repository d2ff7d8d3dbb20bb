"""Our ipsets, replaced through `ipset restore` scripts so that rules never see half a set.

Each set is filled under a temporary name and swapped in: a rule that matches the set
sees the old members until the swap and all the new ones after it. All sets are filled
(and missing ones created empty) by one script before any swap, so a bad member or a full
set fails before any live set changed, and the rules can be tested against sets that
exist. After the swap, the temporary holds the old members: swapping again puts them back.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Iterable, Sequence

from agent.dataplane.backend import DataplaneError
from agent.dataplane.iptables.commands import CommandRunner
from agent.dataplane.iptables.plan import IpSet, is_our_set

IPSET = "ipset"
HASHSIZE_MIN = 1024
MAXELEM_MIN = 65536  # ipset's default; larger sets get room for all their members
_ERROR_LINE = re.compile(r"Error in line (\d+)")


def maxelem_for(count: int) -> int:
    """The maxelem a set is created with for COUNT members: beyond it, adds fail."""
    return max(MAXELEM_MIN, count)


def _create(name: str, ipset: IpSet) -> str:
    count = len(ipset.members)
    hashsize = HASHSIZE_MIN
    while hashsize < count:
        hashsize *= 2
    maxelem = maxelem_for(count)
    return (
        f"create {name} hash:net family {ipset.ipset_family} hashsize {hashsize} maxelem {maxelem}"
    )


def fill_script(ipsets: Sequence[IpSet], existing: Collection[str]) -> str:
    """The restore script that fills every set's temporary with its new members, then
    creates (empty) the sets that do not exist yet; no live set changes."""
    lines: list[str] = []
    for ipset in ipsets:
        if ipset.temporary_name in existing:  # left over by an interrupted apply
            lines.append(f"destroy {ipset.temporary_name}")
        lines.append(_create(ipset.temporary_name, ipset))
        lines.extend(f"add {ipset.temporary_name} {member}" for member in ipset.members)
    lines.extend(_create(ipset.name, ipset) for ipset in ipsets if ipset.name not in existing)
    return "".join(line + "\n" for line in lines)


def swap_script(ipsets: Sequence[IpSet]) -> str:
    """The restore script that swaps every filled temporary with its live set; run again,
    it swaps the old members back."""
    return "".join(f"swap {ipset.temporary_name} {ipset.name}\n" for ipset in ipsets)


def destroy_script(names: Iterable[str]) -> str:
    return "".join(f"destroy {name}\n" for name in names)


class IpsetScriptError(DataplaneError):
    """`ipset restore` failed at LINE (1-based; None if it did not say): the lines before
    it were carried out, the rest not."""

    def __init__(self, message: str, line: int | None) -> None:
        super().__init__(message)
        self.line = line


class Ipsets:
    """The ipsets of this network namespace, through the `ipset` command."""

    def __init__(self, runner: CommandRunner) -> None:
        self._runner = runner

    def names(self) -> list[str]:
        return self._runner.run([IPSET, "list", "-n"]).split()

    def our_names(self) -> list[str]:
        return [name for name in self.names() if is_our_set(name)]

    def restore(self, script: str) -> None:
        if not script:
            return
        try:
            self._runner.run([IPSET, "restore"], stdin=script)
        except DataplaneError as exc:
            # ipset names only the line number; the line itself names the set.
            found = _ERROR_LINE.search(str(exc))
            lines = script.splitlines()
            if found is None or not 0 < int(found.group(1)) <= len(lines):
                raise IpsetScriptError(str(exc), None) from exc
            line = int(found.group(1))
            raise IpsetScriptError(f"{exc} (in `{lines[line - 1]}`)", line) from exc
