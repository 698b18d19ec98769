"""PostgreSQL connections: one psycopg 3 pool per process.

The milter calls from many libmilter threads at once, so writers borrow a
connection for one transaction and give it back.  Failures surface as
`BackendError` with the backend named, so callers can tempfail with a reason
instead of guessing from driver exceptions.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from typing import TypeVar

import psycopg
from psycopg_pool import ConnectionPool, PoolTimeout

from postkeep.config import PostgresConfig

log = logging.getLogger("postkeep.storage")
T = TypeVar("T")

# psycopg_pool replaces a lost connection in the background, backing off
# 1, 2, 4, 8... s between attempts for up to `reconnect_timeout` (5 min by
# default): after a failover the new primary waited for the next backed-off
# attempt, seconds after it was up (measured: ~5 s of extra spooling behind
# Patroni's takeover).  With a short one the background attempts stop soon,
# and each caller that needs a connection makes the pool try again at once
# (it grows on demand), so the first request after the promotion finds it.
RECONNECT_TIMEOUT_SECONDS = 1.0
READ_ONLY_REASON = "the server is read-only (a standby, or a demoted primary): connection dropped"


class BackendError(Exception):
    """A backend (postgres or s3) failed or timed out; `backend` names which."""

    def __init__(self, backend: str, reason: str) -> None:
        super().__init__(f"{backend}: {reason}")
        self.backend = backend
        self.reason = reason


class Database:
    """A lazily opened connection pool for one PostgreSQL database."""

    def __init__(self, cfg: PostgresConfig, *, min_size: int | None = None) -> None:
        self.cfg = cfg
        self._pool = ConnectionPool(
            cfg.conninfo(),
            min_size=min_size if min_size is not None else cfg.pool_min,
            max_size=max(cfg.pool_max, min_size or 0),
            timeout=cfg.connect_timeout_seconds,
            open=False,
            reconnect_timeout=RECONNECT_TIMEOUT_SECONDS,
            # Autocommit: single-statement writes cost one round trip, no
            # BEGIN/COMMIT; multi-statement work uses transaction().
            kwargs={"autocommit": True},
            name="postkeep",
        )
        self._opened = False

    def open(self) -> None:
        if not self._opened:
            self._pool.open(wait=False)
            self._opened = True

    def close(self) -> None:
        if self._opened:
            self._pool.close()
            self._opened = False

    def recover(self) -> None:
        """After a connection failure: drop every broken idle connection now.

        A PostgreSQL restart breaks all pooled connections at once; without
        this each of them would fail one more message before being replaced.
        """
        if self._opened:
            with suppress(psycopg.Error):
                self._pool.check()

    def run(self, work: Callable[[psycopg.Connection], T]) -> T:
        """WORK on an autocommit connection; once more after recover() if it failed.

        WORK must be idempotent: the first attempt may have committed before
        its connection broke.
        """
        try:
            with self.connection() as conn:
                return work(conn)
        except BackendError as exc:
            log.info("postgres failed (%s); retrying once on a fresh connection", exc.reason)
            self.recover()
            with self.connection() as conn:
                return work(conn)

    @contextmanager
    def connection(self) -> Iterator[psycopg.Connection]:
        """An autocommit connection from the pool: each statement stands alone.

        Any driver or pool failure is re-raised as BackendError('postgres').
        """
        self.open()
        with self._errors_named(), self._pool.connection() as conn, dropped_if_read_only(conn):
            yield conn

    @contextmanager
    def transaction(self) -> Iterator[psycopg.Connection]:
        """A connection inside one transaction; committed on success.

        Any driver or pool failure is re-raised as BackendError('postgres').
        """
        self.open()
        with (self._errors_named(), self._pool.connection() as conn, dropped_if_read_only(conn),
              conn.transaction()):
            yield conn

    @contextmanager
    def _errors_named(self) -> Iterator[None]:
        """Pool and driver failures as BackendError('postgres', reason)."""
        try:
            yield
        except PoolTimeout as exc:
            raise BackendError("postgres", f"no connection within "
                               f"{self.cfg.connect_timeout_seconds:g}s") from exc
        except psycopg.OperationalError as exc:
            raise BackendError("postgres", _first_line(exc)) from exc
        except psycopg.errors.ReadOnlySqlTransaction as exc:
            raise BackendError("postgres", READ_ONLY_REASON) from exc


@contextmanager
def dropped_if_read_only(conn: psycopg.Connection) -> Iterator[None]:
    """Close CONN if PostgreSQL refused a write as read-only, so the pool
    discards it instead of handing it out again.

    target_session_attrs=read-write is checked when a connection is made,
    never after: a connection to a server that turned read-only (a demoted
    primary, a standby reached some other way) would fail every write for as
    long as it lives.  The caller's retry (Database.run) takes a new one,
    which libpq makes to whichever host is read-write now.
    """
    try:
        yield
    except psycopg.errors.ReadOnlySqlTransaction:
        log.warning("postgres: %s", READ_ONLY_REASON)
        conn.close()
        raise


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def connect(cfg: PostgresConfig) -> psycopg.Connection:
    """One plain autocommit connection, for the CLI and migrations."""
    try:
        return psycopg.connect(cfg.conninfo(), autocommit=True)
    except psycopg.OperationalError as exc:
        raise BackendError("postgres", _first_line(exc)) from exc
