"""The retention run: partitions ahead, content expiry, statistics, partition drops.

`run_retention` is one pass, called by `postkeep retention run` and on a
schedule by the sidecar.  Its steps, each idempotent and audited
(`retention_audit`, one row per action with the run's id):

1. create metadata partitions ahead of time (`ensure_partitions`);
2. content expiry mode: install the lifecycle rules (one per retention class,
   storage/lifecycle/rules.py) or, on a server without lifecycle support, sweep
   everything;
3. legal holds: move newly covered objects under messages/hold/; apply
   released holds (storage/lifecycle/holds.py);
4. sweep content: walk `messages` in (content_expires_at, id) order from a
   watermark kept in `retention_state`, deleting in batches (one S3
   multi-delete per batch) the objects whose stamp has passed and that no
   lifecycle rule will delete; the watermark only moves past what is done,
   so a crash or an S3 failure repeats at most one batch (deletes are
   idempotent);
5. drop every weekly partition pair whose upper bound has passed and that
   the sweep has fully covered: in one transaction per week, rows under a
   legal hold move to the held partitions, the week's counts are added to
   delivery_stats_dropped (its statistics are rolled up before the rows go),
   both partitions are dropped and the audit row is written, so a crash
   leaves the week either untouched or gone, never half;
6. recompute the daily statistics (storage/lifecycle/stats.py) of the recent days and
   of the days just dropped, as (rows present) + (counts of dropped rows).

Two runs at once: a session-level advisory lock serialises them (the second
waits, then finds little to do); a killed run's lock goes with its connection.
Content availability is never written: readers derive it from the stamp.
"""

from __future__ import annotations

import logging
import re
import time as _time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta

import psycopg
from psycopg import errors, sql

from postkeep.config import RetentionConfig
from postkeep.ids import uuid7
from postkeep.storage.content import packs, sealing
from postkeep.storage.content.packs import is_pack_key
from postkeep.storage.lifecycle import holds, stats
from postkeep.storage.lifecycle.holds import HELD_AT
from postkeep.storage.lifecycle.rules import RetentionStore, planned_rules
from postkeep.storage.metadata import legal_holds, migrate
from postkeep.storage.metadata.audit import audit
from postkeep.storage.metadata.db import BackendError
from postkeep.storage.metadata.legal_holds import covered_sql

log = logging.getLogger("postkeep.storage")

Progress = Callable[[str], None]
LOCK_KEY = "postkeep.retention"
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
ZERO_ID = uuid.UUID(int=0)


@dataclass(frozen=True)
class RetentionSettings:
    """How a run behaves ([retention] in postkeep.toml)."""

    # 'auto': lifecycle rules where the server supports them, else sweep all;
    # 'lifecycle': rules required; 'sweep': never install rules, sweep all.
    content_expiry: str = "auto"
    sweep_batch: int = 1000
    # Days (before today) whose statistics every run recomputes: late DSNs
    # change yesterday's counts.
    stats_days: int = 8
    # How long a partition drop waits for its lock before backing off (the
    # drop blocks captures while it waits), and how often it tries.
    lock_timeout_ms: int = 2000
    drop_attempts: int = 5


@dataclass
class RunReport:
    """What one run did."""

    run_id: uuid.UUID
    started: datetime
    mode: str = ""
    rules: int = 0
    partitions_created: int = 0
    partitions_dropped: list[str] = field(default_factory=list)
    partitions_skipped: list[str] = field(default_factory=list)
    messages_dropped: int = 0
    recipients_dropped: int = 0
    held_rows_kept: int = 0
    objects_swept: int = 0
    objects_left_to_lifecycle: int = 0
    sweep_failures: int = 0
    held_objects_protected: int = 0
    holds_reconciled: int = 0
    stats_rows: int = 0
    parts_swept: int = 0
    packs_swept: int = 0
    dictionaries_swept: int = 0
    keys_expired: int = 0  # sealed content's data keys destroyed (storage/content/sealing.py)
    seconds: float = 0.0
    errors: list[str] = field(default_factory=list)

    def summary(self) -> str:
        """One line for logs and the CLI."""
        return (
            f"retention run {self.run_id}: mode={self.mode} rules={self.rules}"
            f" partitions_created={self.partitions_created}"
            f" partitions_dropped={len(self.partitions_dropped)}"
            f" messages_dropped={self.messages_dropped}"
            f" recipients_dropped={self.recipients_dropped} held_rows_kept={self.held_rows_kept}"
            f" objects_swept={self.objects_swept}"
            f" left_to_lifecycle={self.objects_left_to_lifecycle}"
            f" held_objects_protected={self.held_objects_protected}"
            f" holds_reconciled={self.holds_reconciled} stats_rows={self.stats_rows}"
            f" parts_swept={self.parts_swept} dictionaries_swept={self.dictionaries_swept}"
            f" keys_expired={self.keys_expired}"
            f" errors={len(self.errors)} seconds={self.seconds:.2f}"
        )


# --- pure decisions -------------------------------------------------------------

_BOUND = re.compile(r"FROM \('([^']+)'\) TO \((?:'([^']+)'|MAXVALUE)\)")


def parse_bounds(expr: str) -> tuple[datetime, datetime | None] | None:
    """(lower, upper) of a range partition bound as pg_get_expr prints it (UTC session).

    None for anything that is not a FROM/TO range; upper None for MAXVALUE.
    """
    m = _BOUND.search(expr)
    if not m:
        return None
    return _ts(m.group(1)), (_ts(m.group(2)) if m.group(2) else None)


def _ts(text: str) -> datetime:
    if re.search(r"[+-]\d\d$", text):
        text += ":00"
    when = datetime.fromisoformat(text)
    return when if when.tzinfo else when.replace(tzinfo=UTC)


@dataclass(frozen=True)
class Week:
    """One week's partitions of messages, message_recipients and any other
    table partitioned by metadata_expires_at (OTHERS: (table, partition))."""

    messages: str
    recipients: str
    lower: datetime
    upper: datetime
    others: tuple[tuple[str, str], ...] = ()

    def partitions(self) -> list[str]:
        """Every partition of the week, messages first."""
        return [self.messages, self.recipients, *(p for _, p in self.others)]


def droppable(weeks: list[Week], cutoff: datetime) -> list[Week]:
    """Weeks whose every row's metadata stamp is before CUTOFF, oldest first.

    Never the held or unlimited partitions (their bounds start in 9999).
    """
    return sorted((w for w in weeks if w.upper <= cutoff and w.lower < HELD_AT),
                  key=lambda w: w.lower)


def day_ranges(days: list[date], first: date, last: date) -> list[tuple[date, date]]:
    """DAYS plus FIRST..LAST as few inclusive (first, last) ranges, oldest first."""
    spans = sorted([(d, d) for d in days] + [(first, last)])
    out: list[tuple[date, date]] = []
    for lo, hi in spans:
        if out and lo <= out[-1][1] + timedelta(days=1):
            out[-1] = (out[-1][0], max(out[-1][1], hi))
        else:
            out.append((lo, hi))
    return out


def choose_mode(setting: str, server_rules_supported: bool) -> str:
    """'lifecycle' or 'sweep' from the setting and what the server supports."""
    if setting == "sweep":
        return "sweep"
    if setting == "lifecycle" and not server_rules_supported:
        raise BackendError("s3", "retention.content_expiry = 'lifecycle' but the S3 server"
                                 " has no lifecycle support; use 'auto' or 'sweep'")
    return "lifecycle" if server_rules_supported else "sweep"


# --- the run ------------------------------------------------------------------------


class Stopped(Exception):
    """The run was asked to stop (should_stop) between two steps of work."""


def run_retention(conn: psycopg.Connection, store: RetentionStore, now: datetime | None = None,
                  progress: Progress | None = None,
                  settings: RetentionSettings = RetentionSettings(),
                  sweep_from: datetime | None = None,
                  should_stop: Callable[[], bool] | None = None) -> RunReport:
    """One retention pass (see the module docstring); never two at once.

    CONN is an autocommit connection used only by this call; NOW the time
    the run treats as current; PROGRESS receives human-readable lines;
    SWEEP_FROM rewinds the sweeper's watermark (e.g. after a spool drain of
    old mail); SHOULD_STOP is polled between batches and weeks (a daemon
    shutting down), and a stop ends the run early like a crash would, minus
    the crash.  Errors of one step are recorded in the report and the run
    goes on with the steps that do not depend on it.
    """
    say = progress or (lambda _line: None)
    stop = should_stop or (lambda: False)
    report = RunReport(uuid7(), datetime.now(UTC))
    started = _time.monotonic()
    with _session(conn), run_lock(conn, say):
        now = now or datetime.now(UTC)
        report.partitions_created = migrate.ensure_partitions(conn)
        if report.partitions_created:
            audit(conn, report.run_id, "partitions_created", report.partitions_created)
            say(f"created {report.partitions_created} partition(s) ahead")
        _lifecycle(conn, store, settings, report, say)
        watermark = _watermark(conn, sweep_from, report.run_id)
        try:
            _holds(conn, store, watermark[0], now, report, say)
            expired_packs: set[str] = set()
            watermark = _sweep(conn, store, watermark, now, settings, report, say, stop,
                               expired_packs)
            _packs(conn, store, now, report, say, expired_packs)
            _expire_keys(conn, now, report, say)
            weeks = droppable(list_weeks(conn), min(now, watermark[0]))
            _drop(conn, weeks, settings, report, say, stop)
            _shared_content(conn, store, now, report, say)
            _rollup(conn, now, settings, report, say)
        except Stopped:
            report.errors.append("stopped before the end (shutdown); the next run carries on")
            say("stopped before the end; the next run carries on")
        report.seconds = _time.monotonic() - started
        audit(conn, report.run_id, "run", len(report.partitions_dropped), None, None,
              {"summary": report.summary(), "errors": report.errors[:20]})
    log.info("%s", report.summary())
    return report


class KeyDeleter:
    """One key at a time over a RetentionStore: what the part and dictionary
    sweeps need (storage/content/parts.py Deleter)."""

    def __init__(self, store: RetentionStore) -> None:
        self.store = store

    def delete(self, key: str) -> None:
        if self.store.delete_many([key]):
            raise BackendError("s3", f"could not delete {key}")


def _packs(conn: psycopg.Connection, store: RetentionStore, now: datetime,
           report: RunReport, say: Progress, candidates: set[str]) -> None:
    """Packs whose every message's content has expired go whole
    (storage/content/packs.py), in either mode."""
    try:
        swept = packs.sweep(conn, store.delete_many, now, candidates,
                            locked=bool(getattr(store, "object_lock", False)))
    except (BackendError, psycopg.Error) as exc:
        report.errors.append(f"pack sweep: {exc}")
        say(f"pack sweep failed: {exc}")
        return
    report.packs_swept = swept.deleted
    if swept.failed:
        report.errors.append(f"pack sweep: {swept.failed} packs not deleted")
    if swept.deleted:
        audit(conn, report.run_id, "packs_swept", swept.deleted, None, None,
              {"failed": swept.failed})
        say(f"swept {swept.deleted} expired pack(s)")


def _expire_keys(conn: psycopg.Connection, now: datetime, report: RunReport,
                 say: Progress) -> None:
    """Crypto-shred sealed content past its expiry: drop the data-key
    partitions whose month has passed, delete the passed rows of the current
    one (storage/content/sealing.py).  Keys of messages a legal hold covers
    move to the never-dropped partition first (and back to their content
    expiry once released: holds.reconcile_released, an earlier step of the
    same run, so those past it go here).  Instant and exact whatever
    the bytes: those go with their pack (lifecycle rule or pack sweep)."""
    try:
        with conn.transaction():
            # Keys a hold moved to 'infinity' in an organisation with no
            # active hold at all go back to their expiry: the holds
            # reconciled before release_keys existed left theirs there.
            # (Only those organisations' rows: a held organisation's
            # 'infinity' keys are not joined with its messages every run.)
            sealing.release_keys(conn, "k.org_id NOT IN (SELECT h.org_id FROM legal_holds h"
                                 " WHERE h.released_at IS NULL)", {})
            kept = sealing.hold_keys(conn, now, covered_sql)
            dropped, deleted = sealing.expire(conn, now)
    except psycopg.Error as exc:
        report.errors.append(f"key expiry: {exc}")
        say(f"key expiry failed: {exc}")
        return
    report.keys_expired = deleted
    if dropped or deleted or kept:
        audit(conn, report.run_id, "keys_expired", deleted, None, None,
              {"partitions_dropped": dropped, "held_keys_kept": kept})
        say(f"expired content keys: {deleted} row(s) deleted, {dropped} key partition(s)"
            f" dropped, {kept} kept for legal holds")


def _shared_content(conn: psycopg.Connection, store: RetentionStore, now: datetime,
                    report: RunReport, say: Progress) -> None:
    """Parts stored once per organisation and zstd dictionaries go when no
    unexpired (or held) message needs them any more."""
    from postkeep.storage.content.dictionaries import sweep_dictionaries
    from postkeep.storage.content.parts import sweep_parts

    try:
        swept = sweep_parts(conn, KeyDeleter(store), now)
        report.parts_swept = swept.deleted
        report.dictionaries_swept = sweep_dictionaries(conn, KeyDeleter(store), now)
    except (BackendError, psycopg.Error) as exc:
        report.errors.append(f"parts/dictionaries sweep: {exc}")
        say(f"parts/dictionaries sweep failed: {exc}")
        return
    if report.parts_swept or report.dictionaries_swept:
        audit(conn, report.run_id, "shared_content_swept", report.parts_swept, None, None,
              {"parts": report.parts_swept, "bytes": swept.bytes_freed,
               "dictionaries": report.dictionaries_swept})
        say(f"swept {report.parts_swept} part object(s) ({swept.bytes_freed} bytes) and"
            f" {report.dictionaries_swept} dictionary version(s)")


@contextmanager
def _session(conn: psycopg.Connection) -> Iterator[None]:
    """UTC and no statement timeout for this connection, restored afterwards."""
    conn.execute("SET TIME ZONE 'UTC'")
    conn.execute("SET statement_timeout = 0")
    try:
        yield
    finally:
        if not conn.closed:
            conn.execute("RESET statement_timeout")
            conn.execute("RESET TIME ZONE")


@contextmanager
def run_lock(conn: psycopg.Connection, say: Progress) -> Iterator[None]:
    """Hold the retention advisory lock (session level) for the duration.

    Erasure and hold changes take it too, so none of them interleaves with a
    run.  If another session holds it, say so and wait.
    """
    got = conn.execute("SELECT pg_try_advisory_lock(hashtext(%s))", (LOCK_KEY,)).fetchone()
    if not (got and got[0]):
        holder = conn.execute(
            "SELECT a.pid, a.application_name, a.backend_start FROM pg_locks l"
            " JOIN pg_stat_activity a ON a.pid = l.pid WHERE l.locktype = 'advisory'"
            " AND l.objid = hashtext(%s)::oid AND l.granted", (LOCK_KEY,)).fetchone()
        who = f"backend pid {holder[0]}" if holder else "another session"
        say(f"waiting for another retention run or erasure ({who}) to finish")
        conn.execute("SELECT pg_advisory_lock(hashtext(%s))", (LOCK_KEY,))
    try:
        yield
    finally:
        if not conn.closed:
            conn.execute("SELECT pg_advisory_unlock(hashtext(%s))", (LOCK_KEY,))


def _lifecycle(conn: psycopg.Connection, store: RetentionStore, settings: RetentionSettings,
               report: RunReport, say: Progress) -> None:
    """Decide the mode; make sure the class rules are installed in lifecycle mode."""
    try:
        installed = store.rules() if settings.content_expiry != "sweep" else None
        report.mode = choose_mode(settings.content_expiry, installed is not None)
        if report.mode == "lifecycle":
            lock = bool(getattr(store, "object_lock", False))
            wanted = planned_rules(lock or store.versioned(), lock)
            if lock:
                # Object Lock: no class rules (planned_rules); content goes by
                # the sweeper, version by version, once its retention passed.
                report.mode = "sweep"
            if sorted(installed or [], key=lambda r: r.rule_id) != sorted(
                    wanted, key=lambda r: r.rule_id):
                total = store.apply_rules(wanted)
                audit(conn, report.run_id, "lifecycle_applied", len(wanted), None, None,
                      {"bucket_rules": total})
                say(f"installed {len(wanted)} lifecycle rules (bucket now has {total})")
            report.rules = len(wanted)
    except BackendError as exc:
        # Without knowing the rules are there, sweeping everything is the safe side.
        report.mode = "sweep"
        report.errors.append(f"lifecycle: {exc}")
        say(f"lifecycle rules not available ({exc}); sweeping all expired content")


def _watermark(conn: psycopg.Connection, sweep_from: datetime | None,
               run_id: uuid.UUID) -> tuple[datetime, uuid.UUID]:
    """The sweeper's (content_expires_at, id) position, rewound to SWEEP_FROM if given."""
    if sweep_from is not None:
        conn.execute(
            "INSERT INTO retention_state (name, at, id) VALUES ('sweep', %s, %s)"
            " ON CONFLICT (name) DO UPDATE SET at = EXCLUDED.at, id = EXCLUDED.id,"
            " updated_at = now()", (sweep_from, ZERO_ID))
        audit(conn, run_id, "sweep_rewound", 0, None, None, {"to": sweep_from.isoformat()})
        return sweep_from, ZERO_ID
    row = conn.execute("SELECT at, id FROM retention_state WHERE name = 'sweep'").fetchone()
    return (row[0], row[1]) if row else (EPOCH, ZERO_ID)


def _holds(conn: psycopg.Connection, store: RetentionStore, watermark: datetime,
           now: datetime, report: RunReport, say: Progress) -> None:
    """Protect what active holds cover; apply released holds."""
    for hold in legal_holds.list_holds(conn):
        try:
            res = holds.protect(conn, store, hold, watermark, report.run_id, say)
            report.held_objects_protected += res.moved
            if res.left:
                report.errors.append(f"hold {hold.id}: {res.left} original objects not deleted"
                                     " after the move under messages/hold/; they go with the"
                                     " held copies")
        except BackendError as exc:
            report.errors.append(f"hold {hold.id}: {exc}")
            say(f"hold {hold.id}: protecting content failed: {exc}")
    released = conn.execute("SELECT id FROM legal_holds WHERE released_at IS NOT NULL"
                            " AND reconciled_at IS NULL ORDER BY id").fetchall()
    for (hold_id,) in released:
        released_hold = legal_holds.get_hold(conn, hold_id)
        assert released_hold is not None
        try:
            res2 = holds.reconcile_released(conn, store, released_hold, now, report.run_id)
        except (BackendError, psycopg.Error) as exc:
            report.errors.append(f"released hold {hold_id}: {exc}")
            say(f"released hold {hold_id}: not applied yet: {exc}")
            continue
        report.holds_reconciled += 1
        say(f"released hold {hold_id} ({released_hold.scope()}): {res2.rows_restored} messages back"
            f" to their own expiry, {res2.rows_dropped} past it removed,"
            f" {res2.objects_deleted} held objects deleted")


# Objects a lifecycle rule will delete (messages/<n>d/...): in lifecycle mode
# the sweeper skips them in SQL, so walking a million such rows is one index
# scan, not a thousand round trips.  Erased content is gone already.
_RULED = r"^messages/[0-9]+d/"
_SWEEP_BATCH = sql.SQL(
    "SELECT m.content_expires_at, m.id, m.object_key, {covered} FROM messages m"
    " WHERE (m.content_expires_at, m.id) > (%(at)s, %(id)s) AND m.content_expires_at <= %(now)s"
    " AND (m.content_erased_at IS NULL OR %(locking)s)"
    " AND NOT (%(ruled)s AND m.object_key ~ %(pattern)s)"
    " ORDER BY m.content_expires_at, m.id LIMIT %(n)s"
).format(covered=sql.SQL(covered_sql("m")))


def _sweep(conn: psycopg.Connection, store: RetentionStore,
           watermark: tuple[datetime, uuid.UUID], now: datetime, settings: RetentionSettings,
           report: RunReport, say: Progress, stop: Callable[[], bool],
           expired_packs: set[str]) -> tuple[datetime, uuid.UUID]:
    """Delete expired content nothing else will delete; return the new watermark.

    Packs are never deleted here (one message's expiry is not its pack's):
    the keys of packs holding expired messages go into EXPIRED_PACKS for
    the pack sweep.
    """
    ruled = report.mode == "lifecycle"
    # With Object Lock an erasure may have left the bytes (the server refused
    # the delete until the content expiry): erased rows are swept too then.
    locking = bool(getattr(store, "object_lock", False))
    todo_row = conn.execute(
        "SELECT count(*), count(*) FILTER (WHERE %s AND m.object_key ~ %s) FROM messages m"
        " WHERE (m.content_expires_at, m.id) > (%s, %s) AND m.content_expires_at <= %s"
        " AND (m.content_erased_at IS NULL OR %s)",
        (ruled, _RULED, *watermark, now, locking)).fetchone()
    expired, by_rules = (int(todo_row[0]), int(todo_row[1])) if todo_row else (0, 0)
    todo = expired - by_rules
    report.objects_left_to_lifecycle = by_rules
    if expired:
        say(f"sweep: {expired} messages past their content expiry since"
            f" {watermark[0]:%Y-%m-%d %H:%M}; {by_rules} left to lifecycle rules,"
            f" {todo} to check")
    seen = 0
    stopped = False  # by an S3 failure: the watermark stays where the sweep got to
    at, last = watermark
    while True:
        if stop():
            raise Stopped
        rows = conn.execute(_SWEEP_BATCH, {"at": at, "id": last, "now": now, "ruled": ruled,
                                           "locking": locking,
                                           "pattern": _RULED, "n": settings.sweep_batch}
                            ).fetchall()
        if not rows:
            break
        # Held: kept (and reconciled when the hold is released).  A pack is
        # never deleted for one message: the pack sweep deletes it whole.
        doomed = [key for _exp, _mid, key, held in rows if not held and not is_pack_key(key)]
        in_packs = {key for _exp, _mid, key, held in rows if not held and is_pack_key(key)}
        expired_packs.update(in_packs)
        try:
            failed = set(holds.delete_content(store, doomed)) if doomed else set()
            # Packs whose every message has now expired go here, whole; the
            # others when their last message does (the pack sweep).
            packs_gone = set(packs.sweep(conn, store.delete_many, now, in_packs,
                                         only=True).keys) if in_packs else set()
        except BackendError as exc:
            report.errors.append(f"sweep: {exc}")
            say(f"sweep stopped: {exc}")
            stopped = True
            break
        # Advance only past the rows fully handled: up to the first failure.
        done = rows
        if failed:
            first_bad = next(i for i, r in enumerate(rows) if r[2] in failed)
            done = rows[:first_bad]
            report.sweep_failures += len(failed)
            stopped = True
            report.errors.append(f"sweep: {len(failed)} objects not deleted, e.g."
                                 f" {sorted(failed)[0]}")
        done_keys = {r[2] for r in done}
        deleted = sum(1 for k in doomed if k not in failed and k in done_keys)
        deleted += sum(1 for r in done if r[2] in packs_gone)
        if done:
            at, last = done[-1][0], done[-1][1]
            with conn.transaction():
                conn.execute(
                    "INSERT INTO retention_state (name, at, id) VALUES ('sweep', %s, %s)"
                    " ON CONFLICT (name) DO UPDATE SET at = EXCLUDED.at, id = EXCLUDED.id,"
                    " updated_at = now()", (at, last))
                audit(conn, report.run_id, "content_swept", deleted, None, None,
                      {"through": at.isoformat(), "mode": report.mode})
            report.objects_swept += deleted
        seen += len(done)
        say(f"sweep: {seen}/{todo} messages checked, {report.objects_swept} objects deleted"
            + (f" ({100 * seen // todo}%)" if todo else ""))
        if failed or len(rows) < settings.sweep_batch:
            break
    if not stopped:
        # Everything that expired by NOW is handled: that is the watermark
        # (what partition drops may rely on), not the last row swept.
        at, last = now, ZERO_ID
        conn.execute(
            "INSERT INTO retention_state (name, at, id) VALUES ('sweep', %s, %s)"
            " ON CONFLICT (name) DO UPDATE SET at = greatest(retention_state.at, EXCLUDED.at),"
            " id = CASE WHEN EXCLUDED.at >= retention_state.at THEN EXCLUDED.id"
            " ELSE retention_state.id END, updated_at = now()", (at, last))
    return at, last


def list_weeks(conn: psycopg.Connection) -> list[Week]:
    """Every week's partitions with their bounds (the session must be in UTC).

    Tables partitioned by metadata_expires_at are found in the catalog (as
    ensure_partitions() finds them), so a table added later is dropped with
    its week too; see holds.child_tables for what such a table must carry.
    """
    tables = ["messages", *holds.child_tables(conn)]
    rows = conn.execute(
        "SELECT p.relname::text, c.relname::text, pg_get_expr(c.relpartbound, c.oid)"
        " FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid"
        " JOIN pg_class p ON p.oid = i.inhparent"
        " WHERE p.relname = ANY(%s) AND p.relnamespace = current_schema()::regnamespace",
        (tables,)).fetchall()
    by_bounds: dict[tuple[datetime, datetime], dict[str, str]] = {}
    for parent, child, expr in rows:
        bounds = parse_bounds(expr or "")
        if bounds is None or bounds[1] is None:
            continue
        by_bounds.setdefault((bounds[0], bounds[1]), {})[parent] = child
    return [Week(pair["messages"], pair["message_recipients"], lo, hi,
                 tuple(sorted((t, p) for t, p in pair.items()
                              if t not in ("messages", "message_recipients"))))
            for (lo, hi), pair in by_bounds.items()
            if "messages" in pair and "message_recipients" in pair]


def _rollup(conn: psycopg.Connection, now: datetime, settings: RetentionSettings,
            report: RunReport, say: Progress) -> None:
    """Recompute the statistics of recent days and of every day rows left since.

    After the drops, not before: a drop moves its counts to
    delivery_stats_dropped in its own transaction, so (rows present) +
    (dropped counts) is the same total before and after, and recomputing
    afterwards also picks up the last status changes of the dropped rows.
    The days to redo beyond the recent ones are read from
    delivery_stats_dropped (newer than their daily row), so a run killed
    between a drop and this step is caught up by the next one.
    """
    today = now.astimezone(UTC).date()
    stale = [r[0] for r in conn.execute(
        "SELECT DISTINCT d.day FROM delivery_stats_dropped d LEFT JOIN delivery_stats_daily s"
        " ON s.org_id = d.org_id AND s.day = d.day"
        " WHERE s.updated_at IS NULL OR s.updated_at < d.updated_at")]
    t0 = _time.monotonic()
    report.stats_rows = 0
    for first, last in day_ranges(stale, today - timedelta(days=settings.stats_days), today):
        report.stats_rows += stats.rollup(conn, first, last)
        audit(conn, report.run_id, "stats_rolled_up", report.stats_rows, None, None,
              {"first_day": first.isoformat(), "last_day": last.isoformat()})
    say(f"statistics: {report.stats_rows} organisation-days recomputed"
        f" ({len(stale)} day(s) with dropped rows) in {_time.monotonic() - t0:.1f}s")


def _drop(conn: psycopg.Connection, weeks: list[Week], settings: RetentionSettings,
          report: RunReport, say: Progress, stop: Callable[[], bool]) -> None:
    """Drop each expired week in its own transaction (see module docstring)."""
    for n, week in enumerate(weeks, 1):
        if stop():
            raise Stopped
        for attempt in range(1, settings.drop_attempts + 1):
            try:
                kept, archived = _drop_week(conn, week, settings, report.run_id)
                break
            except errors.LockNotAvailable:
                pause = min(30.0, 0.5 * 2 ** attempt)
                say(f"partition {week.messages}: lock not granted within"
                    f" {settings.lock_timeout_ms} ms (attempt {attempt}); retrying in {pause:g}s")
                _time.sleep(pause)
            except errors.UndefinedTable:
                kept, archived = 0, None  # dropped meanwhile (a crashed run's last commit)
                break
        else:
            report.partitions_skipped.append(week.messages)
            report.errors.append(f"partition {week.messages}: lock not granted after"
                                 f" {settings.drop_attempts} attempts")
            continue
        report.partitions_dropped.append(week.messages)
        report.held_rows_kept += kept
        if archived is not None:
            report.messages_dropped += archived.messages
            report.recipients_dropped += archived.recipients
        say(f"dropped {week.messages} and {week.recipients} ({n}/{len(weeks)}):"
            f" {archived.messages if archived else 0} messages,"
            f" {archived.recipients if archived else 0} recipients; {kept} held messages kept")


def _drop_week(conn: psycopg.Connection, week: Week, settings: RetentionSettings,
               run_id: uuid.UUID) -> tuple[int, stats.Archived]:
    with conn.transaction():
        conn.execute(sql.SQL("SET LOCAL lock_timeout = {}").format(
            sql.Literal(f"{settings.lock_timeout_ms}ms")))
        # Lock the week's partitions first, so nothing is added to them after
        # the held rows have been moved out and the counts taken.
        parts = sql.SQL(", ").join(map(sql.Identifier, week.partitions()))
        conn.execute(sql.SQL("LOCK TABLE {} IN ACCESS EXCLUSIVE MODE").format(parts))
        kept_row = conn.execute(sql.SQL(
            "WITH moved AS (UPDATE messages m SET held_metadata_expires_at ="
            " m.metadata_expires_at, metadata_expires_at = %(held)s"
            " WHERE m.metadata_expires_at >= %(lo)s AND m.metadata_expires_at < %(hi)s"
            " AND {covered} RETURNING m.id, m.org_id, m.held_metadata_expires_at){children}"
            " SELECT count(*) FROM moved"
        ).format(covered=sql.SQL(covered_sql("m")),
                 children=holds.move_children_sql(
                     ["message_recipients", *(t for t, _ in week.others)])),
            {"held": HELD_AT, "lo": week.lower, "hi": week.upper}).fetchone()
        kept = int(kept_row[0]) if kept_row else 0
        archived = stats.archive_partitions(conn, week.messages, week.recipients)
        conn.execute(sql.SQL("DROP TABLE {}").format(parts))
        audit(conn, run_id, "partition_dropped", archived.messages, None, week.messages,
              {"recipients_partition": week.recipients,
               "other_partitions": [p for _, p in week.others],
               "recipients": archived.recipients, "held_messages_kept": kept,
               "from": week.lower.isoformat(), "to": week.upper.isoformat(),
               "first_day": archived.first_day.isoformat() if archived.first_day else None,
               "last_day": archived.last_day.isoformat() if archived.last_day else None})
    return kept, archived


def settings_of(cfg: RetentionConfig) -> RetentionSettings:
    """A run's settings from [retention]."""
    return RetentionSettings(content_expiry=cfg.content_expiry, sweep_batch=cfg.sweep_batch,
                             stats_days=cfg.stats_days, lock_timeout_ms=cfg.lock_timeout_ms,
                             drop_attempts=cfg.drop_attempts)
