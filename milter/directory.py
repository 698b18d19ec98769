"""Organisation lookups for the milter, cached for a short time.

The hot path asks PostgreSQL once per sender every few seconds, not once per
message.  While PostgreSQL is down, an organisation found before keeps being
found (the stale entry; one lookup at a time checks whether PostgreSQL is
back, the others do not wait: milter/gate.py), so its mail can go to the
outage spool; a sender never resolved, or last found to belong to no
organisation, raises BackendError (tempfail: never a 5xx on a guess).
Misses run their query through `run` (the daemon passes a pool of
Python-owned threads: see adapter.py for why psycopg never runs on a
libmilter thread).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import Executor

import psycopg

from postkeep.milter.gate import BackendGate
from postkeep.storage.metadata.db import BackendError, Database
from postkeep.storage.metadata.directory import (
    Organisation,
    find_by_domain,
    find_by_inbound_domain,
    find_by_submitter,
)
from postkeep.ttlcache import TtlCache

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
        self._cache: TtlCache[tuple[str, str], Organisation | None] = TtlCache()
        self._gate = BackendGate()

    def _query(self, query: _Query, key: str) -> Organisation | None:
        return self._db.run(lambda conn: query(conn, key))

    def _lookup(self, kind: str, key: str, query: _Query) -> Organisation | None:
        now = self._clock()
        hit = self._cache.get((kind, key))
        if hit is not None and hit.fresh(now):
            return hit.value
        try:
            with self._gate.attempt():
                if self._executor is not None:
                    org = self._executor.submit(self._query, query, key).result()
                else:
                    org = self._query(query, key)
        except BackendError:
            if hit is None or hit.value is None:
                raise
            return hit.value
        ttl = self._ttl if org is not None else self._miss_ttl
        self._cache.put((kind, key), org, now + ttl)
        return org

    def by_submitter(self, username: str) -> Organisation | None:
        return self._lookup("submitter", username, find_by_submitter)

    def by_domain(self, domain: str) -> Organisation | None:
        return self._lookup("domain", domain, find_by_domain)

    def by_inbound_domain(self, domain: str) -> Organisation | None:
        """The organisation whose DOMAIN takes inbound mail (see find_by_inbound_domain)."""
        return self._lookup("inbound", domain, find_by_inbound_domain)
