"""postkeep-storage's upkeep scheduler (storage/sidecar/upkeep.py): a failed
job runs again after a short backoff, not a whole interval later."""

from __future__ import annotations

import asyncio

import pytest

from postkeep.storage.sidecar import upkeep

pytestmark = pytest.mark.unit


def test_the_wait_after_failures_doubles_up_to_the_interval() -> None:
    assert upkeep.next_wait(3600, 0, first=10) == 3600
    assert [upkeep.next_wait(3600, n, first=10) for n in range(1, 6)] == [10, 20, 40, 80, 160]
    assert upkeep.next_wait(3600, 12, first=10) == 3600
    assert upkeep.next_wait(5, 1, first=10) == 5  # never longer than the interval
    assert upkeep.next_wait(3600, 10_000, first=10) == 3600  # no overflow


def test_a_failed_job_runs_again_soon_and_counts_both_results(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(upkeep, "RETRY_FIRST_SECONDS", 0.05)
    calls: list[int] = []

    def flaky() -> str:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("postgres: no connection within 3s")
        return "done"

    def before(result: str) -> float:
        value = upkeep.RUNS.labels("flaky-test", result)._value.get()
        return float(value)

    ok0, failed0 = before("ok"), before("failed")

    async def main() -> None:
        stop = asyncio.Event()
        task = asyncio.create_task(upkeep.run_jobs([upkeep.Job("flaky-test", 3600, flaky)],
                                                   stop))
        for _ in range(200):  # at most 10 s; the retry comes after 0.05 s
            if len(calls) >= 2:
                break
            await asyncio.sleep(0.05)
        stop.set()
        await task

    asyncio.run(main())
    # The hourly job ran again at once after its failure, and then not again.
    assert len(calls) == 2
    assert before("failed") == failed0 + 1
    assert before("ok") == ok0 + 1
