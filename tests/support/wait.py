"""Waiting for a condition or a call, never for a fixed time.

The suite runs on shared 2-core machines: how long something takes says
nothing about whether it is right.  Tests wait for the event they need, with
a deadline far above what it should take (so a hang fails instead of blocking
the suite), and assert order and outcome, never speed.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def until(cond: Callable[[], T], what: str, timeout: float = 60.0,
          interval: float = 0.05) -> T:
    """Poll COND until it returns something truthy, and return that; AssertionError
    naming WHAT if TIMEOUT seconds pass first."""
    deadline = time.monotonic() + timeout
    while True:
        got = cond()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(interval)


def finishes(call: Callable[[], T], what: str, timeout: float = 30.0) -> T:
    """CALL's result (or its exception) if it returns within TIMEOUT seconds.

    For "answered while something else is still blocked": the caller keeps the
    other thing blocked until this returns, so a CALL that queues behind it
    fails here by the deadline instead of passing late or hanging the suite.
    """
    box: list[T] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            box.append(call())
        except BaseException as exc:  # re-raised in the caller's thread
            errors.append(exc)

    t = threading.Thread(target=run, name=f"finishes: {what}", daemon=True)
    t.start()
    t.join(timeout)
    if t.is_alive():
        raise AssertionError(f"{what} did not return within {timeout:g}s (blocked?)")
    if errors:
        raise errors[0]
    return box[0]
