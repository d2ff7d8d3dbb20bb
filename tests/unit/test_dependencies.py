"""The runtime dependencies in pyproject.toml are what the runtime imports: every
third-party import of agent/, controller/, lab/ and proto/bulkhead is declared, and
nothing is declared that none of them imports (a test oracle belongs in the dev extra)."""

from __future__ import annotations

import ast
import re
import sys
import tomllib
from importlib.metadata import files, packages_distributions, requires
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
RUNTIME = ("agent", "controller", "lab", "proto/bulkhead")
FIRST_PARTY = "bulkhead"  # the distribution of agent, controller, lab and bulkhead
# Imported directly, and brought (pinned) by a declared dependency: carried -> carrier.
CARRIED = {"pydantic-core": "pydantic"}  # controller/policy/resources.py, for a type


def normalised(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_name(requirement: str) -> str:
    found = re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", requirement)
    assert found is not None, requirement
    return normalised(found.group())


def declared() -> set[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return {requirement_name(r) for r in project["dependencies"]}


def imported_modules() -> dict[str, set[str]]:
    """Modules the runtime packages import (absolute imports, stdlib left out), each with
    the files that import it."""
    modules: dict[str, set[str]] = {}
    for root in RUNTIME:
        for path in sorted((ROOT / root).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.Import):
                    names = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                else:
                    continue
                for name in names:
                    if name.partition(".")[0] not in sys.stdlib_module_names:
                        modules.setdefault(name, set()).add(str(path.relative_to(ROOT)))
    return modules


def providers_of(module: str, candidates: list[str]) -> set[str]:
    """Which of CANDIDATES (the distributions sharing MODULE's top-level name, as a
    namespace package like google does) holds MODULE itself."""
    if len(set(candidates)) == 1:
        return set(candidates)
    parts = module.split(".")
    held = set()
    for distribution in set(candidates):
        for file in files(distribution) or []:
            if file.parts[: len(parts)] == tuple(parts) or file.with_suffix("").parts == tuple(
                parts
            ):
                held.add(distribution)
                break
    return held


def imported_distributions() -> dict[str, set[str]]:
    """The installed distributions that provide those modules, with the importing files."""
    providers = packages_distributions()
    distributions: dict[str, set[str]] = {}
    unknown = []
    for module, importers in imported_modules().items():
        found = providers_of(module, providers.get(module.partition(".")[0], []))
        if not found:
            unknown.append(f"{module} (imported by {', '.join(sorted(importers))})")
        for distribution in found:
            distributions.setdefault(normalised(distribution), set()).update(importers)
    assert not unknown, f"imported, and no installed distribution provides it: {unknown}"
    distributions.pop(FIRST_PARTY, None)
    return distributions


def test_every_runtime_import_is_a_runtime_dependency_and_nothing_else_is() -> None:
    imported = imported_distributions()
    needed = set(imported) - set(CARRIED)
    missing = {name: sorted(imported[name]) for name in needed - declared()}
    assert not missing, f"imported at runtime but not in [project].dependencies: {missing}"
    unused = declared() - needed
    assert not unused, f"in [project].dependencies but imported by no runtime module: {unused}"


def test_a_carried_import_is_brought_by_its_declared_carrier() -> None:
    for carried, carrier in CARRIED.items():
        assert carrier in declared()
        assert carried in {requirement_name(r) for r in requires(carrier) or []}


def test_the_test_oracle_and_the_unused_library_are_dev_dependencies() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    dev = {requirement_name(r) for r in project["optional-dependencies"]["dev"]}
    assert {"pyroute2", "python-iptables"} <= dev
    assert not {"pyroute2", "python-iptables"} & declared()
