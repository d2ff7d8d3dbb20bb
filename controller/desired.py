"""One agent's ruleset as the controller handles it: a skeleton and shared set versions
(controller.policy.estate), put together only when it is sent, hashed or stored.

Thousands of agents share the same few set versions, so holding, hashing, diffing and
storing a ruleset costs its skeleton plus one reference per set, not its elements: a
delta between two rulesets compares set digests and computes each set's change once
for every agent making the same step, and the store keeps each part once, by digest.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property, lru_cache

from google.protobuf.message import DecodeError

from bulkhead.v1 import agent_pb2, ruleset_pb2
from bulkhead.v1.contract import composed_hash, set_change
from controller.policy.estate import SetVersion, Skeleton

_DIGEST_BYTES = 32
# Two hashes and revisions make a small delta a little longer than a small snapshot;
# only a delta much longer than the whole ruleset (most elements replaced) loses.
_DELTA_HEADER_BYTES = 160


@dataclass(frozen=True, eq=False)
class DesiredRuleset:
    """A ruleset at a revision; immutable, like its parts."""

    revision: int
    skeleton: Skeleton
    versions: tuple[SetVersion, ...]  # in skeleton.set_names order

    @cached_property
    def hash(self) -> str:
        """contract.ruleset_hash of the whole ruleset, from its parts."""
        return composed_hash(self.skeleton.serialized, [v.digest for v in self.versions])

    @cached_property
    def size(self) -> int:
        """About the length of the whole ruleset serialised (the snapshot's payload)."""
        return len(self.skeleton.serialized) + sum(len(v.serialized) for v in self.versions)

    def ruleset(self) -> ruleset_pb2.Ruleset:
        ruleset = ruleset_pb2.Ruleset()
        self.fill(ruleset)
        return ruleset

    def fill(self, ruleset: ruleset_pb2.Ruleset) -> None:
        """Copy the whole ruleset into RULESET, an empty message (e.g. inside a snapshot
        being built: one copy of the elements instead of two)."""
        ruleset.sets.extend(version.address_set for version in self.versions)
        ruleset.rules.extend(self.skeleton.rules)

    def part_digests(self) -> bytes:
        """The digests of the skeleton and of each set, concatenated (what the store keeps
        per agent; the parts themselves are stored once, by digest)."""
        return self.skeleton.digest + b"".join(v.digest for v in self.versions)

    def parts(self) -> dict[bytes, bytes]:
        """Each part's serialisation by its digest."""
        found = {self.skeleton.digest: self.skeleton.serialized}
        found.update((v.digest, v.serialized) for v in self.versions)
        return found

    @classmethod
    def from_ruleset(cls, revision: int, ruleset: ruleset_pb2.Ruleset) -> DesiredRuleset:
        versions = tuple(SetVersion.of(address_set) for address_set in ruleset.sets)
        skeleton = Skeleton.of(list(ruleset.rules), (v.address_set.name for v in versions))
        return cls(revision, skeleton, versions)

    @classmethod
    def from_parts(
        cls, revision: int, digests: bytes, parts: Mapping[bytes, bytes]
    ) -> DesiredRuleset | None:
        """Put a stored ruleset back together; None if a part is missing or unreadable."""
        chunks = part_digests_of(digests)
        if not chunks or len(digests) % _DIGEST_BYTES or any(c not in parts for c in chunks):
            return None
        try:
            bare = ruleset_pb2.Ruleset.FromString(parts[chunks[0]])
            sets = [ruleset_pb2.AddressSet.FromString(parts[chunk]) for chunk in chunks[1:]]
        except DecodeError:
            return None
        if [s.name for s in bare.sets] != [s.name for s in sets]:
            return None
        return cls.from_ruleset(revision, ruleset_pb2.Ruleset(sets=sets, rules=bare.rules))


def part_digests_of(digests: bytes) -> list[bytes]:
    """The digests in a part_digests() value."""
    return [digests[i : i + _DIGEST_BYTES] for i in range(0, len(digests), _DIGEST_BYTES)]


def policy_delta(base: DesiredRuleset, state: DesiredRuleset) -> agent_pb2.PolicyDelta | None:
    """STATE as changes to BASE when only set elements differ and the delta is not much the
    longer message; None when a snapshot is due."""
    if base.skeleton.serialized != state.skeleton.serialized:
        return None  # rules or set names changed
    changes = [
        _set_change(before, after)
        for before, after in zip(base.versions, state.versions, strict=True)
        if before.digest != after.digest
    ]
    delta = agent_pb2.PolicyDelta(
        base_revision=base.revision,
        base_hash=base.hash,
        revision=state.revision,
        hash=state.hash,
        sets=changes,
    )
    return delta if delta.ByteSize() <= state.size + _DELTA_HEADER_BYTES else None


@lru_cache(maxsize=256)
def _set_change(before: SetVersion, after: SetVersion) -> agent_pb2.SetChange:
    # Keyed by the versions themselves (identity): every agent taking the same step
    # shares one computation and one message. Small, because it keeps old versions (whole
    # sets) alive, and one change makes one step per changed set, shared by all.
    return set_change(before.address_set, after.address_set)


class StateMessages:
    """The message bringing an agent from one ruleset to another (a delta, else a
    snapshot), built once and shared by every stream taking the same step. Workloads with
    the same labels get the same ruleset, so a change builds one message per distinct
    step rather than one per agent; the messages are never changed once built. The least
    recently used go once the rulesets they were built for pass BUDGET bytes."""

    def __init__(self, budget: int = 64 * 1024 * 1024) -> None:
        self._budget = budget
        self._held = 0
        # (base revision, base hash, revision, hash) -> (message, the ruleset's size)
        self._messages: OrderedDict[
            tuple[int, str, int, str], tuple[agent_pb2.ControllerMessage, int]
        ] = OrderedDict()

    def __len__(self) -> int:
        return len(self._messages)

    def step(
        self, base: DesiredRuleset | None, state: DesiredRuleset
    ) -> agent_pb2.ControllerMessage:
        """From BASE (None: nothing known to be held) to STATE."""
        if base is None or base.skeleton.serialized != state.skeleton.serialized:
            base = None  # rules changed: a snapshot, whatever the agent held
            key = (-1, "", state.revision, state.hash)
        else:
            key = (base.revision, base.hash, state.revision, state.hash)
        found = self._messages.get(key)
        if found is not None:
            self._messages.move_to_end(key)
            return found[0]
        message = _message(base, state)
        self._messages[key] = (message, state.size)
        self._held += state.size
        while self._held > self._budget and len(self._messages) > 1:
            _, (_, size) = self._messages.popitem(last=False)
            self._held -= size
        return message


def _message(base: DesiredRuleset | None, state: DesiredRuleset) -> agent_pb2.ControllerMessage:
    delta = policy_delta(base, state) if base is not None else None
    if delta is not None:
        return agent_pb2.ControllerMessage(delta=delta)
    message = agent_pb2.ControllerMessage()
    message.snapshot.revision = state.revision
    message.snapshot.hash = state.hash
    state.fill(message.snapshot.ruleset)
    return message
