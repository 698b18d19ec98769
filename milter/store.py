"""Making a captured message durable: object first, then the rows.

`persist` uploads the object, then writes the message row and its recipient
rows in one statement.  Until that statement commits, nothing is visible:
readers reach objects only through rows.  If the rows cannot be confirmed, the
object is left in place: an object without a row is invisible to readers, while
deleting it could strand a row whose COMMIT succeeded just before the error.
Only after `persist` returns does the milter let Postfix accept the message.

`Directory` caches organisation lookups for a short time so the hot path
asks PostgreSQL once per sender every few seconds, not once per message.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import BinaryIO, TypeVar

from postkeep.storage.db import BackendError, Database
from postkeep.storage.directory import Organisation, find_by_domain, find_by_submitter
from postkeep.storage.messages import CapturedMessage, record_capture
from postkeep.storage.objects import ObjectStore

log = logging.getLogger("postkeep.milter")

T = TypeVar("T")


class Directory:
    """Organisation lookups with a time-to-live cache (misses cached briefly)."""

    def __init__(self, db: Database, ttl: float, clock: Callable[[], float] = time.monotonic):
        self._db = db
        self._ttl = ttl
        self._miss_ttl = min(ttl, 2.0)
        self._clock = clock
        self._cache: dict[tuple[str, str], tuple[float, Organisation | None]] = {}
        self._lock = threading.Lock()

    def _lookup(self, kind: str, key: str,
                query: Callable[..., Organisation | None]) -> Organisation | None:
        now = self._clock()
        with self._lock:
            hit = self._cache.get((kind, key))
        if hit is not None and hit[0] > now:
            return hit[1]
        with self._db.connection() as conn:
            org = query(conn, key)
        ttl = self._ttl if org is not None else self._miss_ttl
        with self._lock:
            if len(self._cache) > 100_000:
                self._cache.clear()
            self._cache[(kind, key)] = (now + ttl, org)
        return org

    def by_submitter(self, username: str) -> Organisation | None:
        return self._lookup("submitter", username, find_by_submitter)

    def by_domain(self, domain: str) -> Organisation | None:
        return self._lookup("domain", domain, find_by_domain)


def _with_one_retry(db: Database, work: Callable[[], T]) -> T:
    """Run WORK; retry once if the first failure was a dropped connection.

    After a PostgreSQL restart the pool may hand out a dead connection; one
    retry on a fresh one avoids a needless tempfail.  WORK must be idempotent.
    """
    try:
        return work()
    except BackendError as exc:
        if exc.backend != "postgres":
            raise
        log.info("postgres connection failed (%s); retrying once", exc.reason)
        return work()


def persist(db: Database, objects: ObjectStore, message: CapturedMessage,
            content: BinaryIO, compressed_size: int) -> None:
    """Upload the object, then commit the rows; raise BackendError on failure."""
    objects.put(message.object_key, content, compressed_size)

    def write_rows() -> None:
        with db.connection() as conn:
            record_capture(conn, message)

    try:
        _with_one_retry(db, write_rows)
    except BackendError:
        # The object stays: if the COMMIT reached PostgreSQL before the error,
        # the row points at it.  An object without a row is invisible to every
        # reader and is swept by retention.
        log.warning("object %s written but its rows were not confirmed", message.object_key)
        raise
