"""Legal holds: what they cover, and keeping what they cover out of reach.

A hold covers an organisation's mail (address NULL) or only the mail to or
from one address.  While a hold is active nothing it covers may be destroyed:

- metadata: just before a weekly partition is dropped, covered rows are moved
  into the `*_held` partitions, which are never dropped (storage/retention.py);
- content: covered objects are copied under `messages/hold/`, where no
  lifecycle rule reaches, and the row is pointed at the copy (`protect`);
  mail captured for an organisation-wide hold goes there directly (the
  milter's organisation lookup carries the flag); the sweeper skips covered
  messages;
- erasure refuses, naming the hold (storage/erasure.py).

Releasing a hold only marks it; the next `retention run` reconciles
(`reconcile_released`): held rows go back to their own stamp (or are dropped
if it has passed), held objects past their stamp are deleted.

SQL for `legal_holds` lives here; `involves_sql` is the one definition of
"this message is to or from that address", shared with erasure.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

import psycopg
from psycopg import sql
from psycopg.rows import class_row

from postkeep.storage.lifecycle import RetentionStore, held_key, is_held_key
from postkeep.storage.messages import UNLIMITED

log = logging.getLogger("postkeep.storage")

Progress = Callable[[str], None]

# metadata_expires_at of rows under a hold: inside messages_held.
HELD_AT = datetime(9999, 1, 1, tzinfo=UNLIMITED.tzinfo)


def normalise_address(text: str) -> str:
    """An address as holds and erasure compare it: trimmed, no <>, lower case.

    ValueError for anything that is not local@domain.
    """
    addr = text.strip().removeprefix("<").removesuffix(">").strip().lower()
    local, at, domain = addr.rpartition("@")
    if not at or not local or not domain or any(c.isspace() for c in addr):
        raise ValueError(f"address {text!r}: expected local@domain")
    return addr


def involves_sql(m: str, addr: str) -> str:
    """SQL: message alias M is to or from the address in expression ADDR.

    Envelope sender, From: (bare or in <>) or any recipient of the same
    message (recipient rows share the message's org and partition key).
    """
    return (
        f"(lower({m}.envelope_from) = {addr}"
        f" OR lower({m}.header_from) = {addr}"
        f" OR position('<' || {addr} || '>' in lower({m}.header_from)) > 0"
        f" OR EXISTS (SELECT 1 FROM message_recipients hr WHERE hr.message_id = {m}.id"
        f" AND hr.org_id = {m}.org_id AND hr.metadata_expires_at = {m}.metadata_expires_at"
        f" AND lower(hr.recipient) = {addr}))"
    )


def covered_sql(m: str) -> str:
    """SQL: message alias M is covered by an active legal hold."""
    return (
        "EXISTS (SELECT 1 FROM legal_holds h WHERE h.released_at IS NULL"
        f" AND h.org_id = {m}.org_id AND (h.address IS NULL OR {involves_sql(m, 'h.address')}))"
    )


@dataclass(frozen=True)
class Hold:
    """One legal hold as readers see it."""

    id: int
    org_id: uuid.UUID
    org_name: str
    address: str | None
    reason: str
    created_at: datetime
    released_at: datetime | None
    reconciled_at: datetime | None

    def scope(self) -> str:
        """'org NAME' or 'ADDRESS in org NAME', for messages."""
        return f"{self.address} in org {self.org_name}" if self.address else f"org {self.org_name}"


class HoldError(Exception):
    """An action refused because of a hold (or a hold request refused)."""


_HOLD_COLUMNS = """h.id, h.org_id, o.name AS org_name, h.address, h.reason, h.created_at,
    h.released_at, h.reconciled_at"""


def list_holds(conn: psycopg.Connection, org_id: uuid.UUID | None = None,
               include_released: bool = False) -> list[Hold]:
    """Holds, oldest first; only active ones unless INCLUDE_RELEASED."""
    where = []
    params: list[object] = []
    if org_id is not None:
        where.append("h.org_id = %s")
        params.append(org_id)
    if not include_released:
        where.append("h.released_at IS NULL")
    sql = (f"SELECT {_HOLD_COLUMNS} FROM legal_holds h JOIN organisations o ON o.id = h.org_id"
           + (" WHERE " + " AND ".join(where) if where else "") + " ORDER BY h.id")
    with conn.cursor(row_factory=class_row(Hold)) as cur:
        cur.execute(sql, params)
        return cur.fetchall()


def get_hold(conn: psycopg.Connection, hold_id: int) -> Hold | None:
    with conn.cursor(row_factory=class_row(Hold)) as cur:
        cur.execute(f"SELECT {_HOLD_COLUMNS} FROM legal_holds h JOIN organisations o"
                    " ON o.id = h.org_id WHERE h.id = %s", (hold_id,))
        return cur.fetchone()


def add_hold(conn: psycopg.Connection, org_id: uuid.UUID, address: str | None,
             reason: str) -> Hold:
    """Create an active hold; HoldError if the same one is already active."""
    if not reason.strip():
        raise HoldError("a hold needs a reason (--reason), e.g. a case reference")
    with conn.transaction():
        row = conn.execute(
            "INSERT INTO legal_holds (org_id, address, reason) VALUES (%s, %s, %s)"
            " ON CONFLICT DO NOTHING RETURNING id", (org_id, address, reason.strip()),
        ).fetchone()
        if row is None:
            raise HoldError("an identical hold is already active (see `postkeep hold list`)")
        hold = get_hold(conn, int(row[0]))
        assert hold is not None
        audit(conn, None, "hold_added", 0, org_id, f"hold {hold.id}",
              {"address_sha256": _digest(address), "reason": hold.reason})
    return hold


def release_hold(conn: psycopg.Connection, hold_id: int) -> Hold:
    """Mark hold HOLD_ID released (the next retention run applies it)."""
    with conn.transaction():
        row = conn.execute(
            "UPDATE legal_holds SET released_at = now() WHERE id = %s AND released_at IS NULL"
            " RETURNING id", (hold_id,)).fetchone()
        hold = get_hold(conn, hold_id)
        if hold is None:
            raise HoldError(f"no hold {hold_id} (see `postkeep hold list`)")
        if row is None:
            raise HoldError(f"hold {hold_id} was already released at {hold.released_at}")
        audit(conn, None, "hold_released", 0, hold.org_id, f"hold {hold.id}",
              {"address_sha256": _digest(hold.address)})
    return hold


def holds_covering(conn: psycopg.Connection, org_id: uuid.UUID,
                   message_ids: list[uuid.UUID]) -> list[Hold]:
    """Active holds that cover any of MESSAGE_IDS (all of ORG_ID)."""
    with conn.cursor(row_factory=class_row(Hold)) as cur:
        cur.execute(
            f"SELECT {_HOLD_COLUMNS} FROM legal_holds h JOIN organisations o ON o.id = h.org_id"
            " WHERE h.released_at IS NULL AND h.org_id = %(org)s AND (h.address IS NULL"
            " OR EXISTS (SELECT 1 FROM messages m WHERE m.org_id = %(org)s"
            f" AND m.id = ANY(%(ids)s) AND {involves_sql('m', 'h.address')})) ORDER BY h.id",
            {"org": org_id, "ids": message_ids},
        )
        return cur.fetchall()


def _digest(address: str | None) -> str | None:
    import hashlib

    return hashlib.sha256(address.encode()).hexdigest() if address else None


def audit(conn: psycopg.Connection, run_id: uuid.UUID | None, action: str, count: int,
          org_id: uuid.UUID | None = None, target: str | None = None,
          detail: dict[str, object] | None = None) -> None:
    """One retention_audit row: what was done, to what, how many, when (now)."""
    from psycopg.types.json import Jsonb

    conn.execute(
        "INSERT INTO retention_audit (run_id, action, org_id, target, count, detail)"
        " VALUES (%s, %s, %s, %s, %s, %s)",
        (run_id, action, org_id, target, count, Jsonb(detail or {})),
    )


# --- tables that follow a message's partition ---------------------------------

_CHILD_COLUMNS = ("message_id", "org_id", "metadata_expires_at", "held_metadata_expires_at")


def child_tables(conn: psycopg.Connection) -> list[str]:
    """Tables other than messages partitioned by metadata_expires_at, recipients first.

    Each must carry message_id, org_id and held_metadata_expires_at, so a
    held message's rows in it move with the message; a table that does not is
    refused here (BackendError naming it) rather than have held rows dropped.
    """
    from postkeep.storage.db import BackendError

    rows = conn.execute(
        "SELECT c.relname::text, array_agg(a2.attname::text) FROM pg_partitioned_table p"
        " JOIN pg_class c ON c.oid = p.partrelid"
        " AND c.relnamespace = current_schema()::regnamespace"
        " JOIN pg_attribute a ON a.attrelid = p.partrelid AND a.attnum = p.partattrs[0]"
        " JOIN pg_attribute a2 ON a2.attrelid = p.partrelid AND a2.attnum > 0"
        " AND NOT a2.attisdropped"
        " WHERE a.attname = 'metadata_expires_at' AND p.partstrat = 'r'"
        " AND c.relname <> 'messages' GROUP BY c.relname"
        " ORDER BY c.relname <> 'message_recipients', c.relname").fetchall()
    for table, cols in rows:
        missing = [c for c in _CHILD_COLUMNS if c not in cols]
        if missing:
            raise BackendError("postgres", f"table {table} is partitioned by"
                               f" metadata_expires_at but has no {', '.join(missing)}:"
                               " retention cannot keep held rows in it")
    return [r[0] for r in rows]


def children_sql(tables: list[str], alias: str, statement: str) -> sql.Composed:
    """CTE parts `, <alias>_<i> AS (STATEMENT)`, one per table, `{t}` in STATEMENT
    standing for the table: the same change to a message's rows in every child table."""
    return sql.Composed([
        sql.SQL(", {a} AS (" + statement + ")").format(a=sql.Identifier(f"{alias}_{i}"),
                                                       t=sql.Identifier(t))
        for i, t in enumerate(tables)])


def move_children_sql(tables: list[str]) -> sql.Composed:
    """CTE parts moving each table's rows of `moved` (id, org_id, old stamp) to HELD."""
    return children_sql(
        tables, "moved", "UPDATE {t} c SET held_metadata_expires_at = c.metadata_expires_at,"
        " metadata_expires_at = %(held)s FROM moved WHERE c.message_id = moved.id"
        " AND c.org_id = moved.org_id AND c.metadata_expires_at ="
        " moved.held_metadata_expires_at RETURNING 1")


# --- content protection ------------------------------------------------------


@dataclass(frozen=True)
class ProtectResult:
    moved: int
    gone: int  # covered objects already deleted before the hold (nothing to keep)


_PROTECT_BATCH = 500


def protect(conn: psycopg.Connection, store: RetentionStore, hold: Hold,
            content_after: datetime, run_id: uuid.UUID | None = None,
            progress: Progress | None = None) -> ProtectResult:
    """Copy HOLD's not-yet-protected objects under messages/hold/ and repoint rows.

    Only messages whose content was still due to exist (content_expires_at
    after CONTENT_AFTER, the sweeper's watermark) and not erased.  Order per
    batch: copy, then repoint the rows, then delete the originals: a crash
    anywhere leaves every row pointing at an object that exists (an original
    left behind is deleted by its lifecycle rule).
    """
    moved = gone = 0
    scope = "" if hold.address is None else f" AND {involves_sql('m', '%(addr)s')}"
    # Walk the organisation's messages by (created_at, id): the
    # (org_id, created_at) index serves it, whatever the size of the table.
    last: tuple[datetime, uuid.UUID] = (datetime.min.replace(tzinfo=HELD_AT.tzinfo),
                                        uuid.UUID(int=0))
    while True:
        rows = conn.execute(
            "SELECT m.id, m.metadata_expires_at, m.object_key, m.created_at FROM messages m"
            " WHERE m.org_id = %(org)s AND (m.created_at, m.id) > (%(c)s, %(after)s)"
            " AND m.content_erased_at IS NULL AND m.object_key NOT LIKE 'messages/hold/%%'"
            f" AND m.content_expires_at > %(content_after)s{scope}"
            " ORDER BY m.created_at, m.id LIMIT %(n)s",
            {"org": hold.org_id, "addr": hold.address, "c": last[0], "after": last[1],
             "content_after": content_after, "n": _PROTECT_BATCH},
        ).fetchall()
        if not rows:
            break
        last = (rows[-1][3], rows[-1][0])
        repoint: list[tuple[uuid.UUID, datetime, str]] = []
        originals: list[str] = []
        for mid, mexp, key, _created in rows:
            if is_held_key(key):
                continue
            dst = held_key(key)
            if not store.exists(key):
                gone += 1
                continue
            store.copy(key, dst)
            repoint.append((mid, mexp, dst))
            originals.append(key)
        if repoint:
            with conn.transaction():
                conn.execute(
                    "UPDATE messages m SET object_key = u.key FROM unnest(%s::uuid[],"
                    " %s::timestamptz[], %s::text[]) AS u(id, mexp, key)"
                    " WHERE m.id = u.id AND m.metadata_expires_at = u.mexp AND m.org_id = %s",
                    ([r[0] for r in repoint], [r[1] for r in repoint], [r[2] for r in repoint],
                     hold.org_id),
                )
                audit(conn, run_id, "hold_protected", len(repoint), hold.org_id,
                      f"hold {hold.id}", {"to": "messages/hold/"})
            failed = store.delete_many(originals)
            if failed:
                log.warning("hold %d: %d original objects not deleted (their lifecycle rule"
                            " will): %s", hold.id, len(failed), failed[:3])
            moved += len(repoint)
            if progress:
                progress(f"hold {hold.id} ({hold.scope()}): {moved} objects moved under"
                         " messages/hold/")
    return ProtectResult(moved, gone)


# --- release ------------------------------------------------------------------


@dataclass(frozen=True)
class ReleaseResult:
    rows_restored: int
    rows_dropped: int
    objects_deleted: int


def reconcile_released(conn: psycopg.Connection, store: RetentionStore, hold: Hold,
                       now: datetime, run_id: uuid.UUID | None = None) -> ReleaseResult:
    """Apply the release of HOLD to what it alone kept.

    Rows it moved into the held partitions go back to their own metadata
    stamp, or are removed (their statistics kept) if that has passed; objects
    it kept under messages/hold/ past their content stamp are deleted.  What
    another active hold still covers stays.  Idempotent; reconciled_at marks
    the end.
    """
    from postkeep.storage import stats

    scope = "" if hold.address is None else f" AND {involves_sql('m', '%(addr)s')}"
    params = {"org": hold.org_id, "addr": hold.address, "now": now, "held": HELD_AT}
    free = f"m.org_id = %(org)s{scope} AND NOT {covered_sql('m')}"
    # Objects first: once rows are gone nothing would point at them.
    # Content the sweeper skipped because the hold covered it: everything
    # under messages/hold/, and anything that expired while the hold was on
    # (a day's margin before it for a sweeper that runs at least daily).
    # Deleting a key that is already gone is harmless.
    params["since"] = hold.created_at - timedelta(days=1)
    expired_objects = conn.execute(
        f"SELECT m.object_key FROM messages m WHERE {free}"
        " AND m.content_erased_at IS NULL AND m.content_expires_at <= %(now)s"
        " AND (m.object_key LIKE 'messages/hold/%%' OR m.content_expires_at >= %(since)s)",
        params).fetchall()
    keys = [r[0] for r in expired_objects]
    failed = store.delete_many(keys) if keys else []
    if failed:
        from postkeep.storage.db import BackendError

        raise BackendError("s3", f"hold {hold.id}: {len(failed)} held objects not deleted,"
                           f" e.g. {failed[0]}")
    with conn.transaction():
        # Rows past their own stamp: statistics first, then remove them.
        stats.archive_rows(
            conn,
            f"SELECT m.id FROM messages m WHERE m.metadata_expires_at = %(held)s AND {free}"
            " AND m.held_metadata_expires_at <= %(now)s", params)
        children = child_tables(conn)
        deletes = children_sql(
            children, "gone", "DELETE FROM {t} c USING gone WHERE c.message_id = gone.id"
            " AND c.org_id = gone.org_id AND c.metadata_expires_at = %(held)s RETURNING 1")
        row = conn.execute(sql.SQL(
            "WITH gone AS (DELETE FROM messages m WHERE m.metadata_expires_at = %(held)s"
            " AND {free} AND m.held_metadata_expires_at <= %(now)s RETURNING m.id, m.org_id)"
            "{deletes} SELECT count(*) FROM gone").format(free=sql.SQL(free), deletes=deletes),
            params).fetchone()
        dropped = int(row[0]) if row else 0
        backs = children_sql(
            children, "back", "UPDATE {t} c SET metadata_expires_at = back.metadata_expires_at,"
            " held_metadata_expires_at = NULL FROM back WHERE c.message_id = back.id"
            " AND c.org_id = back.org_id AND c.metadata_expires_at = %(held)s RETURNING 1")
        row = conn.execute(sql.SQL(
            "WITH back AS (UPDATE messages m SET metadata_expires_at ="
            " m.held_metadata_expires_at, held_metadata_expires_at = NULL"
            " WHERE m.metadata_expires_at = %(held)s AND {free}"
            " RETURNING m.id, m.org_id, m.metadata_expires_at){backs}"
            " SELECT count(*) FROM back").format(free=sql.SQL(free), backs=backs),
            params).fetchone()
        restored = int(row[0]) if row else 0
        conn.execute("UPDATE legal_holds SET reconciled_at = now() WHERE id = %s", (hold.id,))
        audit(conn, run_id, "hold_reconciled", dropped + restored, hold.org_id,
              f"hold {hold.id}", {"messages_dropped": dropped, "messages_restored": restored,
                                  "objects_deleted": len(keys)})
    return ReleaseResult(restored, dropped, len(keys))
