"""Group commit: a message whose rows failed leaves no object behind, when that is certain.

The stack tests (tests/test_outage.py) show it through real PostgreSQL and
MinIO; these pin down which failures count as certain.
"""

from __future__ import annotations

import io
import uuid
from datetime import UTC, datetime
from typing import Any

import psycopg
import psycopg.errors
import pytest

from postkeep.milter.capture import StoredContent
from postkeep.milter.committer import GroupCommitter
from postkeep.storage.content.objects import MemoryObjectStore
from postkeep.storage.metadata.db import BackendError
from postkeep.storage.metadata.messages import CapturedMessage

pytestmark = pytest.mark.unit


class _Conn:
    def __init__(self, exc: BaseException) -> None:
        self.exc = exc

    def execute(self, sql: str, params: dict[str, Any]) -> None:
        raise self.exc


class _Db:
    """Like storage.metadata.db.Database.run: two attempts, driver errors named."""

    def __init__(self, exc: BaseException | None) -> None:
        self.exc = exc  # None: no connection at all (pool timeout)
        self.attempts = 0

    def run(self, work: Any) -> Any:
        for attempt in range(2):
            self.attempts += 1
            if self.exc is None:
                if attempt:
                    raise BackendError("postgres", "no connection within 3s")
                continue
            try:
                return work(_Conn(self.exc))
            except psycopg.OperationalError as exc:
                if attempt:
                    raise BackendError("postgres", str(exc)) from exc
        raise AssertionError("unreachable")


def _message() -> tuple[CapturedMessage, StoredContent]:
    mid = uuid.uuid4()
    now = datetime.now(UTC)
    m = CapturedMessage(mid, uuid.uuid4(), "d.example", "Q", "a@d.example", ("r@x",), 5,
                        b"\0" * 32, f"messages/{mid}.eml.zst", 5, now, now, now)
    return m, StoredContent(io.BytesIO(b"hello"), 5, 5, b"\0" * 32, 5)


def _commit_failing(exc: BaseException | None) -> MemoryObjectStore:
    store = MemoryObjectStore()
    db = _Db(exc)
    gc = GroupCommitter(db, store, workers=1, linger=0)  # type: ignore[arg-type]
    try:
        with pytest.raises(BackendError) as err:
            gc.commit(*_message())
    finally:
        gc.close()
    assert err.value.backend == "postgres"
    assert db.attempts == 2
    return store


@pytest.mark.parametrize("exc", [
    psycopg.errors.QueryCanceled("canceling statement due to statement timeout"),
    psycopg.errors.AdminShutdown("terminating connection due to administrator command"),
    None,  # never connected
], ids=["statement-timeout", "admin-shutdown", "no-connection"])
def test_rows_certainly_not_written_leave_no_object(exc: BaseException | None) -> None:
    assert _commit_failing(exc).objects == {}


def test_connection_lost_mid_statement_keeps_the_object() -> None:
    """The COMMIT may have reached PostgreSQL: a row may point at the object."""
    lost = psycopg.OperationalError("server closed the connection unexpectedly")
    assert len(_commit_failing(lost).objects) == 1


def test_a_failed_delete_still_answers_the_waiter() -> None:
    class NoDelete(MemoryObjectStore):
        def delete(self, key: str) -> None:
            raise BackendError("s3", "down")

    store = NoDelete()
    gc = GroupCommitter(_Db(psycopg.errors.QueryCanceled("timeout")), store,  # type: ignore[arg-type]
                        workers=1, linger=0)
    try:
        with pytest.raises(BackendError) as err:
            gc.commit(*_message())
    finally:
        gc.close()
    assert err.value.backend == "postgres"
    assert len(store.objects) == 1
