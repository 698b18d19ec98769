"""postkeep-storage's Batcher without PostgreSQL: how reports are grouped into
writes, and how many writes run at once."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence

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
        self.release.wait(10)
        return [int.from_bytes(r.sha256, "big") for r in reports]


async def _until(cond: object, timeout: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not cond():  # type: ignore[operator]
        if loop.time() > deadline:
            raise AssertionError("condition never held")
        await asyncio.sleep(0.005)


def _run(writers: int) -> tuple[list[list[int]], list[list[int]], list[int]]:
    """Submit 1, then 2 and 3 while 1 is being written; the batches seen before
    and after the writer is released, and each submitter's answer."""
    writer = SlowWriter()

    async def main() -> tuple[list[list[int]], list[int]]:
        batcher = Batcher(writer, max_batch=10, writers=writers)
        batcher.start()
        first = asyncio.create_task(batcher.submit(_report(1)))
        await _until(lambda: writer.batches)
        rest = [asyncio.create_task(batcher.submit(_report(n))) for n in (2, 3)]
        await asyncio.sleep(0.2)  # time for a second writer to start, if there is one
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
        threading.Timer(0.2, writer.release.set).start()
        await batcher.stop()
        return await asyncio.wait_for(pending, 1)

    assert asyncio.run(main()) == 7
