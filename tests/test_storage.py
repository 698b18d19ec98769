"""The shared data layer against the real PostgreSQL and MinIO of the stack.

Unit tests cover the pure pieces (expiry stamping, content decompression
across frames, the reader's filter); stack tests check what operators rely
on: migrations that can be re-run, captures that read back unchanged,
content the milter stored (sent through Postfix, never written by the test)
restoring to what the next hop received, unlimited metadata in the
partition that is never dropped, and row-level security that keeps one
organisation's dashboard out of another's messages.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import psycopg
import pytest
from conftest import StoreMessage, TestOrg, act_as, dashboard_role, zstd_frames
from support.captured import awkward_message, send_captured
from support.stack import Stack

from postkeep.storage.content import container, packs, restore
from postkeep.storage.content.objects import MemoryObjectStore, S3ObjectStore, read_all
from postkeep.storage.metadata import messages, migrate
from postkeep.storage.metadata.db import BackendError

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)

# --- unit: expiry_dates -----------------------------------------------------


@pytest.mark.unit
def test_expiry_dates_stamps_tier_retention() -> None:
    assert messages.expiry_dates(T0, 7, 30) == (T0 + timedelta(days=7), T0 + timedelta(days=30))


@pytest.mark.unit
def test_expiry_dates_unlimited_metadata_is_the_sentinel() -> None:
    content_at, metadata_at = messages.expiry_dates(T0, 365, None)
    assert content_at == T0 + timedelta(days=365)
    assert metadata_at == messages.UNLIMITED == datetime(9999, 12, 31, tzinfo=UTC)


@pytest.mark.unit
def test_expiry_dates_metadata_never_before_content() -> None:
    content_at, metadata_at = messages.expiry_dates(T0, 90, 30)
    assert metadata_at == content_at == T0 + timedelta(days=90)


@pytest.mark.unit
def test_content_available_flips_at_content_expiry() -> None:
    row = _row(content_expires_at=T0)
    assert messages.content_available(row, T0 - timedelta(seconds=1))
    assert not messages.content_available(row, T0)


# --- unit: content restore --------------------------------------------------


@pytest.mark.unit
def test_decompress_reads_across_frames_in_small_chunks() -> None:
    headers = b"From: a@example.com\r\nSubject: x\r\n\r\n"
    body = bytes(range(256)) * 4096  # 1 MiB, every byte value
    blob = zstd_frames([headers, body])
    pieces = [blob[i : i + 1000] for i in range(0, len(blob), 1000)]
    out = list(restore.decompress_stream(pieces, chunk_size=4096))
    assert b"".join(out) == headers + body
    assert max(len(c) for c in out) <= 4096  # streamed, never the whole message at once


@pytest.mark.unit
def test_restore_from_store_and_garbage_is_a_backend_error() -> None:
    store = MemoryObjectStore()
    store.objects["k"] = zstd_frames([b"a\r\n", b"", b"b\r\n"])
    assert b"".join(restore.restore(store, "k")) == b"a\r\nb\r\n"
    store.objects["bad"] = b"not zstd at all"
    with pytest.raises(BackendError, match="s3: corrupt zstd"):
        b"".join(restore.restore(store, "bad"))


@pytest.mark.unit
def test_the_filter_is_one_json_parameter_of_the_search_function() -> None:
    oid = uuid.uuid4()
    sql, params = messages.search_query(
        messages.MessageFilter(oid, "s@x.test", "r@y.test", T0, limit=5))
    assert "FROM search_messages(%s::jsonb) m" in sql and sql.count("%s") == len(params) == 1
    assert json.loads(str(params[0])) == {"org_id": str(oid), "sender": "s@x.test",
                                          "recipient": "r@y.test", "since": T0.isoformat(),
                                          "limit": 5}


# --- stack: migrations and partitions ---------------------------------------


@pytest.mark.stack
def test_migrations_apply_once_and_rerun_is_a_no_op(db: psycopg.Connection) -> None:
    assert migrate.apply_migrations(db) == []  # the `db` fixture already migrated
    assert migrate.apply_migrations(db) == []
    versions = [r[0] for r in db.execute("SELECT version FROM schema_migrations ORDER BY 1")]
    assert versions == [m.version for m in migrate.available_migrations()]


@pytest.mark.stack
def test_ensure_partitions_is_idempotent_and_covers_retention(db: psycopg.Connection) -> None:
    migrate.ensure_partitions(db)
    assert migrate.ensure_partitions(db) == 0
    names = {
        r[0]
        for r in db.execute(
            "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid"
            " WHERE i.inhparent = 'messages'::regclass"
        )
    }
    assert "messages_unlimited" in names
    # a message captured now on the longest finite tier (pro, 365 days) has a home
    far = datetime.now(UTC) + timedelta(days=365)
    assert f"messages_e{far:%G}w{far:%V}" in names


# --- stack: capture and read back -------------------------------------------


@pytest.mark.stack
def test_record_capture_reads_back_unchanged(
    db: psycopg.Connection, make_org: Callable[..., TestOrg], store_message: StoreMessage
) -> None:
    org = make_org("basic")
    m = store_message(
        org, recipients=("b@example.net", "a@example.net"), content_days=30, metadata_days=90
    )
    detail = messages.get_message(db, m.id)
    assert detail is not None
    row = detail.message
    assert (row.id, row.org_id, row.domain, row.queue_id) == (m.id, m.org_id, m.domain, m.queue_id)
    assert (row.envelope_from, row.header_from, row.subject) == (
        m.envelope_from, m.header_from, m.subject,
    )
    assert (row.size, row.sha256, row.object_key, row.compressed_size) == (
        m.size, m.sha256, m.object_key, m.compressed_size,
    )
    assert row.message_id_header == m.message_id_header
    assert row.created_at == m.created_at
    assert row.content_expires_at == m.content_expires_at
    assert row.metadata_expires_at == m.metadata_expires_at
    assert (row.status, row.recipient_count, row.direction) == ("queued", 2, "outbound")
    assert row.accepted_at is not None
    assert [r.recipient for r in detail.recipients] == ["a@example.net", "b@example.net"]
    assert all(r.status == "queued" and r.dsn_status is None for r in detail.recipients)
    listed = messages.list_messages(db, messages.MessageFilter(org_id=org.id))
    assert listed == [row]


@pytest.mark.stack
@pytest.mark.parametrize("attachment", [0, 300_000], ids=["plain object", "container"])
def test_content_the_milter_stored_restores_exactly(
    stack: Stack, objects: S3ObjectStore, make_org: Callable[..., TestOrg], attachment: int
) -> None:
    """Objects written by the real capture path (through Postfix), not by the test:
    restore must give back what the next hop received, whichever format the
    milter chose (plain zstd frames; a container whose large part is an object
    of its own)."""
    org = make_org()
    token = uuid.uuid4().hex
    sender = f"s@{org.domain}"
    m = send_captured(stack, sender, awkward_message(sender, token, os.urandom(attachment)),
                      token)
    magic = container.MAGIC if attachment else b"\x28\xb5\x2f\xfd"  # zstd frame magic
    with stack.connect() as conn:  # a small message is an entry of a pack (s3.layout)
        where = packs.location(conn, m.id)
        if where is not None:  # sealed under its own key (storage/content/sealing.py)
            head = b"".join(packs.open_entry(where.format, m.object_key, objects.get_range(
                m.object_key, where.offset, where.length), conn, m.id))[:4]
        else:
            head = read_all(objects, m.object_key)[:4]
        restored = b"".join(restore.restore(objects, m.object_key, chunk_size=4096,
                                            where=where, conn=conn, message_id=m.id))
    assert head == magic
    assert hashlib.sha256(restored).digest() == m.sha256
    assert restored == m.delivered


@pytest.mark.stack
def test_large_objects_stream_up_whole_and_a_short_stream_fails(objects: S3ObjectStore) -> None:
    """Past STREAM_ABOVE an object goes up in one streamed PUT (nothing buffered)."""
    import io
    import os

    key = f"test/streamed-{uuid.uuid4().hex}"
    data = os.urandom(objects.STREAM_ABOVE * 3 + 12345)
    objects.put(key, io.BufferedReader(io.BytesIO(data)), len(data))  # type: ignore[arg-type]
    assert read_all(objects, key) == data
    # a stream that ends before the announced length is refused, and nothing is stored
    short = f"test/short-{uuid.uuid4().hex}"
    with pytest.raises(BackendError, match=f"put {short}"):
        objects.put(short, io.BytesIO(data[:-10]), len(data))
    with pytest.raises(BackendError):
        read_all(objects, short)
    objects.delete(key)


@pytest.mark.stack
def test_unlimited_metadata_lands_in_the_unlimited_partition(
    db: psycopg.Connection, make_org: Callable[..., TestOrg], store_message: StoreMessage
) -> None:
    org = make_org("enterprise")
    m = store_message(org, content_days=365, metadata_days=None)
    assert m.metadata_expires_at == messages.UNLIMITED
    part = db.execute(
        "SELECT tableoid::regclass::text FROM messages WHERE id = %s", (m.id,)
    ).fetchone()
    rparts = db.execute(
        "SELECT DISTINCT tableoid::regclass::text FROM message_recipients WHERE message_id = %s",
        (m.id,),
    ).fetchall()
    assert part == ("messages_unlimited",)
    assert rparts == [("message_recipients_unlimited",)]


@pytest.mark.stack
def test_finite_metadata_lands_in_its_weekly_partition(
    db: psycopg.Connection, make_org: Callable[..., TestOrg], store_message: StoreMessage
) -> None:
    m = store_message(make_org("free"), content_days=7, metadata_days=30)
    part = db.execute(
        "SELECT tableoid::regclass::text FROM messages WHERE id = %s", (m.id,)
    ).fetchone()
    when = m.metadata_expires_at
    assert part == (f"messages_e{when:%G}w{when:%V}",)


# --- stack: row-level security ----------------------------------------------


@pytest.mark.stack
def test_dashboard_role_sees_only_its_organisation(
    db: psycopg.Connection, make_org: Callable[..., TestOrg], store_message: StoreMessage
) -> None:
    mine, theirs = make_org(), make_org()
    m_mine = store_message(mine)
    m_theirs = store_message(theirs)
    with dashboard_role(db, "messages, message_recipients, domains") as role:
        with db.transaction():
            act_as(db, role, mine.id)
            seen = {r[0] for r in db.execute("SELECT id FROM messages")}
            seen_rcpt = {r[0] for r in db.execute("SELECT message_id FROM message_recipients")}
            domains = {r[0] for r in db.execute("SELECT domain FROM domains")}
            direct = db.execute("SELECT id FROM messages WHERE id = %s", (m_theirs.id,)).fetchall()
        assert seen == {m_mine.id}
        assert seen_rcpt == {m_mine.id}
        assert domains == {mine.domain}
        assert direct == []
        with db.transaction():
            act_as(db, role)
            unset = db.execute("SELECT count(*) FROM messages").fetchone()
        assert unset == (0,)  # no organisation set: nothing visible


# --- helpers ----------------------------------------------------------------


def _row(**overrides: object) -> messages.MessageRow:
    """A MessageRow with plausible values, for pure tests."""
    values: dict[str, object] = dict(
        id=uuid.uuid4(), org_id=uuid.uuid4(), domain="x.test", direction="outbound",
        queue_id="ABC", message_id_header=None, envelope_from="a@x.test", header_from=None,
        subject=None, size=1, object_key="k", compressed_size=1, sha256=b"\0" * 32,
        content_expires_at=T0, metadata_expires_at=T0, status="queued", recipient_count=1,
        created_at=T0, accepted_at=None,
    )
    values.update(overrides)
    return messages.MessageRow(**values)  # type: ignore[arg-type]

