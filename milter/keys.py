"""Keeping the DKIM key ring fresh without touching PostgreSQL per message.

A Python-owned thread asks `KeyRingSource` every few seconds (it reloads only
when the keys changed); the signing path just reads the last ring.  Rotation
therefore needs no restart, and a PostgreSQL outage leaves the last ring in
service.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import Executor
from datetime import UTC, datetime

from postkeep.milter import metrics
from postkeep.storage.metadata.db import BackendError, Database
from postkeep.storage.metadata.dkim_keys import DkimKeyError, KeyRing, KeyRingSource, MasterKey
from postkeep.ttlcache import TtlCache

log = logging.getLogger("postkeep.milter")


def _export_key_age(ring: KeyRing) -> None:
    """The oldest active key's activation time on /metrics (rotation overdue alert)."""
    starts = [k.active_from for k in ring.active_keys(datetime.now(UTC)) if k.active_from]
    metrics.DKIM_OLDEST_ACTIVE_KEY.set(min(starts).timestamp() if starts else 0)


class KeyRingRefresher:
    """The current KeyRing, refreshed every PERIOD seconds in the background."""

    def __init__(self, db: Database, master: MasterKey, period: float,
                 executor: Executor | None = None) -> None:
        self._source = KeyRingSource(db, master, period)
        self._period = period
        self._executor = executor
        self._started = 0  # forced reloads begun; lets waiters share a fresh one
        # Domains a forced reload found keyless, and when: they wait for the
        # background poll instead of forcing a reload per message.
        self._keyless: TtlCache[str, None] = TtlCache()
        self._force_lock = threading.Lock()
        self._ring: KeyRing | None = None
        self._stop = threading.Event()
        self._refresh()
        self._thread = threading.Thread(target=self._run, name="dkim-keys", daemon=True)
        self._thread.start()

    def __call__(self) -> KeyRing | None:
        return self._ring

    def reload_for(self, domain: str) -> KeyRing | None:
        """The ring after a forced reload for DOMAIN's miss, at most once a period.

        A domain with no key (sending unsigned by policy) would otherwise cost
        one PostgreSQL read per message.
        """
        seen = self._keyless.get(domain)
        if seen is not None and seen.fresh(time.monotonic()):
            return self._ring
        ring = self.reload_now()
        self._keyless.put(domain, None, time.monotonic() + self._period)
        return ring

    def reload_now(self) -> KeyRing | None:
        """Check for new keys right away, e.g. on a miss; BackendError if it cannot.

        The check is one small read (the change marker).  Callers that arrive
        while a forced reload runs wait for it and share its result, which
        began after they asked.  The query runs on the executor, never on a
        libmilter thread.
        """
        asked = self._started
        with self._force_lock:
            if self._started > asked:  # one began after we asked, and has finished
                return self._ring
            self._started += 1
            if self._executor is not None:
                error = self._executor.submit(self._refresh, True).result()
            else:
                error = self._refresh(True)
            if error is not None:
                raise error
            return self._ring

    def _refresh(self, force: bool = False) -> BackendError | None:
        try:
            ring = self._source.current(datetime.now(UTC), force=force)
        except (BackendError, DkimKeyError) as exc:
            log.warning("DKIM keys not reloaded: %s", exc)
            if isinstance(exc, BackendError):
                return exc
            return BackendError("postgres", f"DKIM keys: {exc}")
        if self._ring is not None and ring.version < self._ring.version:
            return None  # a slower reload finishing late: keep the newer ring
        if self._ring is None or ring.version != self._ring.version:
            log.info("DKIM keys loaded: version %s, %d domains", ring.version,
                     len(ring.domains()))
        self._ring = ring
        _export_key_age(ring)
        return None

    def _run(self) -> None:
        while not self._stop.wait(self._period):
            self._refresh()

    def close(self) -> None:
        self._stop.set()
