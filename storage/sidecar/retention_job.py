"""Retention on a schedule inside postkeep-storage (the sidecar).

`retention_job` is one of the sidecar's upkeep jobs (storage/sidecar/upkeep.py):
`run_retention` every `retention.interval_seconds`, the first time one
interval after start (a restart loop must not turn into a retention loop),
in a worker thread on a connection of its own borrowed from the pool, so the
LMTP side never waits for it.  A run that fails is logged and counted, and
the next one comes at the next interval; two sidecars (or a sidecar and
`postkeep retention run`) take turns on the run's advisory lock.
"""

from __future__ import annotations

import logging
import threading
import time

from prometheus_client import Counter, Gauge, Histogram

from postkeep.config import RetentionConfig
from postkeep.storage.content.objects import S3ObjectStore
from postkeep.storage.lifecycle.retention import RunReport, run_retention, settings_of
from postkeep.storage.lifecycle.rules import S3Retention
from postkeep.storage.metadata.db import BackendError, Database
from postkeep.storage.sidecar.upkeep import Job

log = logging.getLogger("postkeep.storage")

RUNS = Counter("postkeep_retention_runs_total", "Scheduled retention runs, by result",
               ["result"])
RUN_SECONDS = Histogram("postkeep_retention_run_seconds", "Duration of a retention run",
                        buckets=(1, 5, 15, 60, 300, 900, 3600, 14400))
LAST_SUCCESS = Gauge("postkeep_retention_last_success_timestamp_seconds",
                     "Unix time the last retention run finished without errors")
ROWS_DROPPED = Counter("postkeep_retention_rows_dropped_total",
                       "Message and recipient rows removed by partition drops")
for _result in ("ok", "errors", "failed"):
    RUNS.labels(_result)  # at zero from start, for increase() in alert rules
OBJECTS_SWEPT = Counter("postkeep_retention_objects_swept_total",
                        "Content objects deleted by the sweeper")


def run_once(db: Database, objects: S3ObjectStore, cfg: RetentionConfig,
             stopping: threading.Event | None = None) -> RunReport:
    """One run on a pooled connection; metrics counted.  Raises BackendError.

    STOPPING set (the daemon is shutting down) ends the run between batches.
    """
    started = time.monotonic()
    store = S3Retention(objects.client, objects.bucket, objects.locks_objects)
    stop = stopping.is_set if stopping is not None else None
    try:
        with db.connection() as conn:
            report = run_retention(conn, store, None, lambda line: log.info("retention: %s", line),
                                   settings_of(cfg), should_stop=stop)
    except BackendError:
        RUNS.labels("failed").inc()
        raise
    finally:
        RUN_SECONDS.observe(time.monotonic() - started)
    ROWS_DROPPED.inc(report.messages_dropped + report.recipients_dropped)
    OBJECTS_SWEPT.inc(report.objects_swept)
    if report.errors:
        RUNS.labels("errors").inc()
        log.warning("retention run %s finished with errors: %s", report.run_id,
                    "; ".join(report.errors[:5]))
    else:
        RUNS.labels("ok").inc()
        LAST_SUCCESS.set(time.time())
    return report


def retention_job(db: Database, objects: S3ObjectStore, cfg: RetentionConfig,
                  stopping: threading.Event) -> Job:
    """The sidecar's upkeep job: a run every cfg.interval_seconds, the first
    one interval after start.  A run that reports errors raises after it has
    done what it could, so upkeep logs and counts it as failed."""

    def run() -> str:
        report = run_once(db, objects, cfg, stopping)
        if report.errors:
            raise RuntimeError(f"{report.summary()}; " + "; ".join(report.errors[:5]))
        return report.summary()

    return Job("retention", cfg.interval_seconds, run, first_after=cfg.interval_seconds)
