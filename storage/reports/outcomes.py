"""Recording reports in PostgreSQL: many reports, one round trip.

`record_reports` sends one `record_report(...)` call per report (the SQL
function in migrations 0004/0008 applies the outcomes, rolls the message status up
and keeps unmatched reports) through psycopg's pipeline, in one transaction:
a batch of reports costs one round trip.  If the batch fails as a whole, each
report is retried on its own, so one bad report cannot hold back the others.
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

import psycopg

from postkeep.storage.reports.dsn import Outcome, Report

DUPLICATE = -1
UNMATCHED = -2
DUPLICATE_UNMATCHED = -3

_RECORD = """
SELECT record_report(%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s,
                     %s::text[], %s::text[], %s::text[], %s::text[], %s::text[], %s::text[],
                     %s::timestamptz[])
"""


def report_key(sha256: bytes) -> str:
    """Object key of a kept report (unmatched or unparsable)."""
    return f"reports/{sha256.hex()[:2]}/{sha256.hex()}.eml.zst"


def expiry_window(expires_at: datetime | None) -> tuple[datetime | None, datetime | None]:
    """[lo, hi) around a metadata expiry known to the second (None: unknown)."""
    if expires_at is None:
        return None, None
    lo = expires_at.replace(microsecond=0)
    return lo, lo + timedelta(seconds=1)


def _params(r: Report, object_key: str | None = None) -> tuple[object, ...]:
    o = r.outcomes
    lo, hi = expiry_window(r.expires_at)
    return (r.sha256, r.kind, r.message_id, lo, hi, object_key or report_key(r.sha256), r.size,
            r.reason,
            r.envelope_from, r.envelope_to, r.subject,
            [x.recipient for x in o], [x.original for x in o], [x.status for x in o],
            [x.dsn_status for x in o], [x.remote_mta for x in o], [x.diagnostic for x in o],
            [x.event_at for x in o])


def record_batch(conn: psycopg.Connection, reports: Sequence[Report], *,
                 object_key: str | None = None) -> list[int]:
    """Record REPORTS in one transaction and one round trip; codes per report.

    OBJECT_KEY: where the reports' bytes already are (a complaint captured as
    an inbound message), instead of report_key().

    A code is the number of recipients whose status changed, or DUPLICATE,
    UNMATCHED or DUPLICATE_UNMATCHED.
    """
    # Batches written at once lock their messages in one order (by message
    # id; a message's own reports stay in arrival order), so that two of them
    # never wait on each other in a cycle.
    order = sorted(range(len(reports)), key=lambda i: _lock_order(reports[i]))
    with conn.transaction(), conn.pipeline():
        cursors = {i: conn.execute(_RECORD, _params(reports[i], object_key)) for i in order}
    out = []
    for i in range(len(reports)):
        row = cursors[i].fetchone()
        assert row is not None
        out.append(int(row[0]))
    return out


def _lock_order(r: Report) -> bytes:
    return r.message_id.bytes if r.message_id else b"\xff" + r.sha256


def forward_target(conn: psycopg.Connection, message_id: uuid.UUID,
                   expires_at: datetime | None) -> str | None:
    """The original envelope sender, if the message's organisation forwards failures."""
    row = conn.execute(
        "SELECT m.envelope_from FROM messages m JOIN organisations o ON o.id = m.org_id"
        " WHERE m.id = %s AND in_window(m.metadata_expires_at, %s::timestamptz,"
        " %s::timestamptz) AND o.forward_failures AND m.envelope_from <> ''",
        (message_id, *expiry_window(expires_at)),
    ).fetchone()
    return str(row[0]) if row else None


def message_recipients(conn: psycopg.Connection, message_id: uuid.UUID,
                       expires_at: datetime | None) -> list[str]:
    """The message's recipients, to attribute a report by where it arrived."""
    rows = conn.execute(
        "SELECT recipient FROM message_recipients WHERE message_id = %s"
        " AND in_window(metadata_expires_at, %s::timestamptz, %s::timestamptz)"
        " ORDER BY recipient",
        (message_id, *expiry_window(expires_at)),
    ).fetchall()
    return [str(r[0]) for r in rows]


@dataclass(frozen=True)
class Event:
    """One line of a recipient's status history."""

    recipient: str
    status: str
    dsn_status: str | None
    remote_mta: str | None
    diagnostic: str | None
    event_at: datetime
    recorded_at: datetime
    report_kind: str
    applied: bool


def recipient_history(conn: psycopg.Connection, message_id: uuid.UUID,
                      metadata_expires_at: datetime) -> list[Event]:
    """Every reported event for the message's recipients, oldest first."""
    from psycopg.rows import class_row

    with conn.cursor(row_factory=class_row(Event)) as cur:
        cur.execute(
            "SELECT recipient, status, dsn_status, remote_mta, diagnostic, event_at,"
            " recorded_at, report_kind, applied FROM recipient_events"
            " WHERE message_id = %s AND metadata_expires_at = %s"
            " ORDER BY recipient, event_at, recorded_at",
            (message_id, metadata_expires_at),
        )
        return cur.fetchall()


@dataclass(frozen=True)
class Unmatched:
    """A report kept because it could not be matched or parsed."""

    sha256: bytes
    kind: str
    reason: str
    envelope_from: str | None
    envelope_to: str | None
    subject: str | None
    object_key: str
    size: int
    received_at: datetime


def list_unmatched(conn: psycopg.Connection, limit: int, since: datetime | None = None,
                   sha256_prefix: str = "") -> list[Unmatched]:
    """Unmatched reports, newest first (those whose hash starts with SHA256_PREFIX)."""
    from psycopg.rows import class_row

    with conn.cursor(row_factory=class_row(Unmatched)) as cur:
        cur.execute(
            "SELECT u.sha256, u.kind, u.reason, u.envelope_from, u.envelope_to, u.subject,"
            " u.object_key, u.size, u.received_at FROM unmatched_reports u"
            " WHERE (%s::timestamptz IS NULL OR u.received_at >= %s::timestamptz)"
            " AND encode(u.sha256, 'hex') LIKE %s"
            " ORDER BY u.received_at DESC LIMIT %s",
            (since, since, sha256_prefix.lower() + "%", limit),
        )
        return cur.fetchall()


def maintain_report_partitions(conn: psycopg.Connection, keep_days: int) -> int:
    """Create the next days' report partitions, drop those past KEEP_DAYS."""
    row = conn.execute("SELECT maintain_report_partitions(%s)", (keep_days,)).fetchone()
    return int(row[0]) if row else 0


def expire_queued(conn: psycopg.Connection, queue_id: str, recipients: Sequence[str],
                  reason: str, event_at: datetime, since: datetime) -> int:
    """Record that Postfix's queue file QUEUE_ID was removed unsent (queue hygiene).

    Every listed recipient of the message captured under QUEUE_ID since SINCE
    (queue ids are reused over time) gets the final status 'expired' with
    REASON, through record_report like any notice, so its history shows why.
    The report is keyed by message and queue id: a second run that removes
    the same file (the first failed after recording) is a duplicate.
    Returns the number of recipients whose status changed.
    """
    rows = conn.execute(
        "SELECT m.id, m.metadata_expires_at FROM messages m WHERE m.queue_id = %s"
        " AND m.created_at >= %s", (queue_id, since)).fetchall()
    changed = 0
    for message_id, expires_at in rows:
        key = hashlib.sha256(f"queue-expiry:{message_id}:{queue_id}".encode()).digest()
        report = Report(
            sha256=key, size=0, kind="queue_expiry", message_id=message_id,
            expires_at=expires_at,
            outcomes=tuple(Outcome(r, None, "expired", None, None, reason, event_at)
                           for r in recipients))
        changed += max(record_batch(conn, [report])[0], 0)
    return changed
