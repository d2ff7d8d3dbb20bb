"""Our ipsets, replaced through `ipset restore` scripts so that rules never see half a set.

Each set is filled under a temporary name and swapped in: a rule that matches the set
sees the old members until the swap and all the new ones after it. All sets are filled
before the first swap, so a bad member or a full set fails before any live set changed.
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


def swap_script(ipsets: Sequence[IpSet], existing: Collection[str]) -> str:
    """The restore script that replaces every set's members (creating missing sets)."""
    lines: list[str] = []
    for ipset in ipsets:
        if ipset.temporary_name in existing:  # left over by an interrupted apply
            lines.append(f"destroy {ipset.temporary_name}")
        lines.append(_create(ipset.temporary_name, ipset))
        lines.extend(f"add {ipset.temporary_name} {member}" for member in ipset.members)
    for ipset in ipsets:
        if ipset.name not in existing:
            lines.append(_create(ipset.name, ipset))
        lines.append(f"swap {ipset.temporary_name} {ipset.name}")
    lines.extend(f"destroy {ipset.temporary_name}" for ipset in ipsets)
    return "".join(line + "\n" for line in lines)


def destroy_script(names: Iterable[str]) -> str:
    return "".join(f"destroy {name}\n" for name in names)


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
                raise
            raise DataplaneError(f"{exc} (in `{lines[int(found.group(1)) - 1]}`)") from exc
