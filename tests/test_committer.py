"""Unit tests of group commit with an in-memory store and a fake database."""

from __future__ import annotations

import io
import threading
import uuid
from datetime import UTC, datetime
from typing import Any

import pytest
from support.wait import finishes, until

from postkeep.milter.capture import StoredContent
from postkeep.milter.committer import GroupCommitter
from postkeep.storage.content.objects import MemoryObjectStore
from postkeep.storage.metadata.db import BackendError
from postkeep.storage.metadata.messages import CapturedMessage

pytestmark = pytest.mark.unit


class FakeConn:
    def __init__(self, db: FakeDb) -> None:
        self.db = db

    def execute(self, sql: str, params: dict[str, Any]) -> None:
        if self.db.fail:
            raise BackendError("postgres", "down")
        self.db.batches.append(list(params["id"]))


class FakeDb:
    def __init__(self) -> None:
        self.batches: list[list[uuid.UUID]] = []
        self.fail = False

    def run(self, work: Any) -> Any:
        return work(FakeConn(self))


def _message(size: int = 100) -> tuple[CapturedMessage, StoredContent]:
    mid = uuid.uuid4()
    now = datetime.now(UTC)
    body = bytes([mid.bytes[0]]) * size
    m = CapturedMessage(mid, uuid.uuid4(), "d.example", "Q", "a@d.example", ("r@x",), size,
                        b"\0" * 32, f"messages/{mid}.eml.zst", size, now, now, now)
    return m, StoredContent(io.BytesIO(body), size, size, b"\0" * 32, size)


def _commit_concurrently(gc: GroupCommitter, items: list[tuple[CapturedMessage, StoredContent]]
                         ) -> list[BaseException | None]:
    errors: list[BaseException | None] = [None] * len(items)

    def one(i: int) -> None:
        try:
            gc.commit(*items[i])
        except BaseException as exc:
            errors[i] = exc

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(items))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    return errors


def test_concurrent_messages_share_batches_and_all_land() -> None:
    store, db = MemoryObjectStore(), FakeDb()
    gc = GroupCommitter(db, store, workers=2, linger=0.05)  # type: ignore[arg-type]
    items = [_message() for _ in range(30)] + [_message(300_000)]  # one large
    assert _commit_concurrently(gc, items) == [None] * len(items)
    gc.close()
    assert set(store.objects) == {m.object_key for m, _ in items}
    for m, _ in items:
        assert store.objects[m.object_key] == bytes([m.id.bytes[0]]) * m.size
    rows = [i for b in db.batches for i in b]
    assert sorted(rows) == sorted(m.id for m, _ in items)
    assert len(db.batches) < len(items)  # batched, not one INSERT each


def test_store_failure_fails_every_message_of_the_batch() -> None:
    class Broken(MemoryObjectStore):
        def put_many(self, items: list[tuple[str, bytes]]) -> None:
            raise BackendError("s3", "down")

        def put(self, key: str, data: Any, length: int) -> None:
            raise BackendError("s3", "down")

    db = FakeDb()
    gc = GroupCommitter(db, Broken(), linger=0.02)  # type: ignore[arg-type]
    errors = _commit_concurrently(gc, [_message() for _ in range(5)])
    gc.close()
    assert all(isinstance(e, BackendError) and e.backend == "s3" for e in errors)
    assert db.batches == []  # no rows for objects that are not there


def test_row_failure_is_reported_to_every_waiter() -> None:
    store, db = MemoryObjectStore(), FakeDb()
    db.fail = True
    gc = GroupCommitter(db, store, linger=0.02)  # type: ignore[arg-type]
    errors = _commit_concurrently(gc, [_message() for _ in range(4)])
    gc.close()
    assert all(isinstance(e, BackendError) and e.backend == "postgres" for e in errors)


def test_rows_of_uploads_finished_meanwhile_share_one_insert() -> None:
    """While one INSERT runs, uploads go on; their rows then go in together."""

    class SlowFirstDb(FakeDb):
        def run(self, work: Any) -> Any:
            if not self.batches:
                release.wait(60)
            return super().run(work)

    class CountingStore(MemoryObjectStore):
        calls = 0

        def put_many(self, items: list[tuple[str, bytes]]) -> None:
            CountingStore.calls += 1
            super().put_many(items)

        def put(self, key: str, data: Any, length: int) -> None:
            CountingStore.calls += 1
            super().put(key, data, length)

    release = threading.Event()
    store, db = CountingStore(), SlowFirstDb()
    gc = GroupCommitter(db, store, workers=2, max_batch=2, linger=0)  # type: ignore[arg-type]
    items = [_message() for _ in range(12)]
    threads = [threading.Thread(target=gc.commit, args=item) for item in items]
    for t in threads:
        t.start()
    # Every object is stored (in batches of at most 2) while the first INSERT waits.
    until(lambda: len(store.objects) == len(items), "every object stored")
    release.set()
    for t in threads:
        t.join(10)
    gc.close()
    rows = [i for b in db.batches for i in b]
    assert sorted(rows) == sorted(m.id for m, _ in items)
    assert CountingStore.calls >= 6  # upload batches of at most two messages
    assert len(db.batches) <= 3  # the first INSERT, then whatever waited, together
    assert max(len(b) for b in db.batches) > 2


def test_while_postgres_is_down_one_batch_probes_and_the_others_fail_at_once() -> None:
    class HangingDownDb(FakeDb):
        hang = False
        probing = threading.Event()
        release = threading.Event()

        def run(self, work: Any) -> Any:
            if self.hang:  # a connect timeout, while the server is gone
                self.probing.set()
                self.release.wait(60)
            raise BackendError("postgres", "connection refused")

    db = HangingDownDb()
    gc = GroupCommitter(db, MemoryObjectStore(), workers=2, linger=0)  # type: ignore[arg-type]
    assert _commit_concurrently(gc, [_message()])[0] is not None  # now known to be down
    db.hang = True
    probe = threading.Thread(target=_commit_concurrently, args=(gc, [_message()]))
    probe.start()
    try:
        assert db.probing.wait(30), "the probe never reached PostgreSQL"
        # Answered while the probe still hangs: not queued behind it.
        with pytest.raises(BackendError) as err:
            finishes(lambda: gc.commit(*_message()), "a commit while another batch probes")
        assert probe.is_alive()
    finally:
        db.release.set()
    assert err.value.backend == "postgres"
    probe.join(30)
    gc.close()
