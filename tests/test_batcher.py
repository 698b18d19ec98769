"""postkeep-storage's Batcher without PostgreSQL: how reports are grouped into
writes, and how many writes run at once."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from postkeep.storage.reports.dsn import Report
from postkeep.storage.sidecar.lmtp import Batcher

pytestmark = pytest.mark.unit


def _report(n: int) -> Report:
    return Report(sha256=n.to_bytes(32, "big"), size=1, kind="dsn", message_id=None)


class SlowWriter:
    """A batch writer whose calls block until released; records each batch."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []
        self.release = threading.Event()
        self._lock = threading.Lock()

    def __call__(self, reports: Sequence[Report]) -> list[int]:
        with self._lock:
            self.batches.append([int.from_bytes(r.sha256, "big") for r in reports])
        self.release.wait(60)
        return [int.from_bytes(r.sha256, "big") for r in reports]


async def _until(cond: object, timeout: float = 30.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not cond():  # type: ignore[operator]
        if loop.time() > deadline:
            raise AssertionError("condition never held")
        await asyncio.sleep(0.005)


class CountingExecutor(ThreadPoolExecutor):
    """The loop's default executor (asyncio.to_thread's), counting what it was handed.

    Batcher hands each batch to a thread at once; the count is taken in the
    loop's own thread, so it is exact as soon as the loop has run the
    batcher's tasks, however late the thread itself gets to run."""

    def __init__(self) -> None:
        super().__init__(max_workers=4)
        self.submitted = 0

    def submit(self, fn: Any, /, *args: Any, **kwargs: Any) -> Any:
        self.submitted += 1
        return super().submit(fn, *args, **kwargs)


async def _settle() -> None:
    """Let the loop run its ready tasks for some rounds.  Each step of a chain
    here (a submit wakes the batcher, which starts a write task, which hands
    its batch to a thread) takes one round, so after twenty nothing is left
    to run in the loop: what follows happens in threads, or not at all."""
    for _ in range(20):
        await asyncio.sleep(0)


def _run(writers: int) -> tuple[list[list[int]], list[list[int]], list[int]]:
    """Submit 1, then 2 and 3 while 1 is being written; the batches seen before
    and after the writer is released, and each submitter's answer."""
    writer = SlowWriter()

    async def main() -> tuple[list[list[int]], list[int]]:
        executor = CountingExecutor()
        asyncio.get_running_loop().set_default_executor(executor)
        batcher = Batcher(writer, max_batch=10, writers=writers)
        batcher.start()
        first = asyncio.create_task(batcher.submit(_report(1)))
        await _until(lambda: writer.batches)
        rest = [asyncio.create_task(batcher.submit(_report(n))) for n in (2, 3)]
        # Every batch the batcher would start while 1 is being written has
        # been handed to a thread once the loop settles; wait for those threads.
        await _settle()
        await _until(lambda: len(writer.batches) == executor.submitted)
        while_blocked = [list(b) for b in writer.batches]
        writer.release.set()
        codes = await asyncio.gather(first, *rest)
        await batcher.stop()
        return while_blocked, list(codes)

    while_blocked, codes = asyncio.run(main())
    return while_blocked, writer.batches, codes


def test_one_writer_batches_whatever_waited() -> None:
    while_blocked, batches, codes = _run(writers=1)
    assert while_blocked == [[1]]
    assert batches == [[1], [2, 3]]
    assert codes == [1, 2, 3]


def test_a_second_writer_does_not_wait_for_a_slow_commit() -> None:
    while_blocked, batches, codes = _run(writers=2)
    assert while_blocked == [[1], [2, 3]]
    assert batches == [[1], [2, 3]]
    assert codes == [1, 2, 3]


def test_stop_lets_batches_being_written_answer() -> None:
    writer = SlowWriter()

    async def main() -> int:
        batcher = Batcher(writer, max_batch=10, writers=2)
        batcher.start()
        pending = asyncio.create_task(batcher.submit(_report(7)))
        await _until(lambda: writer.batches)
        stopping = asyncio.create_task(batcher.stop())
        await _settle()
        try:
            assert not stopping.done() and not pending.done()  # stop waits for the write
        finally:
            writer.release.set()
        await asyncio.wait_for(stopping, 30)
        return await asyncio.wait_for(pending, 30)

    assert asyncio.run(main()) == 7
