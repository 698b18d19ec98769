"""The `messages` and `message_recipients` tables: capture rows and readers.

`record_capture` writes one message row and one row per recipient in a
single statement, so both are visible together or not at all.  Expiry
dates are stamped here from the organisation's retention at capture time;
"unlimited" metadata is stamped as `UNLIMITED` (9999-12-31 UTC) and lands in
the partition kept forever.

Readers (`list_messages`, `get_message`) return frozen dataclasses, never
cursors or tuples, so the CLI and dashboards format plain values.  Whether
content is still available is derived from the stamped `content_expires_at`
at read time (`content_available`), never stored: expiring content must not
rewrite rows.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import psycopg
from psycopg.rows import class_row

UNLIMITED = datetime(9999, 12, 31, tzinfo=UTC)


def expiry_dates(
    created: datetime, content_days: int, metadata_days: int | None
) -> tuple[datetime, datetime]:
    """(content_expires_at, metadata_expires_at) for a message created now.

    Metadata never expires before content: readers need the row to say the
    content expired.
    """
    content = created + timedelta(days=content_days)
    if metadata_days is None:
        return content, UNLIMITED
    return content, max(content, created + timedelta(days=metadata_days))


@dataclass(frozen=True)
class CapturedMessage:
    """Everything the capture path records about one accepted message."""

    id: uuid.UUID
    org_id: uuid.UUID
    domain: str
    queue_id: str
    envelope_from: str
    recipients: tuple[str, ...]
    size: int
    sha256: bytes
    object_key: str
    compressed_size: int
    created_at: datetime
    content_expires_at: datetime
    metadata_expires_at: datetime
    message_id_header: str | None = None
    header_from: str | None = None
    subject: str | None = None
    direction: str = "outbound"
    extra: dict[str, str] = field(default_factory=dict)


# One statement, so one round trip and atomic even on an autocommit
# connection: the message row and every recipient row, or nothing.
_INSERT_CAPTURE = """
WITH msg AS (
    INSERT INTO messages (id, org_id, domain, direction, queue_id, message_id_header,
        envelope_from, header_from, subject, size, object_key, compressed_size, sha256,
        content_expires_at, metadata_expires_at, status, recipient_count, created_at,
        accepted_at)
    VALUES (%(id)s, %(org_id)s, %(domain)s, %(direction)s, %(queue_id)s, %(message_id)s,
        %(envelope_from)s, %(header_from)s, %(subject)s, %(size)s, %(object_key)s,
        %(compressed_size)s, %(sha256)s, %(content_exp)s, %(metadata_exp)s, 'queued',
        %(nrcpt)s, %(created)s, now())
    ON CONFLICT DO NOTHING
)
INSERT INTO message_recipients (message_id, org_id, recipient, status, metadata_expires_at,
    created_at, updated_at)
SELECT %(id)s, %(org_id)s, r, 'queued', %(metadata_exp)s, %(created)s, %(created)s
FROM unnest(%(recipients)s::text[]) AS r
ON CONFLICT DO NOTHING
"""


def record_capture(conn: psycopg.Connection, m: CapturedMessage) -> None:
    """Insert the message row and its recipient rows in one statement.

    Idempotent (ON CONFLICT DO NOTHING): a retry after a lost COMMIT reply
    neither fails nor duplicates.
    """
    conn.execute(
        _INSERT_CAPTURE,
        {
            "id": m.id, "org_id": m.org_id, "domain": m.domain, "direction": m.direction,
            "queue_id": m.queue_id, "message_id": m.message_id_header,
            "envelope_from": m.envelope_from, "header_from": m.header_from,
            "subject": m.subject, "size": m.size, "object_key": m.object_key,
            "compressed_size": m.compressed_size, "sha256": m.sha256,
            "content_exp": m.content_expires_at, "metadata_exp": m.metadata_expires_at,
            "nrcpt": len(m.recipients), "created": m.created_at,
            "recipients": list(m.recipients),
        },
    )


# --- readers ---------------------------------------------------------------


@dataclass(frozen=True)
class MessageRow:
    """One `messages` row as readers see it."""

    id: uuid.UUID
    org_id: uuid.UUID
    domain: str
    direction: str
    queue_id: str
    message_id_header: str | None
    envelope_from: str
    header_from: str | None
    subject: str | None
    size: int
    object_key: str
    compressed_size: int
    sha256: bytes
    content_expires_at: datetime
    metadata_expires_at: datetime
    status: str
    recipient_count: int
    created_at: datetime
    accepted_at: datetime | None


@dataclass(frozen=True)
class RecipientRow:
    """One `message_recipients` row: a recipient and its delivery outcome."""

    recipient: str
    status: str
    dsn_status: str | None
    remote_mta: str | None
    diagnostic: str | None
    updated_at: datetime


@dataclass(frozen=True)
class MessageDetail:
    """A message with its recipients, for `messages show`."""

    message: MessageRow
    recipients: tuple[RecipientRow, ...]


@dataclass(frozen=True)
class MessageFilter:
    """What `list_messages` selects; None means "any"."""

    org_id: uuid.UUID | None = None
    sender: str | None = None
    recipient: str | None = None
    since: datetime | None = None
    limit: int = 50


_MESSAGE_COLUMNS = """
    m.id, m.org_id, m.domain, m.direction, m.queue_id, m.message_id_header,
    m.envelope_from, m.header_from, m.subject, m.size, m.object_key,
    m.compressed_size, m.sha256, m.content_expires_at, m.metadata_expires_at,
    m.status, m.recipient_count, m.created_at, m.accepted_at
"""


def content_available(m: MessageRow, now: datetime) -> bool:
    """True while the message's content is inside its retention period."""
    return now < m.content_expires_at


def _where(f: MessageFilter) -> tuple[str, list[object]]:
    """SQL WHERE clause and parameters for a filter (pure, testable)."""
    clauses: list[str] = []
    params: list[object] = []
    if f.org_id is not None:
        clauses.append("m.org_id = %s")
        params.append(f.org_id)
    if f.sender is not None:
        clauses.append("lower(m.envelope_from) = lower(%s)")
        params.append(f.sender)
    if f.recipient is not None:
        # Same org_id and expiry as the message: stays inside one partition.
        clauses.append(
            "EXISTS (SELECT 1 FROM message_recipients r WHERE r.message_id = m.id"
            " AND r.org_id = m.org_id AND r.metadata_expires_at = m.metadata_expires_at"
            " AND lower(r.recipient) = lower(%s))"
        )
        params.append(f.recipient)
    if f.since is not None:
        clauses.append("m.created_at >= %s")
        params.append(f.since)
    return (" WHERE " + " AND ".join(clauses)) if clauses else "", params


def list_messages(conn: psycopg.Connection, f: MessageFilter) -> list[MessageRow]:
    """Messages matching the filter, newest first, at most `f.limit`."""
    where, params = _where(f)
    with conn.cursor(row_factory=class_row(MessageRow)) as cur:
        cur.execute(
            f"SELECT {_MESSAGE_COLUMNS} FROM messages m{where}"
            " ORDER BY m.created_at DESC, m.id DESC LIMIT %s",
            [*params, f.limit],
        )
        return cur.fetchall()


def get_message(conn: psycopg.Connection, message_id: uuid.UUID) -> MessageDetail | None:
    """The message with this id and its recipients, or None if there is none."""
    with conn.cursor(row_factory=class_row(MessageRow)) as cur:
        cur.execute(f"SELECT {_MESSAGE_COLUMNS} FROM messages m WHERE m.id = %s", (message_id,))
        row = cur.fetchone()
    if row is None:
        return None
    with conn.cursor(row_factory=class_row(RecipientRow)) as cur:
        cur.execute(
            "SELECT recipient, status, dsn_status, remote_mta, diagnostic, updated_at"
            " FROM message_recipients WHERE message_id = %s AND org_id = %s"
            " AND metadata_expires_at = %s ORDER BY recipient",
            (row.id, row.org_id, row.metadata_expires_at),
        )
        recipients: Sequence[RecipientRow] = cur.fetchall()
    return MessageDetail(row, tuple(recipients))
