"""Unit tests of packs (storage/content/packs.py) and the group commit's pack path.

A batch of messages goes up in one PUT per organisation and class; each
message restores byte for byte from its range, plain, split (parts) or with a
dictionary; a pack key is never restored whole.
"""

from __future__ import annotations

import contextlib
import io
import threading
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest
import zstandard
from support import campaign
from test_dedup import _capture, _store, dictionary  # noqa: F401 (fixture)

from postkeep.milter.capture import StoredContent
from postkeep.milter.committer import GroupCommitter
from postkeep.storage.content import packing, packs, restore, sealing
from postkeep.storage.content.dictionaries import LoadedDictionary
from postkeep.storage.content.objects import MemoryObjectStore, message_key
from postkeep.storage.metadata.db import BackendError
from postkeep.storage.metadata.messages import CapturedMessage

pytestmark = pytest.mark.unit

NOW = datetime(2026, 12, 4, 12, 0, tzinfo=UTC)


class CountingStore(MemoryObjectStore):
    def __init__(self) -> None:
        super().__init__()
        self.puts = 0
        self.batch_puts = 0

    def put(self, key: str, data: Any, length: int) -> None:
        self.puts += 1
        super().put(key, data, length)

    def put_many(self, items: list[tuple[str, bytes]]) -> None:
        self.batch_puts += 1
        super().put_many(items)


class FakeConn:
    def __init__(self, db: FakeDb) -> None:
        self.db = db

    def execute(self, sql: str, params: Any = None) -> None:
        self.db.statements.append((sql, params))

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        yield


class FakeDb:
    def __init__(self) -> None:
        self.statements: list[tuple[str, Any]] = []

    def run(self, work: Any) -> Any:
        return work(FakeConn(self))

    def index(self) -> dict[uuid.UUID, packs.Location]:
        """message id -> Location from the message_packs INSERTs."""
        out = {}
        for sql, p in self.statements:
            if sql.startswith("INSERT INTO message_packs"):
                for mid, key, off, n, fmt in zip(p[0], p[2], p[3], p[4], p[5], strict=True):
                    out[mid] = packs.Location(key, off, n, fmt)
        return out


def _message(org: uuid.UUID, body: bytes, days: int = 90, direction: str = "outbound"
             ) -> tuple[CapturedMessage, StoredContent, bytes]:
    mid = uuid.uuid4()
    obj = zstandard.ZstdCompressor().compress(body)
    m = CapturedMessage(mid, org, "d.example", "Q", "a@d.example", ("r@x",), len(body),
                        b"\0" * 32, message_key(str(org), str(mid), NOW, days), len(obj),
                        NOW, NOW + timedelta(days=days), NOW + timedelta(days=days),
                        direction=direction)
    return m, StoredContent(io.BytesIO(obj), len(obj), len(body), b"\0" * 32, len(body)), body


def _commit_all(gc: GroupCommitter, items: list[tuple[CapturedMessage, StoredContent, bytes]]
                ) -> list[BaseException | None]:
    errors: list[BaseException | None] = [None] * len(items)
    start = threading.Barrier(len(items))

    def one(i: int) -> None:
        start.wait()
        try:
            gc.commit(items[i][0], items[i][1])
        except BaseException as exc:
            errors[i] = exc

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(items))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    return errors


def test_a_batch_of_one_organisation_is_one_put_and_every_message_restores() -> None:
    store, db = CountingStore(), FakeDb()
    # One worker and a long linger: the 12 messages form one batch.
    gc = GroupCommitter(db, store, workers=1, linger=2.0, max_batch=12,  # type: ignore[arg-type]
                        layout="packs")
    org = uuid.uuid4()
    items = [_message(org, campaign.message(i, "d.example")) for i in range(12)]
    assert _commit_all(gc, items) == [None] * 12
    gc.close()
    assert store.puts == 1 and store.batch_puts == 0
    assert len(store.objects) == 1
    (key,) = store.objects
    assert packs.is_pack_key(key) and key.startswith(f"messages/90d/{org}/2026/12/04/p20270304-")
    index = db.index()
    assert set(index) == {m.id for m, _, _ in items}
    for m, _, body in items:
        assert b"".join(restore.restore(store, key, where=index[m.id])) == body


def test_packs_split_by_organisation_and_class_and_inbound_stays_alone() -> None:
    store, db = CountingStore(), FakeDb()
    gc = GroupCommitter(db, store, workers=1, linger=2.0, max_batch=8,  # type: ignore[arg-type]
                        layout="packs")
    a, b = uuid.uuid4(), uuid.uuid4()
    items = [_message(a, b"a1" * 50), _message(a, b"a2" * 50), _message(b, b"b1" * 50),
             _message(a, b"a7" * 50, days=7), _message(a, b"in" * 50, direction="inbound")]
    assert _commit_all(gc, items) == [None] * 5
    gc.close()
    pack_keys = {k for k in store.objects if packs.is_pack_key(k)}
    assert len(pack_keys) == 3  # (a, 90d), (b, 90d), (a, 7d)
    assert items[4][0].object_key in store.objects  # inbound: its own object
    index = db.index()
    assert items[4][0].id not in index
    assert index[items[0][0].id].pack_key == index[items[1][0].id].pack_key
    for m, _, body in items[:4]:
        where = index[m.id]
        assert b"".join(restore.restore(store, where.pack_key, where=where)) == body


def test_failed_pack_put_fails_its_messages_and_writes_no_rows() -> None:
    class Broken(MemoryObjectStore):
        def put(self, key: str, data: Any, length: int) -> None:
            raise BackendError("s3", "down")

    db = FakeDb()
    gc = GroupCommitter(db, Broken(), workers=1, linger=0.5,  # type: ignore[arg-type]
                        layout="packs")
    errors = _commit_all(gc, [_message(uuid.uuid4(), b"x" * 100) for _ in range(3)])
    gc.close()
    assert all(isinstance(e, BackendError) and e.backend == "s3" for e in errors)
    assert db.statements == []


def test_split_and_dictionary_messages_restore_from_a_pack(
        dictionary: tuple[LoadedDictionary, bytes]) -> None:  # noqa: F811
    loaded, raw = dictionary
    store = MemoryObjectStore()
    store.objects[loaded.ref.key] = raw
    pdf = campaign.fake_pdf(60_000)
    bodies = [campaign.message(1, "shop.example", pdf=pdf), campaign.message(2, "shop.example"),
              campaign.message(3, "shop.example")]
    contents = [_capture(bodies[0]), _capture(bodies[1], dictionary=loaded, dict_max=65536),
                _capture(bodies[2])]
    org = uuid.uuid4()
    entries = []
    for c in contents:
        key = _store(c, store)  # parts stored, the sealed object at KEY
        mid = uuid.uuid4()
        entries.append(packs.Entry(mid, org, message_key(str(org), str(mid), NOW, 30),
                                   NOW + timedelta(days=30), store.objects.pop(key)))
    (pack,) = packs.build(entries)
    store.objects[pack.key] = pack.body.getvalue()
    for e, body in zip(entries, bodies, strict=True):
        assert b"".join(restore.restore(store, pack.key, where=pack.members[e.message_id],
                                        chunk_size=1000)) == body


def test_a_pack_is_never_restored_whole() -> None:
    store = MemoryObjectStore()
    org = uuid.uuid4()
    e = packs.Entry(uuid.uuid4(), org, message_key(str(org), "x", NOW, 30), NOW,
                    zstandard.ZstdCompressor().compress(b"secret"))
    (pack,) = packs.build([e, e.__class__(uuid.uuid4(), org, e.message_key, NOW, e.data)])
    store.objects[pack.key] = pack.body.getvalue()
    with pytest.raises(BackendError, match="is a pack"):
        b"".join(restore.restore(store, pack.key))


def test_pack_groups_by_expiry_day_and_names_it() -> None:
    org = uuid.uuid4()
    key = message_key(str(org), "m", NOW, 30)
    day1 = NOW + timedelta(days=30)
    es = [packs.Entry(uuid.uuid4(), org, key, day1, b"a"),
          packs.Entry(uuid.uuid4(), org, key, day1 + timedelta(hours=1), b"b"),
          packs.Entry(uuid.uuid4(), org, key, day1 + timedelta(days=1), b"c")]
    built = packs.build(es)
    assert len(built) == 2
    first = next(p for p in built if len(p.members) == 2)
    assert first.expires_at == day1 + timedelta(hours=1)  # the latest member's stamp
    assert f"/p{day1:%Y%m%d}-" in first.key
    assert packs.seal_entry(None, b"z") == (packs.FORMAT_PLAIN, b"z")


def test_object_lock_writes_one_object_per_message() -> None:
    from postkeep.config import S3Config

    assert S3Config().effective_layout() == "packs"
    assert S3Config(layout="objects").effective_layout() == "objects"
    assert S3Config(object_lock="compliance").effective_layout() == "objects"
    # Sealed (storage.master_key): erasure destroys keys, so packs under lock too.
    assert S3Config(object_lock="compliance").effective_layout(sealed=True) == "packs"


class KeyringConn:
    """org_keys as a dict; an organisation in BROKEN fails like a lost connection."""

    def __init__(self, rows: dict[uuid.UUID, bytes], broken: set[uuid.UUID]) -> None:
        self.rows, self.broken = rows, broken

    def execute(self, sql: str, params: Any = None) -> Any:
        org = params[0]
        if org in self.broken:
            raise psycopg.OperationalError("server closed the connection unexpectedly")
        if sql.startswith("INSERT INTO org_keys"):
            self.rows.setdefault(org, params[1])
            return None
        row = (self.rows[org], "master id") if org in self.rows else None
        return type("R", (), {"fetchone": lambda _self: row})()


def test_a_key_that_cannot_be_read_fails_only_its_organisations_messages() -> None:
    good, bad = uuid.uuid4(), uuid.uuid4()
    rows: dict[uuid.UUID, bytes] = {}

    class Db:
        def run(self, work: Any) -> Any:
            return work(KeyringConn(rows, {bad}))

    store = CountingStore()
    key = message_key(str(good), "m", NOW, 30)
    entries = [packs.Entry(uuid.uuid4(), org, key.replace(str(good), str(org)), NOW, b"z" * 40)
               for org in (good, bad, good)]
    with sealing.using(b"k" * 32):
        stored, failed = packing.store_packs(Db(), store, entries)  # type: ignore[arg-type]
    assert set(failed) == {entries[1].message_id}
    assert "server closed the connection" in str(failed[entries[1].message_id])
    (pack,) = stored
    assert set(pack.members) == {entries[0].message_id, entries[2].message_id}
    assert store.puts == 1 and len(pack.keys) == 2  # sealed, each under its own key
