"""Organisation lookups for the milter, cached for a short time.

The hot path asks PostgreSQL once per sender every few seconds, not once per
message.  Misses run their query through `run` (the daemon passes a pool of
Python-owned threads: see adapter.py for why psycopg never runs on a
libmilter thread).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import Executor

import psycopg

from postkeep.storage.db import Database
from postkeep.storage.directory import Organisation, find_by_domain, find_by_submitter

_Query = Callable[[psycopg.Connection, str], Organisation | None]


class Directory:
    """Organisation by SASL user or sender domain, with a time-to-live cache."""

    def __init__(self, db: Database, ttl: float, executor: Executor | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._db = db
        self._ttl = ttl
        self._miss_ttl = min(ttl, 2.0)  # a newly added domain works within seconds
        self._executor = executor
        self._clock = clock
        self._cache: dict[tuple[str, str], tuple[float, Organisation | None]] = {}
        self._lock = threading.Lock()

    def _query(self, query: _Query, key: str) -> Organisation | None:
        return self._db.run(lambda conn: query(conn, key))

    def _lookup(self, kind: str, key: str, query: _Query) -> Organisation | None:
        now = self._clock()
        with self._lock:
            hit = self._cache.get((kind, key))
        if hit is not None and hit[0] > now:
            return hit[1]
        if self._executor is not None:
            org = self._executor.submit(self._query, query, key).result()
        else:
            org = self._query(query, key)
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
