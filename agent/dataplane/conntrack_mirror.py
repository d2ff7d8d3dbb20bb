"""The namespace's conntrack entries, mirrored from conntrack's own events, so that the cut
after a policy change need not dump the table.

A conntrack dump walks the kernel's whole conntrack hash table, which every network
namespace shares (262,144 buckets here: about 9 ms however few entries this namespace
has); with 20 agents on two cores that walk was most of the CPU a policy change cost
them (bench/lab_convergence_bench.py). The mirror subscribes to new and destroyed
entries, dumps once, and from then on applies the events queued since it was last read:
a cut during a burst of policy changes reads only what changed.

It dumps again whenever it cannot vouch for its copy: at its first read; when the kernel
dropped events because nobody read them in time (ENOBUFS: a busy host between two policy
changes); when it would hold more than MAX_ENTRIES (a dump is then cheaper than the
memory); when the namespace's nf_conntrack_events is 0 (no events at all). An entry that
existed before the subscription may end without an event (the kernel sends events only
for entries created while someone listened): it stays in the copy until the next dump,
and deleting it is a harmless "no such entry". A connection the copy misses would keep
its way through a policy change, so the enforcer also runs a full dump shortly after a
cut made from the mirror (Enforcer.verify_cut).

The mirror follows events only during a burst of policy changes: the check that ends a
burst (thorough_cut) also ends the subscription, and the next cut subscribes and dumps
again. Between bursts the kernel would otherwise build two messages for every connection
the host opens, for nobody to read.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Final

from agent import netlink
from agent.dataplane.baseline import Baseline
from agent.dataplane.conntrack import cut_disallowed, dump_entries
from agent.netlink import MalformedMessage, ctnetlink
from bulkhead.v1 import ruleset_pb2

NFNLGRP_CONNTRACK_NEW: Final = 1
NFNLGRP_CONNTRACK_DESTROY: Final = 3
_GROUPS: Final = (1 << (NFNLGRP_CONNTRACK_NEW - 1)) | (1 << (NFNLGRP_CONNTRACK_DESTROY - 1))
MAX_ENTRIES: Final = 5_000  # about 2 MB of copies; a bigger table is dumped every time
# Events queued between two reads: about 1,300 at the kernel's ~768 bytes a message. A
# host opening connections faster than that between two policy changes gets dumps.
RCVBUF: Final = 1 << 20
MAX_DATAGRAMS_PER_READ: Final = 4096
EVENTS_SYSCTL: Final = Path("/proc/sys/net/netfilter/nf_conntrack_events")


class ConntrackMirror:
    """Every conntrack entry of this network namespace, kept from events between dumps."""

    def __init__(
        self,
        *,
        max_entries: int = MAX_ENTRIES,
        rcvbuf: int = RCVBUF,
        events_sysctl: Path = EVENTS_SYSCTL,
        dump: Callable[[], list[ctnetlink.Entry]] | None = None,
        subscribe: Callable[[], socket.socket] | None = None,
    ) -> None:
        self._max_entries = max_entries
        self._rcvbuf = rcvbuf
        self._events_sysctl = events_sysctl
        self._dump = dump or _dump
        self._subscribe = subscribe or self._open_subscription
        self._events: socket.socket | None = None
        self._entries: set[ctnetlink.Entry] | None = None  # None: not vouched for
        self.dumps = 0  # full dumps so far (tests and figures)
        self._lock = threading.Lock()

    def entries(self) -> frozenset[ctnetlink.Entry]:
        """The namespace's entries now, from the events since the last read where the
        copy is sound, else from a dump."""
        with self._lock:  # the quick cut and the thorough one run in different threads
            return self._read()

    def _read(self) -> frozenset[ctnetlink.Entry]:
        if not self._events_on():
            self._unsubscribe()  # events may come back on; start afresh then
            return self._dumped()
        if self._events is None:
            self._events = self._subscribe()  # before the dump: no entry falls between
        events, copy = self._events, self._entries
        if copy is not None and self._follow(events, copy):
            return frozenset(copy)
        dumped = self._dumped()
        copy = set(dumped)
        # What changed during the dump: applying an event twice changes nothing.
        if not self._follow(events, copy):
            return dumped  # right as of the dump; the next read dumps again
        self._entries = copy
        return frozenset(copy)

    def thorough_cut(
        self, ruleset: ruleset_pb2.Ruleset, baseline: Baseline, local_addresses: Collection[str]
    ) -> int:
        """The full-dump cut that checks the quick ones once a burst has settled; the
        mirror stops following events until its next read (see above)."""
        self.close()
        return cut_disallowed(ruleset, baseline, local_addresses)

    def close(self) -> None:
        with self._lock:
            self._unsubscribe()

    def _unsubscribe(self) -> None:
        if self._events is not None:
            self._events.close()  # also unsubscribes
        self._events = None
        self._entries = None

    def _dumped(self) -> frozenset[ctnetlink.Entry]:
        self.dumps += 1
        return frozenset(self._dump())

    def _follow(self, events: socket.socket, copy: set[ctnetlink.Entry]) -> bool:
        """Apply the queued events to COPY; False (and the copy dropped) if it cannot be
        trusted: events were dropped, one did not decode, or it grew too big."""
        while True:
            datagrams, overruns = netlink.drain(events, MAX_DATAGRAMS_PER_READ)
            try:
                if overruns:
                    while netlink.drain(events, MAX_DATAGRAMS_PER_READ)[0]:
                        pass  # all of it is worthless now
                    raise MalformedMessage("events were dropped")
                for data in datagrams:
                    _apply(data, copy)
                if len(copy) > self._max_entries:
                    raise MalformedMessage("too many entries to mirror")
            except MalformedMessage:
                self._entries = None
                return False
            if len(datagrams) < MAX_DATAGRAMS_PER_READ:
                return True

    def _events_on(self) -> bool:
        try:
            return self._events_sysctl.read_text().strip() != "0"
        except OSError:
            return False  # no conntrack in this namespace's view: nothing to mirror

    def _open_subscription(self) -> socket.socket:
        return netlink.open_socket(groups=_GROUPS, rcvbuf=self._rcvbuf)


def _apply(data: bytes, copy: set[ctnetlink.Entry]) -> None:
    for msg_type, _flags, start, end in netlink.messages(data):
        if msg_type == ctnetlink.NEW_TYPE:
            copy.add(ctnetlink.decode_entry(data, start, end))
        elif msg_type == ctnetlink.DELETE_TYPE:
            copy.discard(ctnetlink.decode_entry(data, start, end))


def _dump() -> list[ctnetlink.Entry]:
    with netlink.open_socket(rcvbuf=0) as sock:
        return dump_entries(sock)
