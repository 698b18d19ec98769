"""The storage probe against the configured bucket, for the CLI and the daemons.

storage/content/probe.py decides; this module supplies what it checks
against (the bucket, postkeep's lifecycle rule ids, `s3.object_lock`) and
what a daemon does with the answer at start-up: log one line, and refuse to
start (ConfigError, naming what is lacking) only on `probe.refusal` that
holds on a second look.  A distributed server answers a read just after the
write with NoSuchKey, or with a quorum error, while a node that came back is
not yet seen by its peers: a passing state, not a missing capability, so a
refusal is probed again (START_ATTEMPTS times, START_PAUSE seconds apart)
before it stops the daemon.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from postkeep.config import ConfigError
from postkeep.storage.content.objects import S3ObjectStore, S3ProbeStore
from postkeep.storage.content.probe import ProbeReport, refusal, run_probe
from postkeep.storage.lifecycle.rules import planned_rules


def probe(store: S3ObjectStore) -> ProbeReport:
    """Run the probe on STORE's bucket under its configuration."""
    return run_probe(S3ProbeStore(store), store.cfg.endpoint, store.bucket,
                     store.cfg.object_lock,
                     [r.rule_id for r in planned_rules(object_lock=store.locks_objects)])


START_ATTEMPTS = 3
START_PAUSE = 2.0


def check_at_start(store: S3ObjectStore, log: logging.Logger, attempts: int = START_ATTEMPTS,
                   pause: float = START_PAUSE,
                   sleep: Callable[[float], None] = time.sleep) -> ProbeReport:
    """Probe, log the one line; ConfigError if the daemon must not start (a
    refusal on each of ATTEMPTS probes, PAUSE seconds apart)."""
    for attempt in range(1, attempts + 1):
        report = probe(store)
        why = refusal(report)
        if why is None or attempt == attempts:
            break
        log.warning("%s; probing again in %gs (attempt %d of %d)", report.line(), pause,
                    attempt, attempts)
        sleep(pause)
    if why is not None:
        log.error("%s", report.line())
        hint = " (s3.object_lock)" if not report.has("object_lock") and \
            report.get("object_lock") is not None else ""
        raise ConfigError(f"storage probe: {why}{hint}")
    unreached = any(not c.answered for c in report.checks)
    (log.warning if unreached else log.info)("%s", report.line())
    return report
