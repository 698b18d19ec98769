"""Helpers for retention tests: past weeks, messages stamped into them, counts.

A test that wants rows to expire cannot wait 30 days, and must never make
the shared test database's live partitions expire (other tests capture into
them).  So it takes a week of its own far in the past (`PastWeek`), creates
that week's partition pair as 0001's ensure_partitions() would, and stores
messages whose stamps fall in it: dropping it touches nothing else.
"""

from __future__ import annotations

import hashlib
import io
import random
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import psycopg
import zstandard
from psycopg import sql

from postkeep.storage.content.objects import S3ObjectStore, message_key
from postkeep.storage.lifecycle import holds
from postkeep.storage.metadata import legal_holds, messages


@dataclass(frozen=True)
class PastWeek:
    """A week (Monday 00:00 UTC to the next) with its two partitions."""

    monday: datetime
    messages: str
    recipients: str

    @property
    def end(self) -> datetime:
        return self.monday + timedelta(days=7)


def past_week(conn: psycopg.Connection) -> PastWeek:
    """A fresh week between 1990 and 2010 whose partitions are created now."""
    while True:
        monday = datetime(1990, 1, 1, tzinfo=UTC) + timedelta(weeks=random.randrange(1040))
        monday -= timedelta(days=monday.weekday())
        tag = f"{monday:%G}w{monday:%V}"
        names = (f"messages_e{tag}", f"message_recipients_e{tag}")
        row = conn.execute("SELECT to_regclass(%s), to_regclass(%s)", names).fetchone()
        if row == (None, None):
            break
    # Every table partitioned by metadata_expires_at (recipient_events too).
    for parent in ("messages", *holds.child_tables(conn)):
        conn.execute(sql.SQL("CREATE TABLE {} PARTITION OF {} FOR VALUES FROM ({}) TO ({})")
                     .format(sql.Identifier(f"{parent}_e{tag}"), sql.Identifier(parent),
                             sql.Literal(monday), sql.Literal(monday + timedelta(days=7))))
    return PastWeek(monday, *names)


def exists(conn: psycopg.Connection, table: str) -> bool:
    row = conn.execute("SELECT to_regclass(%s)", (table,)).fetchone()
    return row is not None and row[0] is not None


def put_message(
    conn: psycopg.Connection, objects: S3ObjectStore, org_id: uuid.UUID, domain: str,
    week: PastWeek | None = None, *, created: datetime | None = None,
    content_days: int = 7, metadata_days: int | None = 30,
    recipients: Sequence[tuple[str, str]] = (("rcpt@example.net", "delivered"),),
    sender: str | None = None, subject: str = "hello", body: bytes = b"body\r\n",
    classed: bool = True, held: bool = False,
) -> messages.CapturedMessage:
    """Store one message as the capture path would, recipients with given statuses.

    With WEEK, `created` is chosen so the metadata stamp (created +
    metadata_days) falls in that week, a day after its Monday.
    """
    if created is None:
        assert week is not None and metadata_days is not None
        created = week.monday + timedelta(days=1) - timedelta(days=metadata_days)
    mid = uuid.uuid4()
    sender = sender or f"sender@{domain}"
    raw = (f"From: {sender}\r\nSubject: {subject}\r\n\r\n").encode() + body
    blob = zstandard.ZstdCompressor().compress(raw)
    key = message_key(str(org_id), str(mid), created,
                      content_days=content_days if classed else None, held=held)
    objects.put(key, io.BytesIO(blob), len(blob))
    content_at, metadata_at = messages.expiry_dates(created, content_days, metadata_days)
    m = messages.CapturedMessage(
        id=mid, org_id=org_id, domain=domain, queue_id=uuid.uuid4().hex[:10].upper(),
        envelope_from=sender, recipients=tuple(r for r, _ in recipients), size=len(raw),
        sha256=hashlib.sha256(raw).digest(), object_key=key, compressed_size=len(blob),
        created_at=created, content_expires_at=content_at, metadata_expires_at=metadata_at,
        message_id_header=f"<{mid}@{domain}>", header_from=sender, subject=subject,
    )
    with conn.transaction():
        messages.record_capture(conn, m)
        conn.execute(
            "UPDATE message_recipients r SET status = u.status FROM unnest(%s::text[],"
            " %s::text[]) AS u(rcpt, status) WHERE r.message_id = %s AND r.recipient = u.rcpt"
            " AND r.metadata_expires_at = %s",
            ([r for r, _ in recipients], [st for _, st in recipients], mid, metadata_at))
    return m


def stats_row(conn: psycopg.Connection, org_id: uuid.UUID, day: object) -> dict[str, int]:
    row = conn.execute(
        "SELECT messages, sent, delivered, deferred, bounced, expired, bytes, stored_bytes"
        " FROM delivery_stats_daily WHERE org_id = %s AND day = %s", (org_id, day)).fetchone()
    assert row is not None, f"no statistics row for org {org_id} day {day}"
    keys = ("messages", "sent", "delivered", "deferred", "bounced", "expired", "bytes",
            "stored_bytes")
    return dict(zip(keys, (int(v) for v in row), strict=True))


def audit_rows(conn: psycopg.Connection, action: str, target: str | None = None,
               since: datetime | None = None) -> list[tuple[int, dict[str, object]]]:
    """(count, detail) of audit rows for ACTION on TARGET, written at or after SINCE.

    Weeks are reused across test runs on one database: pass the test's start.
    """
    rows = conn.execute(
        "SELECT count, detail FROM retention_audit WHERE action = %s"
        " AND (%s::text IS NULL OR target = %s) AND at >= %s ORDER BY id",
        (action, target, target, since or datetime(1970, 1, 1, tzinfo=UTC))
    ).fetchall()
    return [(int(r[0]), r[1]) for r in rows]


@contextmanager
def active_hold(conn: psycopg.Connection, org_id: uuid.UUID,
                reason: str) -> Iterator[legal_holds.Hold]:
    """An organisation-wide legal hold, released on the way out if the test did
    not (a hold left active would change what later tests' runs protect)."""
    hold = legal_holds.add_hold(conn, org_id, None, reason)
    try:
        yield hold
    finally:
        now = legal_holds.get_hold(conn, hold.id)
        if now is not None and now.released_at is None:
            legal_holds.release_hold(conn, hold.id)
