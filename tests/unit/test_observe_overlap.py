"""run_beside (overlap.py): two calls at once, one on a helper thread, errors of either
raised to the caller only after both ended."""

from __future__ import annotations

import threading

import pytest

from agent.observe.overlap import run_beside


def test_both_results_and_the_helper_runs_on_a_thread_of_its_own() -> None:
    names: list[str] = []

    def beside() -> str:
        names.append(threading.current_thread().name)
        return "tables"

    assert run_beside(beside, lambda: 42, name="bh-test-helper") == ("tables", 42)
    assert names == ["bh-test-helper"]


def test_the_two_calls_run_at_the_same_time() -> None:
    # Each waits for the other to start: run one after the other, they would time out.
    barrier = threading.Barrier(2, timeout=10)
    assert run_beside(barrier.wait, barrier.wait, name="bh-test-helper") in ((0, 1), (1, 0))


def test_an_error_of_the_helper_is_raised_once_the_caller_is_done() -> None:
    done: list[str] = []

    def fails() -> None:
        raise RuntimeError("helper broke")

    def here() -> None:
        done.append("here")

    with pytest.raises(RuntimeError, match="helper broke"):
        run_beside(fails, here, name="bh-test-helper")
    assert done == ["here"]


def test_the_callers_own_error_wins_and_the_helper_is_joined() -> None:
    helper_done = threading.Event()

    def slow_failure() -> None:
        helper_done.wait(0.05)
        helper_done.set()
        raise RuntimeError("helper broke")

    def here() -> None:
        raise ValueError("caller broke")

    with pytest.raises(ValueError, match="caller broke"):
        run_beside(slow_failure, here, name="bh-test-helper")
    assert helper_done.is_set()  # joined before the error reached us
    assert not [t for t in threading.enumerate() if t.name == "bh-test-helper"]
