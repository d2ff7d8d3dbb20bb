"""The operator's resources (policies and IP lists): validated, stored all or nothing with
their audit entries, and kept parsed in memory for the compiler.

Applying is two steps so the controller can compile the result in between and refuse it
(a ruleset above the size cap) before anything is stored: `plan` checks the documents and
says what would change, `commit` stores a plan.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from controller.errors import Conflict, InvalidArgument, NotFound
from controller.policy import (
    IPList,
    Policy,
    Resource,
    ValidationFailed,
    parse_documents,
    referenced_iplists,
    resource_to_json,
)
from controller.store.sqlite_store import SqliteStore

log = logging.getLogger(__name__)

KINDS = ("Policy", "IPList")
# Bounds on one apply, so a runaway file gets a clear error instead of a slow store.
MAX_DOCUMENTS = 1000
MAX_DOCUMENT_BYTES = 1024 * 1024


@dataclass(frozen=True)
class ResourceChange:
    kind: str
    name: str
    action: str  # created | configured | unchanged | deleted


@dataclass(frozen=True)
class Pending:
    resource: Resource
    text: str  # as stored
    action: str


@dataclass(frozen=True)
class ApplyPlan:
    """What storing some documents would change."""

    changes: list[ResourceChange]
    pending: list[Pending] = field(default_factory=list)


class ResourceCatalog:
    def __init__(self, store: SqliteStore) -> None:
        self._store = store
        self._policies: dict[str, Policy] = {}
        self._iplists: dict[str, IPList] = {}
        stored = store.list_resources()
        try:
            parsed = parse_documents([r.document for r in stored])
        except ValidationFailed as exc:
            raise RuntimeError(f"stored resources no longer validate: {exc}") from exc
        for resource in parsed:
            self._cache(resource)

    @property
    def policies(self) -> Mapping[str, Policy]:
        return self._policies

    @property
    def iplists(self) -> Mapping[str, IPList]:
        return self._iplists

    def plan(self, documents: Sequence[str]) -> ApplyPlan:
        """Validate DOCUMENTS (InvalidArgument naming every problem) and compare them
        with what is stored."""
        _check_sizes(documents)
        try:
            resources = parse_documents(documents)
        except ValidationFailed as exc:
            raise InvalidArgument(str(exc).splitlines()) from exc
        self._check_references(resources)
        plan = ApplyPlan([])
        for resource in resources:
            text = resource_to_json(resource)
            existing = self._store.get_resource(resource.kind, resource.metadata.name)
            if existing is None:
                action = "created"
            elif existing.document == text:
                action = "unchanged"
            else:
                action = "configured"
            plan.changes.append(ResourceChange(resource.kind, resource.metadata.name, action))
            if action != "unchanged":
                plan.pending.append(Pending(resource, text, action))
        return plan

    def with_plan(self, plan: ApplyPlan) -> tuple[list[IPList], list[Policy]]:
        """The IP lists and policies there would be once PLAN is committed."""
        policies, iplists = dict(self._policies), dict(self._iplists)
        for pending in plan.pending:
            resource = pending.resource
            if isinstance(resource, Policy):
                policies[resource.metadata.name] = resource
            else:
                iplists[resource.metadata.name] = resource
        return list(iplists.values()), list(policies.values())

    def commit(self, plan: ApplyPlan, *, actor: str) -> int:
        """Store PLAN's resources and their audit entries in one transaction; returns the
        revision."""
        with self._store.transaction():
            revision = self._store.next_revision()
            for pending in plan.pending:
                kind, name = pending.resource.kind, pending.resource.metadata.name
                self._store.put_resource(kind, name, pending.text, revision)
                self._store.record_revision(revision, kind, name, pending.action, pending.text)
                self._store.add_audit(
                    actor, f"{kind.lower()}.{pending.action}", f"{kind.lower()}/{name}",
                    {"revision": revision, "document": json.loads(pending.text)},
                )  # fmt: skip
        for pending in plan.pending:
            self._cache(pending.resource)
        log.info("applied %d resource(s) at revision %d", len(plan.pending), revision)
        return revision

    def delete(self, kind: str, name: str, *, actor: str) -> int:
        """Delete one resource (an IP list in use is refused); returns the revision."""
        _check_kind(kind)
        if self._store.get_resource(kind, name) is None:
            raise NotFound(f"{kind.lower()} '{name}' does not exist")
        if kind == "IPList":
            users = sorted(
                p for p, pol in self._policies.items() if name in referenced_iplists(pol)
            )
            if users:
                raise Conflict(
                    f"iplist '{name}' is used by policy {', '.join(users)}; "
                    "change or delete those first"
                )
        with self._store.transaction():
            revision = self._store.next_revision()
            self._store.delete_resource(kind, name)
            self._store.record_revision(revision, kind, name, "deleted", None)
            self._store.add_audit(
                actor, f"{kind.lower()}.deleted", f"{kind.lower()}/{name}", {"revision": revision}
            )
        (self._policies if kind == "Policy" else self._iplists).pop(name, None)
        return revision

    def listed(self, kind: str) -> list[tuple[str, str, int]]:
        """(name, stored document, revision) of every resource of KIND."""
        _check_kind(kind)
        return [(r.name, r.document, r.revision) for r in self._store.list_resources(kind)]

    def _cache(self, resource: Resource) -> None:
        if isinstance(resource, Policy):
            self._policies[resource.metadata.name] = resource
        else:
            self._iplists[resource.metadata.name] = resource

    def _check_references(self, resources: Sequence[Resource]) -> None:
        known = set(self._iplists) | {r.metadata.name for r in resources if isinstance(r, IPList)}
        problems = []
        for index, resource in enumerate(resources, start=1):
            if isinstance(resource, Policy):
                for missing in sorted(referenced_iplists(resource) - known):
                    problems.append(
                        f"document {index} (Policy {resource.metadata.name}): "
                        f"iplist '{missing}' does not exist; apply it first or in the same file"
                    )
        if problems:
            raise InvalidArgument(problems)


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise InvalidArgument([f"kind: '{kind}' is not one of {', '.join(KINDS)}"])


def _check_sizes(documents: Sequence[str]) -> None:
    """Refuse oversized input before parsing it."""
    if len(documents) > MAX_DOCUMENTS:
        raise InvalidArgument(
            [f"documents: {len(documents)} in one apply; at most {MAX_DOCUMENTS}, split the file"]
        )
    problems = [
        f"document {index}: {len(text.encode()) / 1024:.0f} KiB; a resource may be at most "
        f"{MAX_DOCUMENT_BYTES // 1024} KiB"
        for index, text in enumerate(documents, start=1)
        if len(text.encode()) > MAX_DOCUMENT_BYTES
    ]
    if problems:
        raise InvalidArgument(problems)
