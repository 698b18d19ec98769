"""The `messages` and `message_recipients` tables: capture rows and readers.

`record_captures` writes the message rows and one row per recipient of a
whole batch in a single statement, so they are visible together or not at all.  Expiry
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

import json
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import psycopg
from psycopg.rows import class_row

from postkeep.storage.metadata import search
from postkeep.storage.metadata.inbound import ParentClues
from postkeep.storage.metadata.search import MessageFilter as MessageFilter

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
    return_path: str | None = None  # the rewritten envelope sender, if any
    # The client's own NOTIFY per recipient (None: none given), same order.
    notify: tuple[str | None, ...] = ()
    extra: dict[str, str] = field(default_factory=dict)
    # Application tags (postkeep/milter/tags.py): messages.tags, and the tag
    # campaign_id also messages.campaign_id (migration 0016).
    tags: dict[str, str] = field(default_factory=dict)
    # Inbound mail: what it is (storage/reports/classify.py) and what it names
    # of the sent message it answers (linked once its rows are in).
    message_type: str = "email"
    clues: ParentClues | None = None


# One statement, so one round trip and atomic even on an autocommit
# connection: every message row and every recipient row of a batch, or
# nothing.  Columns travel as arrays and are unnested server-side.
_INSERT_CAPTURES = """
WITH msg AS (
    INSERT INTO messages (id, org_id, domain, direction, queue_id, message_id_header,
        envelope_from, header_from, subject, size, object_key, compressed_size, sha256,
        content_expires_at, metadata_expires_at, status, recipient_count, created_at,
        accepted_at, return_path, tags, campaign_id, message_type)
    SELECT id, org_id, domain, direction, queue_id, message_id_header, envelope_from,
        header_from, subject, size, object_key, compressed_size, sha256,
        content_expires_at, metadata_expires_at, 'queued', recipient_count, created_at, now(),
        return_path, tags::jsonb, tags::jsonb ->> 'campaign_id', message_type
    FROM unnest(%(id)s::uuid[], %(org_id)s::uuid[], %(domain)s::text[], %(direction)s::text[],
        %(queue_id)s::text[], %(message_id)s::text[], %(envelope_from)s::text[],
        %(header_from)s::text[], %(subject)s::text[], %(size)s::bigint[],
        %(object_key)s::text[], %(compressed_size)s::bigint[], %(sha256)s::bytea[],
        %(content_exp)s::timestamptz[], %(metadata_exp)s::timestamptz[], %(nrcpt)s::int[],
        %(created)s::timestamptz[], %(return_path)s::text[], %(tags)s::text[],
        %(message_type)s::text[])
        AS m(id, org_id, domain, direction, queue_id, message_id_header, envelope_from,
             header_from, subject, size, object_key, compressed_size, sha256,
             content_expires_at, metadata_expires_at, recipient_count, created_at, return_path,
             tags, message_type)
    ON CONFLICT DO NOTHING
)
INSERT INTO message_recipients (message_id, org_id, recipient, status, metadata_expires_at,
    created_at, updated_at, notify)
SELECT r.message_id, r.org_id, r.recipient, 'queued', r.metadata_exp, r.created, r.created,
    r.notify
FROM unnest(%(r_message)s::uuid[], %(r_org)s::uuid[], %(r_rcpt)s::text[],
            %(r_metadata_exp)s::timestamptz[], %(r_created)s::timestamptz[],
            %(r_notify)s::text[])
    AS r(message_id, org_id, recipient, metadata_exp, created, notify)
ON CONFLICT DO NOTHING
"""


def record_captures(conn: psycopg.Connection, batch: Sequence[CapturedMessage]) -> None:
    """Insert the rows of every message in BATCH in one statement.

    Idempotent (ON CONFLICT DO NOTHING): a retry after a lost COMMIT reply
    neither fails nor duplicates.
    """
    rcpts = [(m, r) for m in batch for r in m.recipients]
    notify = [n for m in batch
              for n in (m.notify + (None,) * len(m.recipients))[:len(m.recipients)]]
    conn.execute(
        _INSERT_CAPTURES,
        {
            "id": [m.id for m in batch], "org_id": [m.org_id for m in batch],
            "domain": [m.domain for m in batch], "direction": [m.direction for m in batch],
            "queue_id": [m.queue_id for m in batch],
            "message_id": [m.message_id_header for m in batch],
            "envelope_from": [m.envelope_from for m in batch],
            "header_from": [m.header_from for m in batch],
            "subject": [m.subject for m in batch], "size": [m.size for m in batch],
            "object_key": [m.object_key for m in batch],
            "compressed_size": [m.compressed_size for m in batch],
            "sha256": [m.sha256 for m in batch],
            "content_exp": [m.content_expires_at for m in batch],
            "metadata_exp": [m.metadata_expires_at for m in batch],
            "nrcpt": [len(m.recipients) for m in batch],
            "created": [m.created_at for m in batch],
            "return_path": [m.return_path for m in batch],
            "tags": [json.dumps(m.tags) for m in batch],
            "message_type": [m.message_type for m in batch],
            "r_message": [m.id for m, _ in rcpts], "r_org": [m.org_id for m, _ in rcpts],
            "r_rcpt": [r for _, r in rcpts],
            "r_metadata_exp": [m.metadata_expires_at for m, _ in rcpts],
            "r_created": [m.created_at for m, _ in rcpts],
            "r_notify": notify,
        },
    )


def record_capture(conn: psycopg.Connection, m: CapturedMessage) -> None:
    """Insert one message's rows (see record_captures)."""
    record_captures(conn, [m])


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
    content_erased_at: datetime | None = None  # erased on request (postkeep erase)
    held_metadata_expires_at: datetime | None = None  # own stamp while under a legal hold
    tags: dict[str, str] = field(default_factory=dict)  # application tags (0016)
    message_type: str = "email"  # inbound: reply, auto_reply, bounce, complaint (0014)
    parent_message_id: uuid.UUID | None = None  # the sent message it answers


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


_MESSAGE_COLUMNS = """
    m.id, m.org_id, m.domain, m.direction, m.queue_id, m.message_id_header,
    m.envelope_from, m.header_from, m.subject, m.size, m.object_key,
    m.compressed_size, m.sha256, m.content_expires_at, m.metadata_expires_at,
    m.status, m.recipient_count, m.created_at, m.accepted_at, m.content_erased_at,
    m.held_metadata_expires_at, m.tags, m.message_type, m.parent_message_id
"""

CONTENT_EXPIRED = "content expired per retention policy"
CONTENT_ERASED = "content erased on request"


def content_unavailable_reason(m: MessageRow, now: datetime) -> str | None:
    """Why the content can no longer be read, or None while it can.

    Derived, never stored: erased on request, or past the stamped
    content_expires_at, unless a legal hold moved the object under
    messages/hold/ (a hold keeps it readable past its stamp).
    """
    if m.content_erased_at is not None:
        return f"{CONTENT_ERASED} ({m.content_erased_at.astimezone(UTC):%Y-%m-%d %H:%M} UTC)"
    if now >= m.content_expires_at and not m.object_key.startswith("messages/hold/"):
        return CONTENT_EXPIRED
    return None


def content_available(m: MessageRow, now: datetime) -> bool:
    """True while the message's content can be read (see content_unavailable_reason)."""
    return content_unavailable_reason(m, now) is None


def list_messages(conn: psycopg.Connection, f: MessageFilter) -> list[MessageRow]:
    """Messages matching the filter, newest first, at most `f.limit`.

    The search function of the CLI and of a dashboard alike: the SQL
    function search_messages (migration 0028) searches a tenant login's own
    organisation only, with the per-organisation indexes; a filter naming
    another organisation finds nothing.
    """
    with conn.cursor(row_factory=class_row(MessageRow)) as cur:
        cur.execute(*search_query(f))
        return cur.fetchall()


def search_query(f: MessageFilter) -> tuple[str, list[object]]:
    """The SELECT list_messages runs for F, and its parameters (pure; the
    search benchmark EXPLAINs it)."""
    return search.select(f, _MESSAGE_COLUMNS)


def ids_by_queue_id(conn: psycopg.Connection, queue_id: str) -> list[uuid.UUID]:
    """Ids of the messages Postfix queued as QUEUE_ID (reused ids: several), newest first."""
    return [r[0] for r in conn.execute(
        "SELECT id FROM messages WHERE queue_id = %s ORDER BY created_at DESC, id DESC",
        (queue_id,))]


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

