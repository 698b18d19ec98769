"""Legal holds: what they cover, and keeping what they cover out of reach.

A hold covers an organisation's mail (address NULL) or only the mail to or
from one address.  While a hold is active nothing it covers may be destroyed:

- metadata: just before a weekly partition is dropped, covered rows are moved
  into the `*_held` partitions, which are never dropped (storage/lifecycle/retention.py);
- content: covered objects are copied under `messages/hold/`, where no
  lifecycle rule reaches, and the row is pointed at the copy (`protect`);
  mail captured for an organisation-wide hold goes there directly (the
  milter's organisation lookup carries the flag); the sweeper skips covered
  messages;
- erasure refuses, naming the hold (storage/lifecycle/erasure.py).

Releasing a hold only marks it; the next `retention run` reconciles
(`reconcile_released`): held rows go back to their own stamp (or are dropped
if it has passed), held objects past their stamp are deleted, and sealed
content's data keys a hold moved to 'infinity' go back to their message's
content expiry (destroyed by the same run's key expiry if it has passed).

An original that S3 refused to delete after the move stays behind with no row
pointing at it; whoever deletes a held copy deletes every key its original
could have had with it (`delete_content`), so it never outlives the copy.

With Object Lock (`s3.object_lock`) content is not copied: `protect` sets the
legal-hold flag of each covered object, which the server enforces (no
delete of that version, by anyone, until it is cleared), and
`reconcile_released` clears the flags of what no other hold covers before
deleting what expired: one flag covers a whole pack, so a pack keeps it
while an active hold covers any message it indexes.  The walk's position
per hold is kept in `retention_state` (`hold-flag-<id>`), so a run flags
only mail captured since the last one.

The hold rows themselves (add, release, list, and the SQL that says what a
hold covers) are storage/metadata/legal_holds.py.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import psycopg
from psycopg import sql

from postkeep.storage.content import packs, sealing
from postkeep.storage.content.layout import (
    CONTENT_CLASSES,
    HOLD,
    KEEP,
    MESSAGES,
    class_prefix,
    held_key,
    is_held_key,
)
from postkeep.storage.content.packs import is_pack_key
from postkeep.storage.lifecycle import stats
from postkeep.storage.lifecycle.rules import RetentionStore
from postkeep.storage.metadata.audit import audit
from postkeep.storage.metadata.legal_holds import Hold, covered_sql, involves_sql
from postkeep.storage.metadata.messages import UNLIMITED

log = logging.getLogger("postkeep.storage")

Progress = Callable[[str], None]

# metadata_expires_at of rows under a hold: inside messages_held.
HELD_AT = datetime(9999, 1, 1, tzinfo=UNLIMITED.tzinfo)


# --- tables that follow a message's partition ---------------------------------

_CHILD_COLUMNS = ("message_id", "org_id", "metadata_expires_at", "held_metadata_expires_at")


def child_tables(conn: psycopg.Connection) -> list[str]:
    """Tables other than messages partitioned by metadata_expires_at, recipients first.

    Each must carry message_id, org_id and held_metadata_expires_at, so a
    held message's rows in it move with the message; a table that does not is
    refused here (BackendError naming it) rather than have held rows dropped.
    """
    from postkeep.storage.metadata.db import BackendError

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


# --- deleting message content --------------------------------------------------


def left_originals(key: str) -> list[str]:
    """Every key `protect` may have moved the held object KEY from ([] if not held).

    The class is not in a held key (layout.held_key), so one candidate per
    class, `keep` and the layout before classes: a delete of a key that is not
    there costs the server a lookup, and only content once held pays it.
    """
    if not is_held_key(key):
        return []
    rest = key.removeprefix(class_prefix(HOLD))
    return [MESSAGES + rest, class_prefix(KEEP) + rest,
            *(class_prefix(f"{d}d") + rest for d in CONTENT_CLASSES)]


def delete_content(store: RetentionStore, keys: list[str]) -> list[str]:
    """Delete the message objects KEYS, with any original a move under messages/hold/
    left behind (`left_originals`); return the KEYS not entirely deleted.

    Used wherever content is deleted for good (sweep, erasure, release), so
    nothing of a message stays in S3 once it is recorded gone.
    """
    groups = {k: [k, *left_originals(k)] for k in keys}
    failed = set(store.delete_many([x for group in groups.values() for x in group]))
    return [k for k, group in groups.items() if failed.intersection(group)]


# --- content protection ------------------------------------------------------


@dataclass(frozen=True)
class ProtectResult:
    moved: int
    gone: int  # covered objects already deleted before the hold (nothing to keep)
    # Originals S3 refused to delete after the move: they go with the held
    # copy (delete_content); no lifecycle rule reaches every layout.
    left: int = 0


_PROTECT_BATCH = 500


def protect(conn: psycopg.Connection, store: RetentionStore, hold: Hold,
            content_after: datetime, run_id: uuid.UUID | None = None,
            progress: Progress | None = None) -> ProtectResult:
    """Copy HOLD's not-yet-protected objects under messages/hold/ and repoint rows.

    Only messages whose content was still due to exist (content_expires_at
    after CONTENT_AFTER, the sweeper's watermark) and not erased.  Order per
    batch: copy, then repoint the rows, then delete the originals: a crash
    anywhere leaves every row pointing at an object that exists (an original
    left behind is deleted with the held copy, see delete_content).
    """
    if getattr(store, "object_lock", False):
        return _flag(conn, store, hold, content_after, run_id, progress)
    moved = gone = left = 0
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
        forget: list[uuid.UUID] = []  # packed messages copied out of their pack
        for mid, mexp, key, _created in rows:
            if is_held_key(key):
                continue
            if is_pack_key(key):
                # Its bytes are a range of a pack that expires whole: copy the
                # range out to the message's own held object.  The pack stays.
                where = packs.location(conn, mid)
                if where is None:
                    gone += 1
                    continue
                dst = held_key(f"{key.rsplit('/', 1)[0]}/{mid}.eml.zst")
                store.copy_range(key, where.offset, where.length, dst)
                repoint.append((mid, mexp, dst))
                forget.append(mid)
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
                packs.forget(conn, forget)
                audit(conn, run_id, "hold_protected", len(repoint), hold.org_id,
                      f"hold {hold.id}", {"to": "messages/hold/"})
            failed = store.delete_many(originals) if originals else []
            if failed:
                log.warning("hold %d: %d original objects not deleted after the move (they"
                            " go with the held copy): %s", hold.id, len(failed), failed[:3])
                left += len(failed)
            moved += len(repoint)
            if progress:
                progress(f"hold {hold.id} ({hold.scope()}): {moved} objects moved under"
                         " messages/hold/")
    return ProtectResult(moved, gone, left)


def _flag_state(hold: Hold) -> str:
    return f"hold-flag-{hold.id}"


def _flag(conn: psycopg.Connection, store: RetentionStore, hold: Hold,
          content_after: datetime, run_id: uuid.UUID | None,
          progress: Progress | None) -> ProtectResult:
    """protect() under Object Lock: the legal-hold flag on every covered object
    captured since the last run (rows stay where they are: nothing moves)."""
    flagged = gone = 0
    scope = "" if hold.address is None else f" AND {involves_sql('m', '%(addr)s')}"
    row = conn.execute("SELECT at, id FROM retention_state WHERE name = %s",
                       (_flag_state(hold),)).fetchone()
    last: tuple[datetime, uuid.UUID] = (row[0], row[1]) if row else (
        datetime.min.replace(tzinfo=HELD_AT.tzinfo), uuid.UUID(int=0))
    while True:
        rows = conn.execute(
            "SELECT m.id, m.object_key, m.created_at FROM messages m"
            " WHERE m.org_id = %(org)s AND (m.created_at, m.id) > (%(c)s, %(after)s)"
            f" AND m.content_erased_at IS NULL AND m.content_expires_at > %(content_after)s{scope}"
            " ORDER BY m.created_at, m.id LIMIT %(n)s",
            {"org": hold.org_id, "addr": hold.address, "c": last[0], "after": last[1],
             "content_after": content_after, "n": _PROTECT_BATCH}).fetchall()
        if not rows:
            break
        n = 0
        for _mid, key, _created in rows:
            if store.set_legal_hold(key, True):
                n += 1
            else:
                gone += 1
        last = (rows[-1][2], rows[-1][0])
        with conn.transaction():
            conn.execute(
                "INSERT INTO retention_state (name, at, id) VALUES (%s, %s, %s)"
                " ON CONFLICT (name) DO UPDATE SET at = EXCLUDED.at, id = EXCLUDED.id,"
                " updated_at = now()", (_flag_state(hold), *last))
            audit(conn, run_id, "hold_protected", n, hold.org_id, f"hold {hold.id}",
                  {"object_lock_legal_hold": True})
        flagged += n
        if progress:
            progress(f"hold {hold.id} ({hold.scope()}): {flagged} objects given the Object"
                     " Lock legal hold")
    return ProtectResult(flagged, gone)


def _unflag(conn: psycopg.Connection, store: RetentionStore, free: str,
            params: dict[str, Any], hold: Hold) -> int:
    """Clear the legal-hold flags of what HOLD covered and no other hold does."""
    keys = {r[0] for r in conn.execute(
        f"SELECT m.object_key FROM messages m WHERE {free} AND m.content_erased_at IS NULL",
        params).fetchall()}
    # One flag covers a whole object: a pack shared by messages of several
    # holds (or an object several messages point at) keeps it while any
    # active hold covers any of its members.
    cleared = sum(1 for k in keys - _still_flagged(conn, hold.org_id)
                  if store.set_legal_hold(k, False))
    conn.execute("DELETE FROM retention_state WHERE name = %s", (_flag_state(hold),))
    return cleared


def _still_flagged(conn: psycopg.Connection, org_id: uuid.UUID) -> set[str]:
    """The objects of ORG_ID an active hold still covers a message of: its own
    object, or the pack that indexes it."""
    return {k for row in conn.execute(
        "SELECT m.object_key, mp.pack_key FROM messages m LEFT JOIN message_packs mp"
        " ON mp.message_id = m.id AND mp.org_id = m.org_id WHERE m.org_id = %s"
        f" AND m.content_erased_at IS NULL AND {covered_sql('m')}", (org_id,)).fetchall()
        for k in row if k is not None}


# --- release ------------------------------------------------------------------


@dataclass(frozen=True)
class ReleaseResult:
    rows_restored: int
    rows_dropped: int
    objects_deleted: int
    keys_back: int = 0  # sealed content's data keys back to their content expiry


def reconcile_released(conn: psycopg.Connection, store: RetentionStore, hold: Hold,
                       now: datetime, run_id: uuid.UUID | None = None) -> ReleaseResult:
    """Apply the release of HOLD to what it alone kept.

    Rows it moved into the held partitions go back to their own metadata
    stamp, or are removed (their statistics kept) if that has passed; objects
    it kept under messages/hold/ past their content stamp are deleted.  What
    another active hold still covers stays.  Idempotent; reconciled_at marks
    the end.
    """

    scope = "" if hold.address is None else f" AND {involves_sql('m', '%(addr)s')}"
    params = {"org": hold.org_id, "addr": hold.address, "now": now, "held": HELD_AT}
    free = f"m.org_id = %(org)s{scope} AND NOT {covered_sql('m')}"
    # Objects first: once rows are gone nothing would point at them.
    # Content the sweeper skipped because the hold covered it: everything
    # under messages/hold/, and anything that expired while the hold was on
    # (a day's margin before it for a sweeper that runs at least daily).
    # Deleting a key that is already gone is harmless.
    params["since"] = hold.created_at - timedelta(days=1)
    if getattr(store, "object_lock", False):
        _unflag(conn, store, free, params, hold)
    expired_objects = conn.execute(
        f"SELECT m.object_key FROM messages m WHERE {free}"
        " AND m.content_erased_at IS NULL AND m.content_expires_at <= %(now)s"
        " AND (m.object_key LIKE 'messages/hold/%%' OR m.content_expires_at >= %(since)s)",
        params).fetchall()
    # A pack goes whole, and only once no message reads from it any more.
    keys = [r[0] for r in expired_objects if not is_pack_key(r[0])]
    failed = delete_content(store, keys) if keys else []
    in_packs = {r[0] for r in expired_objects if is_pack_key(r[0])}
    if in_packs:
        keys += packs.sweep(conn, store.delete_many, now, in_packs, only=True).keys
    if failed:
        from postkeep.storage.metadata.db import BackendError

        raise BackendError("s3", f"hold {hold.id}: {len(failed)} held objects not deleted,"
                           f" e.g. {failed[0]}")
    with conn.transaction():
        # Sealed content's keys it moved to 'infinity' go back to their
        # message's content expiry (first: the rows below may go); this run's
        # key expiry destroys those already past it (storage/content/sealing.py).
        keys_back = sealing.release_keys(conn, free, params)
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
                                  "objects_deleted": len(keys), "data_keys_back": keys_back})
    return ReleaseResult(restored, dropped, len(keys), keys_back)
