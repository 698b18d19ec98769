"""postkeep-storage's periodic jobs: each on its own interval, in a thread.

A job is a plain callable returning a one-line summary for the log.  A job
that fails is logged with its name and counted, and runs again after a short
backoff (RETRY_FIRST_SECONDS, doubling, never longer than its interval): a
PostgreSQL restart or a busy pool at start must not put off an hourly job for
an hour.  Upkeep never stops the LMTP side.  Jobs run at start (or
`first_after` seconds after it), then every `interval` seconds after the
previous run ended (never two of one job at once).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from prometheus_client import Counter, Gauge

log = logging.getLogger("postkeep.storage")

RUNS = Counter("postkeep_storage_upkeep_runs_total", "Upkeep job runs, by job and result",
               ["job", "result"])
RETRY_FIRST_SECONDS = 10.0

LAST_SUCCESS = Gauge("postkeep_storage_upkeep_last_success_timestamp_seconds",
                     "When each upkeep job last succeeded (Unix time)", ["job"])


@dataclass(frozen=True)
class Job:
    name: str
    interval: float            # seconds between the end of one run and the next
    run: Callable[[], str]     # blocking; returns a summary for the log
    first_after: float = 0.0   # seconds from start to the first run


def next_wait(interval: float, failures: int, first: float | None = None) -> float:
    """Seconds until a job runs again: its interval after a success, a backoff
    doubling from FIRST after each of FAILURES consecutive failures (capped at
    the interval)."""
    if failures <= 0:
        return interval
    if first is None:
        first = RETRY_FIRST_SECONDS
    return min(interval, first * 2.0 ** min(failures - 1, 30))


async def run_jobs(jobs: Sequence[Job], stop: asyncio.Event) -> None:
    """Run every job on its interval until STOP is set."""
    for job in jobs:  # every job's series at zero from start, for alert rules
        for result in ("ok", "failed"):
            RUNS.labels(job.name, result)
    await asyncio.gather(*(_loop(job, stop) for job in jobs))


async def _loop(job: Job, stop: asyncio.Event) -> None:
    if job.first_after > 0:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=job.first_after)
    failures = 0
    while not stop.is_set():
        started = time.monotonic()
        try:
            summary = await asyncio.to_thread(job.run)
        except Exception as exc:
            failures += 1
            RUNS.labels(job.name, "failed").inc()
            wait = next_wait(job.interval, failures)
            log.warning("upkeep %s failed after %.1fs: %s; again in %gs", job.name,
                        time.monotonic() - started, exc, wait)
        else:
            failures = 0
            wait = job.interval
            RUNS.labels(job.name, "ok").inc()
            LAST_SUCCESS.labels(job.name).set(time.time())
            log.info("upkeep %s: %s (%.1fs)", job.name, summary, time.monotonic() - started)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=wait)
