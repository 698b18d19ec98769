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

from postkeep.storage.db import BackendError
from postkeep.storage.dkim_keys import DkimKeyError, KeyRing, KeyRingSource

log = logging.getLogger("postkeep.milter")


class KeyRingRefresher:
    """The current KeyRing, refreshed every PERIOD seconds in the background."""

    # A miss (a domain with no key) may force a reload at most this often.
    MISS_RELOAD_SECONDS = 1.0

    def __init__(self, source: KeyRingSource, period: float,
                 executor: Executor | None = None) -> None:
        self._source = source
        self._period = period
        self._executor = executor
        self._last_forced = 0.0
        self._ring: KeyRing | None = None
        self._stop = threading.Event()
        self._refresh()
        self._thread = threading.Thread(target=self._run, name="dkim-keys", daemon=True)
        self._thread.start()

    def __call__(self) -> KeyRing | None:
        return self._ring

    def reload_now(self) -> KeyRing | None:
        """Check for new keys right away (rate-limited), e.g. on a miss.

        Runs the query on the executor: never on a libmilter thread.
        """
        now = time.monotonic()
        if now - self._last_forced < self.MISS_RELOAD_SECONDS:
            return self._ring
        self._last_forced = now
        self._source.invalidate()
        if self._executor is not None:
            self._executor.submit(self._refresh).result()
        else:
            self._refresh()
        return self._ring

    def _refresh(self) -> None:
        try:
            ring = self._source.current(datetime.now(UTC))
        except (BackendError, DkimKeyError) as exc:
            log.warning("DKIM keys not reloaded: %s", exc)
            return
        if self._ring is None or ring.version != self._ring.version:
            log.info("DKIM keys loaded: version %s, %d domains", ring.version,
                     len(ring.domains()))
        self._ring = ring

    def _run(self) -> None:
        while not self._stop.wait(self._period):
            self._refresh()

    def close(self) -> None:
        self._stop.set()
