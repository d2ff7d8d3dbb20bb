"""Tamper detection and self-heal against the real kernel, for both backends.

Each test creates a namespace ``bh-tt-<tag>-<random>`` (removed on exit, with whatever runs
in it), starts ``python -m agent.tamper_cli`` inside it (apply, then guard), tampers with the
rules from outside the guard's process with the ordinary tools, and checks that the guard
reported one repaired TamperEvent and that our rules are back as they were applied. The
measured times are printed (run with -s), not asserted.
"""

from __future__ import annotations

import itertools
import json
import os
import queue
import re
import secrets
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.integration.nslab import PYTHON, Namespace

TOOLS = ("ip", "nft", "ipset", "iptables-legacy", "ip6tables-legacy", "iptables-legacy-save")


def _unavailable() -> str | None:
    if os.geteuid() != 0:
        return "needs root to create network namespaces"
    missing = [tool for tool in TOOLS if shutil.which(tool) is None]
    return f"needs {', '.join(missing)}" if missing else None


_REASON = _unavailable()
pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(_REASON is not None, reason=f"tamper lab unavailable: {_REASON}"),
]

CASE = Path(__file__).resolve().parents[1] / "golden" / "nftables" / "web_db.input.json"
GUARD_SECONDS = 60  # the guard exits by itself after this; the fixture kills it sooner
READY_TIMEOUT_S = 30.0
EVENT_TIMEOUT_S = 10.0  # a repair takes well under a second; this only bounds a failure
QUIET_S = 1.5  # > 2 iptables check intervals: time for a (wrong) second event to show up
_COUNTERS = re.compile(r"counter packets \d+ bytes \d+|\[\d+:\d+\]")


@contextmanager
def namespace(tag: str) -> Iterator[Namespace]:
    """A fresh namespace with loopback up; removed (with what runs inside) on exit."""
    name = f"bh-tt-{tag}-{secrets.token_hex(3)}"
    subprocess.run(["ip", "netns", "add", name], check=True, timeout=30)
    try:
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True, timeout=30)
        yield Namespace(name)
    finally:
        pids = subprocess.run(
            ["ip", "netns", "pids", name], check=False, capture_output=True, text=True, timeout=30
        ).stdout.split()
        for pid in pids:  # only processes this test started in its own namespace
            with suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGKILL)
        subprocess.run(["ip", "netns", "del", name], check=True, timeout=30)


class GuardProcess:
    """agent.tamper_cli running in a namespace; its JSON lines read by a thread."""

    def __init__(self, ns: Namespace, backend: str, own_table: bool = False) -> None:
        request = json.loads(CASE.read_text())
        request.update(backend=backend, seconds=GUARD_SECONDS, own_table=own_table)
        self._process = ns.popen([PYTHON, "-m", "agent.tamper_cli"])
        assert self._process.stdin is not None
        self._process.stdin.write(json.dumps(request))
        self._process.stdin.close()
        self._lines: queue.Queue[dict[str, Any]] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self._process.stdout is not None
        for line in self._process.stdout:
            self._lines.put(json.loads(line))

    def next_line(self, timeout: float) -> dict[str, Any]:
        try:
            return self._lines.get(timeout=timeout)
        except queue.Empty:
            self.stop()
            assert self._process.stderr is not None
            raise AssertionError(f"no line from the guard: {self._process.stderr.read()}") from None

    def pending(self) -> list[dict[str, Any]]:
        found = []
        with suppress(queue.Empty):
            while True:
                found.append(self._lines.get_nowait())
        return found

    def stop(self) -> None:
        if self._process.poll() is None:
            self._process.kill()
        self._process.wait(timeout=30)


@dataclass(frozen=True)
class Tamper:
    backend: str
    kind: str
    commands: tuple[tuple[str, ...], ...]
    stdin: str | None  # for `nft -f -`: several statements in one transaction
    reported: str  # part of the event's description


def nft_rule_handle(ns: Namespace, chain: str, comment: str) -> str:
    listing = json.loads(
        ns.run(["nft", "-j", "-a", "list", "chain", "inet", "bulkhead", chain]).stdout
    )
    for item in listing["nftables"]:
        if item.get("rule", {}).get("comment") == comment:
            return str(item["rule"]["handle"])
    raise AssertionError(f"no rule {comment!r} in chain {chain}")


NFT = ("nft",)
IPT4, IPT6 = ("iptables-legacy", "-w", "5"), ("ip6tables-legacy", "-w", "5")
TAMPERS = [
    Tamper("nftables", "delete-table", (("nft", "delete", "table", "inet", "bulkhead"),), None,
           "table inet bulkhead missing"),
    Tamper("nftables", "flush-table", (("nft", "flush", "table", "inet", "bulkhead"),), None,
           "chain input: rules differ"),
    Tamper("nftables", "delete-rule", (("nft", "delete", "rule", "inet", "bulkhead", "input",
                                        "handle", "{failsafe}"),), None,
           "chain input: rules differ"),
    Tamper("nftables", "insert-accept", (("nft", "insert", "rule", "inet", "bulkhead", "input",
                                          "accept"),), None,
           "chain input: rules differ"),
    Tamper("nftables", "flush-set", (("nft", "flush", "set", "inet", "bulkhead", "db_v4"),), None,
           "set db_v4 changed"),
    Tamper("nftables", "delete-set", (("nft", "-f", "-"),),
           "flush chain inet bulkhead policy_out\ndelete set inet bulkhead db_v4\n",
           "set db_v4 missing"),
    Tamper("iptables", "flush-chain", ((*IPT4, "-F", "BULKHEAD-INPUT"),), None,
           "ipv4 chain BULKHEAD-INPUT: rules differ"),
    Tamper("iptables", "delete-rule", ((*IPT6, "-D", "BULKHEAD-OUTPUT", "1"),), None,
           "ipv6 chain BULKHEAD-OUTPUT: rules differ"),
    Tamper("iptables", "insert-accept", ((*IPT4, "-I", "BULKHEAD-INPUT", "1", "-j", "ACCEPT"),),
           None, "ipv4 chain BULKHEAD-INPUT: rules differ"),
    Tamper("iptables", "unhook", ((*IPT4, "-D", "INPUT", "-j", "BULKHEAD-INPUT"),), None,
           "ipv4 jump from INPUT missing"),
    Tamper("iptables", "accept-before-jump", ((*IPT6, "-I", "INPUT", "1", "-j", "ACCEPT"),), None,
           "ipv6 jump from INPUT changed"),
    Tamper("iptables", "flush-set", (("ipset", "flush", "bh4-db"),), None,
           "ipset bh4-db changed"),
    Tamper("iptables", "delete-member", (("ipset", "del", "bh6-web", "2001:db8::1"),), None,
           "ipset bh6-web changed"),
    Tamper("iptables", "flush-all", ((*IPT4, "-F"),), None,
           "ipv4 jump from INPUT missing"),
    # The second copy of our chains, in security (filter's is unnamed, as with iptables itself).
    Tamper("iptables", "security-flush-chain", ((*IPT4, "-t", "security", "-F", "BULKHEAD-INPUT"),),
           None, "ipv4 security chain BULKHEAD-INPUT: rules differ"),
    Tamper("iptables", "security-insert-accept", ((*IPT6, "-t", "security", "-I", "BULKHEAD-INPUT",
                                                 "1", "-j", "ACCEPT"),), None,
           "ipv6 security chain BULKHEAD-INPUT: rules differ"),
    Tamper("iptables", "security-unhook", ((*IPT4, "-t", "security", "-D", "OUTPUT", "-j",
                                          "BULKHEAD-OUTPUT"),), None,
           "ipv4 security jump from OUTPUT missing"),
]  # fmt: skip


def our_state(ns: Namespace, backend: str) -> str:
    """What we own, read with the ordinary tools: the table, or our chains in filter and
    security, the first rule of their INPUT and OUTPUT, and our ipsets' sorted members
    (counters and hash seeds left out)."""
    if backend == "nftables":
        return _COUNTERS.sub("", ns.run(["nft", "list", "table", "inet", "bulkhead"]).stdout)
    lines = []
    for save, table in itertools.product(
        ("iptables-legacy-save", "ip6tables-legacy-save"), ("filter", "security")
    ):
        rules = ns.run([save, "-t", table]).stdout.splitlines()
        lines += [f"*{table}"] + [line for line in rules if line.startswith("-A BULKHEAD-")]
        for builtin in ("INPUT", "OUTPUT"):
            lines += [line for line in rules if line.startswith(f"-A {builtin} ")][:1]
    members = [
        line
        for line in ns.run(["ipset", "save"]).stdout.splitlines()
        if line.startswith(("add bh4-", "add bh6-"))
    ]
    return "\n".join(lines + sorted(members))


def _components(fingerprint: str) -> set[str]:
    # A repaired nftables table is a new table: only its own handle differs (the handles
    # of its chains, rules and sets count from the start again, in the same order).
    return {line for line in fingerprint.splitlines() if not line.startswith("table ")}


def _resolve(ns: Namespace, tamper: Tamper) -> list[list[str]]:
    return [
        [word.replace("{failsafe}", nft_rule_handle(ns, "input", "failsafe tcp/22"))
         if word == "{failsafe}" else word for word in command]
        for command in tamper.commands
    ]  # fmt: skip


NFT_TAMPERS = [t for t in TAMPERS if t.backend == "nftables"]


@pytest.mark.parametrize("tamper", NFT_TAMPERS, ids=lambda t: t.kind)
def test_an_owned_table_refuses_tampering(tamper: Tamper) -> None:
    """The default on this kernel: the table's owner flag makes the kernel refuse changes
    from any other process, so there is nothing to repair and no moment of exposure."""
    with namespace(tamper.kind[:6]) as ns:
        guard = GuardProcess(ns, "nftables", own_table=True)
        try:
            ready = guard.next_line(READY_TIMEOUT_S)
            assert ready.get("ready"), ready
            applied = our_state(ns, "nftables")
            assert "flags owner" in applied
            refusals = [
                ns.run(command, stdin=tamper.stdin, check=False) for command in _resolve(ns, tamper)
            ]
            time.sleep(QUIET_S)
            events = guard.pending()
            state = our_state(ns, "nftables")
        finally:
            guard.stop()
    for refusal in refusals:
        assert refusal.returncode != 0
        assert "Operation not permitted" in refusal.stderr
    assert state == applied
    assert events == [], "nothing changed, so nothing may be reported"


@pytest.mark.parametrize("tamper", TAMPERS, ids=lambda t: f"{t.backend}-{t.kind}")
def test_tampering_is_repaired_and_reported(tamper: Tamper) -> None:
    """Repair where the kernel cannot refuse: iptables, and nftables tables without the
    owner flag (kernels before 6.9)."""
    with namespace(tamper.kind[:6]) as ns:
        guard = GuardProcess(ns, tamper.backend)
        try:
            ready = guard.next_line(READY_TIMEOUT_S)
            assert ready.get("ready"), ready
            applied = our_state(ns, tamper.backend)
            commands = _resolve(ns, tamper)
            started = time.monotonic()
            for command in commands:
                ns.run(command, stdin=tamper.stdin)
            tampered = time.monotonic()
            line = guard.next_line(EVENT_TIMEOUT_S)
            reported = time.monotonic()
            time.sleep(QUIET_S)
            extra = guard.pending()
            state = our_state(ns, tamper.backend)
        finally:
            guard.stop()
    event = line["event"]
    print(
        f"\n{tamper.backend} {tamper.kind}: reported repaired {reported - tampered:.3f} s after "
        f"the tamper command returned ({reported - started:.3f} s after it started); "
        f"repair itself {event['repairSeconds']:.3f} s; {event['description']!r}"
    )
    assert event["repaired"] is True
    assert tamper.reported in event["description"]
    assert state == applied, "our rules are back as they were applied"
    assert _components(line["fingerprint"]) == _components(ready["fingerprint"])
    assert extra == [], "the guard must not react to its own repair"
