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

`message_stats_daily` (migration 0020) breaks the same days down by
direction, message type and campaign, with complaints and replies, and is
kept by the same steps (its own `message_stats_dropped`, in the same
transactions); dashboards read it through the views `stats_daily` and
`stats_campaigns`.
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


_BREAKDOWN = ("messages", "bytes", "sent", "queued", "delivered", "deferred", "bounced",
              "expired", "complained", "replied", "auto_replied")
_BREAKDOWN_KEY = ("org_id", "day", "direction", "message_type", "campaign_id")


def _breakdown(messages_src: sql.Composable, recipients_src: sql.Composable) -> sql.Composed:
    """SELECT <key>, <counts> of message_stats_daily over a messages and a recipients source.

    Recipients count on their message's day, direction, type and campaign.
    """
    return sql.SQL(
        "SELECT m.org_id, (m.created_at AT TIME ZONE 'UTC')::date AS day, m.direction,"
        " m.message_type, coalesce(m.campaign_id, '') AS campaign_id, count(*) AS messages,"
        " sum(m.size) AS bytes, coalesce(sum(rc.sent), 0) AS sent,"
        " coalesce(sum(rc.queued), 0) AS queued, coalesce(sum(rc.delivered), 0) AS delivered,"
        " coalesce(sum(rc.deferred), 0) AS deferred, coalesce(sum(rc.bounced), 0) AS bounced,"
        " coalesce(sum(rc.expired), 0) AS expired,"
        " coalesce(sum(rc.complained), 0) AS complained,"
        " coalesce(sum(rc.replied), 0) AS replied,"
        " coalesce(sum(rc.auto_replied), 0) AS auto_replied"
        " FROM (SELECT * FROM {m}) m LEFT JOIN ("
        "SELECT r.message_id, r.metadata_expires_at, count(*) AS sent,"
        " count(*) FILTER (WHERE r.status = 'queued') AS queued,"
        " count(*) FILTER (WHERE r.status IN ('delivered', 'relayed', 'complained'))"
        " AS delivered,"
        " count(*) FILTER (WHERE r.status = 'deferred') AS deferred,"
        " count(*) FILTER (WHERE r.status = 'bounced') AS bounced,"
        " count(*) FILTER (WHERE r.status = 'expired') AS expired,"
        " count(*) FILTER (WHERE r.status = 'complained') AS complained,"
        " count(r.replied_at) AS replied, count(r.auto_replied_at) AS auto_replied"
        " FROM {r} GROUP BY 1, 2) rc"
        " ON rc.message_id = m.id AND rc.metadata_expires_at = m.metadata_expires_at"
        " GROUP BY 1, 2, 3, 4, 5"
    ).format(m=messages_src, r=recipients_src)


def _add_breakdown_dropped() -> sql.Composed:
    cols = sql.SQL(", ").join(map(sql.Identifier, (*_BREAKDOWN_KEY, *_BREAKDOWN)))
    adds = sql.SQL(", ").join(sql.SQL("{0} = d.{0} + EXCLUDED.{0}").format(sql.Identifier(c))
                              for c in _BREAKDOWN)
    return sql.SQL(
        "INSERT INTO message_stats_dropped AS d ({cols}, updated_at)"
        " SELECT {cols}, now() FROM breakdown"
        " ON CONFLICT ({key}) DO UPDATE SET {adds}, updated_at = now()"
    ).format(cols=cols, adds=adds,
             key=sql.SQL(", ").join(map(sql.Identifier, _BREAKDOWN_KEY)))


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
    m = sql.SQL("ONLY {} m").format(sql.Identifier(messages_part))
    r = sql.SQL("ONLY {} r").format(sql.Identifier(recipients_part))
    return _archive(conn, _contributions(m, r), _breakdown(m, r), {})


def archive_rows(conn: psycopg.Connection, ids_sql: str, params: dict[str, Any]) -> Archived:
    """Add the counts of the messages selected by IDS_SQL (and their recipients).

    Call inside the transaction that deletes them.
    """
    ids = sql.SQL(ids_sql)
    m = sql.SQL("messages m WHERE m.id IN ({})").format(ids)
    r = sql.SQL("message_recipients r WHERE r.message_id IN ({})").format(ids)
    return _archive(conn, _contributions(m, r), _breakdown(m, r), params)


def _archive(conn: psycopg.Connection, contrib: sql.Composed, breakdown: sql.Composed,
             params: dict[str, Any]) -> Archived:
    row = conn.execute(
        sql.SQL("WITH contrib AS ({c}), ins AS ({add}), breakdown AS ({b}), ins2 AS ({add2})"
                " SELECT coalesce(sum(messages), 0), coalesce(sum(sent), 0), min(day), max(day)"
                " FROM contrib").format(c=contrib, add=_ADD_DROPPED, b=breakdown,
                                        add2=_add_breakdown_dropped()),
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
    params = {"start": start, "end": end, "first": first, "last": last}
    with conn.transaction():
        cur = conn.execute(query, params)
        _rollup_breakdown(conn, params)
    return cur.rowcount


def _rollup_breakdown(conn: psycopg.Connection, params: dict[str, Any]) -> None:
    """Replace message_stats_daily's rows of the range by (rows present) + (dropped).

    Delete and insert in one transaction: readers see the old rows or the new
    ones, and a group whose rows all went (only ever through the dropped
    table) is never left behind with stale counts.
    """
    # A recipient row's created_at is its message's, give or take the
    # capture's milliseconds: a day's margin keeps the window a range scan.
    live = _breakdown(
        sql.SQL("messages m WHERE m.created_at >= %(start)s AND m.created_at < %(end)s"),
        sql.SQL("message_recipients r WHERE r.created_at >= %(start)s - interval '1 day'"
                " AND r.created_at < %(end)s + interval '1 day'"))
    key = sql.SQL(", ").join(map(sql.Identifier, _BREAKDOWN_KEY))
    cols = sql.SQL(", ").join(map(sql.Identifier, _BREAKDOWN))
    sums = sql.SQL(", ").join(sql.SQL("sum({0})").format(sql.Identifier(c)) for c in _BREAKDOWN)
    conn.execute("DELETE FROM message_stats_daily WHERE day >= %(first)s AND day <= %(last)s",
                 params)
    conn.execute(sql.SQL(
        "INSERT INTO message_stats_daily ({key}, {cols}, updated_at)"
        " SELECT {key}, {sums}, now() FROM ({live} UNION ALL SELECT {key}, {cols}"
        " FROM message_stats_dropped WHERE day >= %(first)s AND day <= %(last)s) t"
        " GROUP BY {key}").format(key=key, cols=cols, sums=sums, live=live), params)


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


BY = {"day": "day::text", "campaign": "campaign_id", "type": "message_type",
      "direction": "direction"}


@dataclass(frozen=True)
class Group:
    """message_stats_daily summed over one value of a dimension (BY), with rates."""

    key: str
    messages: int
    bytes: int
    sent: int
    queued: int
    delivered: int
    deferred: int
    bounced: int
    expired: int
    complained: int
    replied: int
    auto_replied: int

    def rate(self, count: int) -> float | None:
        """COUNT per recipient sent, None with none sent."""
        return round(count / self.sent, 4) if self.sent else None

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = dict(self.__dict__)
        out.update(delivery_rate=self.rate(self.delivered), bounce_rate=self.rate(self.bounced),
                   complaint_rate=self.rate(self.complained),
                   reply_rate=self.rate(self.replied))
        return out


def grouped(conn: psycopg.Connection, org_id: Any, first: date, last: date, by: str,
            direction: str | None = None) -> list[Group]:
    """An organisation's statistics from FIRST to LAST (inclusive) summed by BY.

    By campaign: outbound mail with a campaign only (rates are a campaign's).
    """
    key = sql.SQL(BY[by])
    where: sql.Composable = sql.SQL("org_id = %(org)s AND day >= %(first)s AND day <= %(last)s"
                    " AND (%(direction)s::text IS NULL OR direction = %(direction)s)")
    if by == "campaign":
        where = sql.SQL("{} AND direction = 'outbound' AND campaign_id <> ''").format(where)
    sums = sql.SQL(", ").join(sql.SQL("sum({0})::bigint AS {0}").format(sql.Identifier(c))
                              for c in _BREAKDOWN)
    from psycopg.rows import class_row

    with conn.cursor(row_factory=class_row(Group)) as cur:
        cur.execute(sql.SQL("SELECT {key} AS key, {sums} FROM message_stats_daily WHERE {where}"
                            " GROUP BY 1 ORDER BY 1").format(key=key, sums=sums, where=where),
                    {"org": org_id, "first": first, "last": last, "direction": direction})
        return cur.fetchall()
