"""Suite-wide policy: where the lab is required (CI), an integration test may not skip."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

REQUIRE_LAB_ENV = "BULKHEAD_REQUIRE_LAB"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()  # type: ignore[attr-defined]
    if (
        report.skipped
        and os.environ.get(REQUIRE_LAB_ENV) == "1"
        and item.get_closest_marker("integration") is not None
    ):
        # A skipped lab test in CI would let a broken set-up pass silently.
        report.outcome = "failed"
        report.longrepr = f"integration test skipped but {REQUIRE_LAB_ENV}=1: {report.longrepr}"
