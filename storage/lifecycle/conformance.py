"""The storage probe against the configured bucket, for the CLI and the daemons.

storage/content/probe.py decides; this module supplies what it checks
against (the bucket, postkeep's lifecycle rule ids, `s3.object_lock`) and
what a daemon does with the answer at start-up: log one line, and refuse to
start (ConfigError, naming what is lacking) only on `probe.refusal`.
"""

from __future__ import annotations

import logging

from postkeep.config import ConfigError
from postkeep.storage.content.objects import S3ObjectStore, S3ProbeStore
from postkeep.storage.content.probe import ProbeReport, refusal, run_probe
from postkeep.storage.lifecycle.rules import planned_rules


def probe(store: S3ObjectStore) -> ProbeReport:
    """Run the probe on STORE's bucket under its configuration."""
    return run_probe(S3ProbeStore(store), store.cfg.endpoint, store.bucket,
                     store.cfg.object_lock,
                     [r.rule_id for r in planned_rules(object_lock=store.locks_objects)])


def check_at_start(store: S3ObjectStore, log: logging.Logger) -> ProbeReport:
    """Probe, log the one line; ConfigError if the daemon must not start."""
    report = probe(store)
    why = refusal(report)
    if why is not None:
        log.error("%s", report.line())
        hint = " (s3.object_lock)" if not report.has("object_lock") and \
            report.get("object_lock") is not None else ""
        raise ConfigError(f"storage probe: {why}{hint}")
    unreached = any(not c.answered for c in report.checks)
    (log.warning if unreached else log.info)("%s", report.line())
    return report
