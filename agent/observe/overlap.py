"""Two independent pieces of kernel-bound work at once: one on a thread of its own, one
on the caller's.

Reading /proc/<pid>/fd links and receiving a sock_diag dump are both spent mostly in
system calls, which release the GIL, so on a second core they overlap. The helper
thread is made for the call and joined before it returns, whatever happens: no pool
outlives it, and nothing runs on behind the caller's back.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")
U = TypeVar("U")


def run_beside(beside: Callable[[], T], here: Callable[[], U], *, name: str) -> tuple[T, U]:
    """(beside(), here()), with beside() run on a new thread (named `name`) while here()
    runs on this one. An exception of either is raised here once both have ended; here()'s
    first, as the one the caller was waiting on."""
    values: list[T] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            values.append(beside())
        except BaseException as exc:  # handed to the caller, which raises it
            errors.append(exc)

    thread = threading.Thread(target=run, name=name, daemon=True)
    thread.start()
    try:
        mine = here()
    finally:
        thread.join()
    if errors:
        raise errors[0]
    return values[0], mine
