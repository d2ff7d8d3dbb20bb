"""Suite-wide policy: where the lab is required (CI, after scripts/setup installed every
tool the tests use), no test may skip."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

REQUIRE_LAB_ENV = "BULKHEAD_REQUIRE_LAB"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()  # type: ignore[attr-defined]
    if report.skipped and os.environ.get(REQUIRE_LAB_ENV) == "1":
        # A skipped test in CI would let a broken set-up (a tool not installed, no lab)
        # pass silently.
        report.outcome = "failed"
        report.longrepr = f"test skipped but {REQUIRE_LAB_ENV}=1: {report.longrepr}"
