"""The outage spool's drain against the real row writer, PostgreSQL and MinIO.

tests/test_spool.py covers the entry format and the drain's steps without
services.  What it cannot prove is the claim the spool rests on: a drain
killed anywhere and run again stores each message exactly once.  That holds
only because `record_captures` is idempotent (ON CONFLICT DO NOTHING on the
message's id and metadata expiry) and a repeated put writes the same bytes
under the same key, so it is proven here with the drain's own row writer
(`record_with` over a `Database` pool, as postkeep-storage and `postkeep
spool drain` run it) on the stack's PostgreSQL, and objects in its MinIO:
one `messages` row, one row per recipient and the object byte for byte, for
every entry.  A row PostgreSQL itself refuses keeps its entry in the spool.
The same holds when the drain packs and seals as the group commit does
(`Packing`): each message indexed once, sealed, its key recorded.
"""

from __future__ import annotations

import io
import os
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, BinaryIO

import psycopg
import pytest
from conftest import TestOrg

from postkeep.config import Config
from postkeep.storage.content import packs, sealing
from postkeep.storage.content.objects import S3ObjectStore, message_key, read_all
from postkeep.storage.content.spool import Packing, RecordRows, Spool, drain, record_with
from postkeep.storage.metadata.db import Database
from postkeep.storage.metadata.messages import CapturedMessage, expiry_dates

pytestmark = pytest.mark.stack

RCPTS = ("r1@x.example", "r2@x.example")


class Crash(BaseException):
    """Stands for kill -9: not an Exception, so nothing in the drain catches it."""


class CrashingS3:
    """The stack's MinIO, "killed" once CRASH_AFTER objects have gone up."""

    def __init__(self, store: S3ObjectStore, batch: bool) -> None:
        self.store, self.batch = store, batch
        self.puts = 0
        self.crash_after: int | None = None

    def _room(self, n: int) -> int:
        """How many of the next N objects go up before the crash."""
        if self.crash_after is None:
            return n
        return max(0, min(n, self.crash_after - self.puts))

    def put(self, key: str, data: BinaryIO, length: int) -> None:
        if self._room(1) == 0:
            raise Crash()
        self.store.put(key, data, length)
        self.puts += 1

    def get(self, key: str) -> Iterator[bytes]:
        return self.store.get(key)

    def delete(self, key: str) -> None:
        self.store.delete(key)

    def can_batch(self) -> bool:
        return self.batch and self.store.can_batch()

    def put_many(self, items: list[tuple[str, bytes]]) -> None:
        room = self._room(len(items))
        if room:  # the part of the batch that landed before the crash
            self.store.put_many(items[:room])
            self.puts += room
        if room < len(items):
            raise Crash()


@pytest.fixture
def record(config: Config, _migrated: None) -> Iterator[RecordRows]:
    """The drain's real row writer on the stack's PostgreSQL."""
    database = Database(config.postgres)
    try:
        yield record_with(database)
    finally:
        database.close()


def _message(org: TestOrg, n: int, blob: bytes) -> CapturedMessage:
    created = datetime.now(UTC) + timedelta(milliseconds=n)
    # entries drain in name (id) order: N in the high bits keeps that the order made
    mid = uuid.UUID(int=(n + 1) << 80 | uuid.uuid4().int & ((1 << 80) - 1))
    content_at, metadata_at = expiry_dates(created, 7, 30)
    return CapturedMessage(
        id=mid, org_id=org.id, domain=org.domain, queue_id=f"Q{n:05d}",
        envelope_from=f"a@{org.domain}", recipients=RCPTS, size=len(blob),
        sha256=bytes(32), object_key=message_key(str(org.id), str(mid), created),
        compressed_size=len(blob), created_at=created, content_expires_at=content_at,
        metadata_expires_at=metadata_at, message_id_header=f"<{mid}@{org.domain}>",
        header_from=f"a@{org.domain}", subject=f"spooled {n}")


def _spool_some(spool: Spool, org: TestOrg, count: int) -> dict[uuid.UUID, CapturedMessage]:
    spooled = {}
    for n in range(count):
        blob = os.urandom(50 + n)
        m = _message(org, n, blob)
        spool.write(m, io.BytesIO(blob), "s3: down")
        spooled[m.id] = m
    return spooled


def _stored(db: psycopg.Connection, ids: Sequence[uuid.UUID]
            ) -> tuple[dict[uuid.UUID, int], dict[uuid.UUID, int]]:
    """Per message id: its `messages` rows, and its `message_recipients` rows."""
    rows = dict(db.execute("SELECT id, count(*) FROM messages WHERE id = ANY(%s) GROUP BY id",
                           (list(ids),)).fetchall())
    rcpts = dict(db.execute("SELECT message_id, count(*) FROM message_recipients"
                            " WHERE message_id = ANY(%s) GROUP BY message_id",
                            (list(ids),)).fetchall())
    return rows, rcpts


def _objects_of(spool: Spool) -> dict[uuid.UUID, bytes]:
    """The object bytes of every entry now in SPOOL, by message id."""
    out = {}
    for path in spool.entries():
        entry = spool.open_entry(path)
        with spool.object_stream(entry) as stream:
            out[entry.message.id] = stream.read()
    return out


def _killed_at(where: str, record: RecordRows, store: CrashingS3,
               monkeypatch: pytest.MonkeyPatch, puts: int) -> RecordRows:
    """The row writer of a drain killed at WHERE (the store crashing after
    PUTS puts, or Spool.remove at the fifth unlink, set up here too)."""
    if where == "during puts":
        store.crash_after = puts
    elif where == "before rows":
        def crash(*_rows: Any) -> None:
            raise Crash()

        return crash
    elif where == "after rows committed":  # the COMMIT went through, its reply never came
        calls = [0]

        def write(*rows: Any) -> None:
            record(*rows)
            calls[0] += 1
            if calls[0] == 2:
                raise Crash()

        return write
    elif where == "mid unlink":
        calls = [0]
        real = Spool.remove

        def remove(self: Spool, path: Path) -> None:
            calls[0] += 1
            if calls[0] == 5:
                raise Crash()
            real(self, path)

        monkeypatch.setattr(Spool, "remove", remove)
    return record


@pytest.mark.parametrize("batch", [True, False], ids=["batched puts", "single puts"])
@pytest.mark.parametrize("where", ["during puts", "before rows", "after rows committed",
                                   "mid unlink"])
def test_a_drain_killed_anywhere_and_rerun_stores_each_message_exactly_once(
        spool: Spool, record: RecordRows, db: psycopg.Connection, objects: S3ObjectStore,
        make_org: Callable[..., TestOrg], monkeypatch: pytest.MonkeyPatch,
        where: str, batch: bool) -> None:
    spooled = _spool_some(spool, make_org(), 40)
    blobs = _objects_of(spool)
    store = CrashingS3(objects, batch)
    write = _killed_at(where, record, store, monkeypatch, puts=20)
    with pytest.raises(Crash):
        drain(spool, store, write, batch_size=8, put_threads=1)
    monkeypatch.undo()
    left = len(spool.entries())
    assert 0 < left <= 40  # the kill left work to do
    store.crash_after = None
    result = drain(spool, store, record, batch_size=8)
    assert result.stopped is None and result.drained == left and spool.entries() == []
    rows, rcpts = _stored(db, list(spooled))
    assert rows == {mid: 1 for mid in spooled}  # one row each, none missing
    assert rcpts == {mid: len(RCPTS) for mid in spooled}
    for m in spooled.values():
        assert read_all(objects, m.object_key) == blobs[m.id]


def test_a_row_postgres_refuses_stays_spooled_and_the_rest_are_drained(
        spool: Spool, record: RecordRows, db: psycopg.Connection, objects: S3ObjectStore,
        make_org: Callable[..., TestOrg]) -> None:
    org = make_org()
    spooled = _spool_some(spool, org, 4)
    # An entry whose metadata expiry has no partition (spooled so long ago that
    # retention has dropped its week): PostgreSQL refuses the row.
    blob = os.urandom(80)
    bad = replace(_message(org, 9, blob), metadata_expires_at=datetime(2001, 1, 1, tzinfo=UTC),
                  content_expires_at=datetime(2001, 1, 1, tzinfo=UTC))
    spool.write(bad, io.BytesIO(blob), "s3: down")
    result = drain(spool, objects, record)
    assert (result.drained, result.rejected, result.stopped) == (4, 1, None)
    assert [p.name for p in spool.entries()] == [f"{bad.id}.spool"]
    rows, rcpts = _stored(db, [*spooled, bad.id])
    assert rows == {mid: 1 for mid in spooled}
    assert rcpts == {mid: len(RCPTS) for mid in spooled}
    # drained again, it is refused again, and nothing else changes
    again = drain(spool, objects, record)
    assert (again.drained, again.rejected) == (0, 1)
    assert _stored(db, [*spooled, bad.id]) == (rows, rcpts)


def test_a_spooled_reply_is_linked_to_what_was_sent_when_drained(
        spool: Spool, config: Config, _migrated: None, db: psycopg.Connection,
        objects: S3ObjectStore, make_org: Callable[..., TestOrg]) -> None:
    """Inbound mail captured during an outage keeps its link clues in the
    spool; the drain (as postkeep-storage and `postkeep spool drain` run it,
    with storage.reports.inbound.link_each) links it like a direct capture,
    and a drain run again changes nothing."""
    from postkeep.storage.metadata.inbound import ParentClues
    from postkeep.storage.metadata.messages import record_captures
    from postkeep.storage.reports.inbound import link_each

    org = make_org()
    sent = _message(org, 0, b"sent")
    record_captures(db, [sent])
    blob = b"Re: spooled 0"
    reply = replace(_message(org, 1, blob), direction="inbound", message_type="reply",
                    message_id_header=f"<reply-{uuid.uuid4().hex}@x.example>",
                    clues=ParentClues(message_ids=(str(sent.message_id_header),)))
    spool.write(reply, io.BytesIO(blob), "postgres: down")
    database = Database(config.postgres)
    try:
        for attempt in (1, 2):  # the second: a drain retried after its rows went in
            if attempt == 2:
                spool.write(reply, io.BytesIO(blob), "postgres: down")
            assert drain(spool, objects, record_with(database, link_each)).drained == 1
            row = db.execute("SELECT direction, message_type, parent_message_id FROM messages"
                             " WHERE id = %s", (reply.id,)).fetchall()
            assert row == [("inbound", "reply", sent.id)]
    finally:
        database.close()


@pytest.fixture
def packing(config: Config, _migrated: None) -> Iterator[Packing]:
    database = Database(config.postgres)
    try:
        yield Packing(database)
    finally:
        database.close()


@pytest.mark.parametrize("where", ["during puts", "before rows", "after rows committed",
                                   "mid unlink", "a row refused"])
def test_a_drain_into_sealed_packs_killed_anywhere_and_rerun_stores_each_message_once(
        spool: Spool, record: RecordRows, packing: Packing, db: psycopg.Connection,
        objects: S3ObjectStore, make_org: Callable[..., TestOrg],
        monkeypatch: pytest.MonkeyPatch, where: str) -> None:
    assert sealing.keyring() is not None  # the stack's content key: entries and packs sealed
    org = make_org()
    spooled = _spool_some(spool, org, 40)
    blobs = _objects_of(spool)
    store = CrashingS3(objects, False)
    bad = None
    # packs: one PUT per batch here
    write = _killed_at(where, record, store, monkeypatch, puts=2)
    if where == "a row refused":  # retried one by one: its pack's others recorded alone
        blob = os.urandom(80)
        bad = replace(_message(org, 3, blob),
                      metadata_expires_at=datetime(2001, 1, 1, tzinfo=UTC))
        spool.write(bad, io.BytesIO(blob), "s3: down")
        first = drain(spool, store, record, batch_size=8, packing=packing)
        assert (first.drained, first.rejected) == (40, 1)
        assert [p.name for p in spool.entries()] == [f"{bad.id}.spool"]
    else:
        with pytest.raises(Crash):
            drain(spool, store, write, batch_size=8, put_threads=1, packing=packing)
        monkeypatch.undo()
        left = len(spool.entries())
        assert 0 < left <= 40  # the kill left work to do
        store.crash_after = None
        result = drain(spool, store, record, batch_size=8, packing=packing)
        assert result.stopped is None and result.drained == left and spool.entries() == []
    rows, rcpts = _stored(db, list(spooled))
    assert rows == {mid: 1 for mid in spooled}  # one row each, none missing
    assert rcpts == {mid: len(RCPTS) for mid in spooled}
    index = dict(db.execute("SELECT message_id, format FROM message_packs"
                            " WHERE message_id = ANY(%s)", (list(spooled),)).fetchall())
    assert index == {mid: packs.FORMAT_SEALED for mid in spooled}  # indexed once, sealed
    for mid in spooled:
        where_ = packs.location(db, mid)
        assert where_ is not None
        key = db.execute("SELECT object_key FROM messages WHERE id = %s", (mid,)).fetchone()
        assert key == (where_.pack_key,)
        chunks = objects.get_range(where_.pack_key, where_.offset, where_.length)
        assert b"".join(packs.open_entry(where_.format, where_.pack_key, chunks, db,
                                         mid)) == blobs[mid]
    if bad is not None:
        assert _stored(db, [bad.id]) == ({}, {})
        n = db.execute("SELECT sum(messages) FROM packs WHERE object_key IN (SELECT pack_key"
                       " FROM message_packs WHERE message_id = ANY(%s))",
                       (list(spooled),)).fetchone()
        assert n == (40,)  # counted member by member, the refused one not
