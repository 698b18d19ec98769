"""Daily per-organisation delivery statistics that outlive message metadata.

`delivery_stats_daily` (org, UTC day of capture) is what dashboards read:
messages, sent (recipients accepted), delivered (delivered or relayed),
deferred, bounced, expired, bytes received and bytes stored.

Exact and idempotent across partition drops and crashes:
- whenever rows are about to disappear (a partition drop, a released hold's
  rows past their stamp) their counts are added to `delivery_stats_dropped`
  in the SAME transaction as the DROP/DELETE: either both happen or neither;
- `rollup` recomputes a range of days as (rows still present) + (dropped
  counts) and upserts the result, replacing what was there.
So a day's total never changes because its rows went away, and a rollup can
be repeated, interrupted or run twice at once without counting anything twice.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from typing import Any

import psycopg
from psycopg import sql

_COUNTS = ("messages", "sent", "delivered", "deferred", "bounced", "expired", "bytes",
           "stored_bytes")


def _contributions(messages_src: sql.Composable, recipients_src: sql.Composable) -> sql.Composed:
    """SELECT org_id, day, <counts> over a messages source and a recipients source."""
    return sql.SQL(
        "SELECT org_id, day, sum(messages) AS messages, sum(sent) AS sent,"
        " sum(delivered) AS delivered, sum(deferred) AS deferred, sum(bounced) AS bounced,"
        " sum(expired) AS expired, sum(bytes) AS bytes, sum(stored_bytes) AS stored_bytes"
        " FROM ("
        "SELECT m.org_id, (m.created_at AT TIME ZONE 'UTC')::date AS day, count(*) AS messages,"
        " 0 AS sent, 0 AS delivered, 0 AS deferred, 0 AS bounced, 0 AS expired,"
        " sum(m.size) AS bytes, sum(m.compressed_size) AS stored_bytes FROM {m} GROUP BY 1, 2"
        " UNION ALL "
        "SELECT r.org_id, (r.created_at AT TIME ZONE 'UTC')::date, 0, count(*),"
        " count(*) FILTER (WHERE r.status IN ('delivered', 'relayed')),"
        " count(*) FILTER (WHERE r.status = 'deferred'),"
        " count(*) FILTER (WHERE r.status = 'bounced'),"
        " count(*) FILTER (WHERE r.status = 'expired'), 0, 0 FROM {r} GROUP BY 1, 2"
        ") c GROUP BY org_id, day"
    ).format(m=messages_src, r=recipients_src)


_ADD_DROPPED = sql.SQL(
    "INSERT INTO delivery_stats_dropped AS d (org_id, day, messages, sent, delivered, deferred,"
    " bounced, expired, bytes, stored_bytes, updated_at)"
    " SELECT org_id, day, messages, sent, delivered, deferred, bounced, expired, bytes,"
    " stored_bytes, now() FROM contrib"
    " ON CONFLICT (org_id, day) DO UPDATE SET messages = d.messages + EXCLUDED.messages,"
    " sent = d.sent + EXCLUDED.sent, delivered = d.delivered + EXCLUDED.delivered,"
    " deferred = d.deferred + EXCLUDED.deferred, bounced = d.bounced + EXCLUDED.bounced,"
    " expired = d.expired + EXCLUDED.expired, bytes = d.bytes + EXCLUDED.bytes,"
    " stored_bytes = d.stored_bytes + EXCLUDED.stored_bytes, updated_at = now()"
)


@dataclass(frozen=True)
class Archived:
    """What an archive step counted: messages and recipient rows, day range."""

    messages: int
    recipients: int
    first_day: date | None
    last_day: date | None


def archive_partitions(conn: psycopg.Connection, messages_part: str,
                       recipients_part: str) -> Archived:
    """Add the counts of two partitions about to be dropped to delivery_stats_dropped.

    Call inside the transaction that drops them.
    """
    contrib = _contributions(sql.SQL("ONLY {} m").format(sql.Identifier(messages_part)),
                             sql.SQL("ONLY {} r").format(sql.Identifier(recipients_part)))
    return _archive(conn, contrib, {})


def archive_rows(conn: psycopg.Connection, ids_sql: str, params: dict[str, Any]) -> Archived:
    """Add the counts of the messages selected by IDS_SQL (and their recipients).

    Call inside the transaction that deletes them.
    """
    ids = sql.SQL(ids_sql)
    contrib = _contributions(
        sql.SQL("messages m WHERE m.id IN ({})").format(ids),
        sql.SQL("message_recipients r WHERE r.message_id IN ({})").format(ids),
    )
    return _archive(conn, contrib, params)


def _archive(conn: psycopg.Connection, contrib: sql.Composed,
             params: dict[str, Any]) -> Archived:
    row = conn.execute(
        sql.SQL("WITH contrib AS ({c}), ins AS ({add})"
                " SELECT coalesce(sum(messages), 0), coalesce(sum(sent), 0), min(day), max(day)"
                " FROM contrib").format(c=contrib, add=_ADD_DROPPED),
        params,
    ).fetchone()
    assert row is not None
    return Archived(int(row[0]), int(row[1]), row[2], row[3])


def rollup(conn: psycopg.Connection, first: date, last: date) -> int:
    """Recompute and upsert every (org, day) from FIRST to LAST inclusive; rows written."""
    start = datetime.combine(first, time(), UTC)
    end = datetime.combine(last + timedelta(days=1), time(), UTC)
    window = sql.SQL("created_at >= %(start)s AND created_at < %(end)s")
    live = _contributions(sql.SQL("messages m WHERE m.{}").format(window),
                          sql.SQL("message_recipients r WHERE r.{}").format(window))
    cols = sql.SQL(", ").join(map(sql.Identifier, _COUNTS))
    sums = sql.SQL(", ").join(sql.SQL("sum({0}) AS {0}").format(sql.Identifier(c))
                              for c in _COUNTS)
    updates = sql.SQL(", ").join(sql.SQL("{0} = EXCLUDED.{0}").format(sql.Identifier(c))
                                 for c in _COUNTS)
    query = sql.SQL(
        "INSERT INTO delivery_stats_daily (org_id, day, {cols}, updated_at)"
        " SELECT org_id, day, {sums}, now() FROM ("
        "{live} UNION ALL SELECT org_id, day, {cols} FROM delivery_stats_dropped"
        " WHERE day >= %(first)s AND day <= %(last)s) t GROUP BY org_id, day"
        " ON CONFLICT (org_id, day) DO UPDATE SET {updates}, updated_at = now()"
    ).format(cols=cols, sums=sums, live=live, updates=updates)
    cur = conn.execute(query, {"start": start, "end": end, "first": first, "last": last})
    return cur.rowcount


@dataclass(frozen=True)
class DayStats:
    """One row of delivery_stats_daily."""

    org_id: Any
    day: date
    messages: int
    sent: int
    delivered: int
    deferred: int
    bounced: int
    expired: int
    bytes: int
    stored_bytes: int


def daily(conn: psycopg.Connection, org_id: Any, since: date | None = None) -> list[DayStats]:
    """An organisation's daily statistics, oldest day first."""
    from psycopg.rows import class_row

    with conn.cursor(row_factory=class_row(DayStats)) as cur:
        cur.execute(
            "SELECT org_id, day, messages, sent, delivered, deferred, bounced, expired, bytes,"
            " stored_bytes FROM delivery_stats_daily WHERE org_id = %s"
            " AND (%s::date IS NULL OR day >= %s) ORDER BY day", (org_id, since, since))
        return cur.fetchall()
