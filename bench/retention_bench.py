"""Retention benchmark: `postkeep retention run` over a few million rows.

Fills a private stack's database with N messages (2 recipients each, so 3N
rows) spread over weekly partitions: a share of them stamped into weeks that
have already ended (expired metadata), the rest into the weeks ahead.  Rows
are generated server-side (INSERT ... SELECT generate_series), not captured:
what is measured is the retention run, not the capture path.

Then it times, as an operator would run them:
  1. `postkeep retention run` (auto: lifecycle rules on MinIO, so the sweeper
     walks the expired rows but leaves classed objects to the rules) — the
     big drop;
  2. the same command again at once (what a second run costs when there is
     nothing to do);
  3. a sweep-mode run over K real objects in MinIO (S3 multi-delete rate);
  4. the capture-side price of the retention indexes (one B-tree, two BRIN):
     the batched capture INSERT (storage.messages.record_captures, 64 a
     batch) with and without them.
and prints a markdown summary: wall times, rows dropped per second, WAL
written, database size before and after.

Usage (the stack must be up; `make bench-retention` does all of it):
    python bench/retention_bench.py --config DIR/postkeep.toml [--messages 1000000]
        [--expired-share 0.7] [--orgs 100] [--objects 20000]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg
from psycopg import sql

from postkeep.config import load
from postkeep.storage.content.objects import S3ObjectStore, message_key
from postkeep.storage.metadata import directory, messages, migrate

POSTKEEP = str(Path(sys.executable).with_name("postkeep"))
CHUNK = 100_000

_GENERATE = """
WITH m AS (
    INSERT INTO messages (id, org_id, domain, queue_id, envelope_from, header_from, subject,
        size, object_key, compressed_size, sha256, content_expires_at, metadata_expires_at,
        status, recipient_count, created_at, accepted_at)
    SELECT gen_random_uuid(), o, 'bench.example', upper(substr(md5(i::text), 1, 10)),
        'app@bench.example', 'app@bench.example', 'bench ' || i, 3000 + i %% 5000,
        'messages/7d/' || o || '/' || i || '.eml.zst', 1200 + i %% 2000,
        decode(md5(i::text) || md5(i::text), 'hex'),
        s - interval '23 days', s, 'queued', 2, s - interval '30 days', s - interval '30 days'
    FROM generate_series(%(a)s::bigint, %(b)s::bigint) AS i,
        LATERAL (SELECT (%(orgs)s::uuid[])[1 + i %% %(norgs)s] AS o,
                 %(lo)s::timestamptz + (%(hi)s::timestamptz - %(lo)s::timestamptz)
                 * ((i - %(a)s)::float8 / (%(b)s - %(a)s + 1)) AS s) AS x
    RETURNING id, org_id, metadata_expires_at, created_at
)
INSERT INTO message_recipients (message_id, org_id, recipient, status, metadata_expires_at,
    created_at, updated_at)
SELECT m.id, m.org_id, 'r' || k || '@example.net',
    (ARRAY['delivered', 'bounced', 'deferred', 'relayed'])
        [1 + (abs(hashtext(m.id::text)) + k) %% 4],
    m.metadata_expires_at, m.created_at, m.created_at
FROM m CROSS JOIN generate_series(1, 2) AS k
"""


def say(text: str) -> None:
    print(f"[{datetime.now(UTC):%H:%M:%S}] {text}", file=sys.stderr, flush=True)


def past_partitions(conn: psycopg.Connection, first: datetime, end: datetime) -> int:
    """Create weekly partition pairs (0001's naming) for Mondays in [FIRST, END)."""
    made = 0
    wk = first
    while wk < end:
        tag = f"{wk:%G}w{wk:%V}"
        for parent in ("messages", "message_recipients"):
            name = f"{parent}_e{tag}"
            row = conn.execute("SELECT to_regclass(%s)", (name,)).fetchone()
            if row and row[0] is None:
                conn.execute(sql.SQL("CREATE TABLE {} PARTITION OF {} FOR VALUES FROM ({})"
                                     " TO ({})").format(
                    sql.Identifier(name), sql.Identifier(parent), sql.Literal(wk),
                    sql.Literal(wk + timedelta(days=7))))
                made += 1
        wk += timedelta(days=7)
    return made


def generate(conn: psycopg.Connection, orgs: list[uuid.UUID], start: int, count: int,
             lo: datetime, hi: datetime, label: str) -> None:
    """COUNT messages (+2 recipients each) with metadata stamps spread over [LO, HI)."""
    done = 0
    while done < count:
        n = min(CHUNK, count - done)
        a = start + done
        t0 = time.monotonic()
        conn.execute(_GENERATE, {"a": a, "b": a + n - 1, "orgs": orgs, "norgs": len(orgs),
                                 "lo": lo + (hi - lo) * (done / count),
                                 "hi": lo + (hi - lo) * ((done + n) / count)})
        done += n
        say(f"{label}: {done}/{count} messages (+{2 * n} recipients) in"
            f" {time.monotonic() - t0:.1f}s")


def sizes(conn: psycopg.Connection) -> dict[str, int]:
    row = conn.execute(
        "SELECT pg_database_size(current_database()), pg_current_wal_lsn()::text,"
        " (SELECT count(*) FROM pg_inherits WHERE inhparent = 'messages'::regclass)"
    ).fetchone()
    assert row is not None
    return {"db": int(row[0]), "lsn": row[1], "partitions": int(row[2])}


def wal_between(conn: psycopg.Connection, a: str, b: str) -> int:
    row = conn.execute("SELECT pg_wal_lsn_diff(%s::pg_lsn, %s::pg_lsn)", (b, a)).fetchone()
    return int(row[0]) if row else 0


def rows(conn: psycopg.Connection) -> tuple[int, int]:
    m = conn.execute("SELECT count(*) FROM messages").fetchone()
    r = conn.execute("SELECT count(*) FROM message_recipients").fetchone()
    return int(m[0]) if m else 0, int(r[0]) if r else 0


def timed_run(config: str, *args: str) -> tuple[float, str, str]:
    t0 = time.monotonic()
    proc = subprocess.run([POSTKEEP, "--config", config, "retention", "run", *args],
                          capture_output=True, text=True, check=False)
    took = time.monotonic() - t0
    if proc.returncode != 0:
        raise SystemExit(f"retention run failed ({proc.returncode}):\n{proc.stdout}\n"
                         f"{proc.stderr}")
    return took, proc.stdout.strip(), proc.stderr


def insert_cost(conn: psycopg.Connection, org: uuid.UUID, n: int) -> float:
    """Seconds to record N captures in batches of 64 (rows land in live partitions)."""
    now = datetime.now(UTC)
    batch: list[messages.CapturedMessage] = []
    t0 = time.monotonic()
    for i in range(n):
        mid = uuid.uuid4()
        content, meta = messages.expiry_dates(now, 7, 30)
        batch.append(messages.CapturedMessage(
            id=mid, org_id=org, domain="bench.example", queue_id=f"Q{i:09d}",
            envelope_from="app@bench.example", recipients=("a@example.net", "b@example.net"),
            size=3000, sha256=hashlib.sha256(mid.bytes).digest(),
            object_key=message_key(str(org), str(mid), now, content_days=7),
            compressed_size=1200, created_at=now, content_expires_at=content,
            metadata_expires_at=meta, header_from="app@bench.example", subject="s"))
        if len(batch) == 64:
            messages.record_captures(conn, batch)
            batch = []
    if batch:
        messages.record_captures(conn, batch)
    return time.monotonic() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default=os.environ.get("POSTKEEP_CONFIG"))
    ap.add_argument("--messages", type=int, default=1_000_000)
    ap.add_argument("--expired-share", type=float, default=0.7)
    ap.add_argument("--orgs", type=int, default=100)
    ap.add_argument("--objects", type=int, default=20_000)
    ap.add_argument("--insert-messages", type=int, default=20_000)
    args = ap.parse_args()
    if not args.config:
        raise SystemExit("--config or $POSTKEEP_CONFIG is required")
    cfg = load(args.config)
    conn = psycopg.connect(cfg.postgres.conninfo(), autocommit=True)
    conn.execute("SET statement_timeout = 0")
    migrate.apply_migrations(conn)
    migrate.ensure_partitions(conn)
    tag = uuid.uuid4().hex[:6]
    orgs = [directory.add_organisation(conn, f"bench-{tag}-{i}", ("free", "basic", "pro")[i % 3])
            for i in range(args.orgs)]

    now = datetime.now(UTC)
    this_monday = (now - timedelta(days=now.weekday())).replace(hour=0, minute=0, second=0,
                                                                 microsecond=0)
    past_end = this_monday - timedelta(days=7)
    past_start = past_end - timedelta(weeks=10)
    made = past_partitions(conn, past_start, past_end)
    expired = int(args.messages * args.expired_share)
    live = args.messages - expired
    say(f"{made} past partitions created; generating {expired} expired and {live} live"
        f" messages over {args.orgs} organisations")
    t0 = time.monotonic()
    generate(conn, orgs, 0, expired, past_start, past_end, "expired")
    generate(conn, orgs, expired, live, now + timedelta(days=1), now + timedelta(days=60), "live")
    gen_s = time.monotonic() - t0
    conn.execute("VACUUM ANALYZE messages")
    conn.execute("VACUUM ANALYZE message_recipients")
    conn.execute("CHECKPOINT")
    before_rows = rows(conn)
    before = sizes(conn)
    say(f"generated in {gen_s:.0f}s: {before_rows[0]} messages, {before_rows[1]} recipient"
        f" rows, {before['partitions']} message partitions, database {before['db'] >> 20} MiB")

    sweep_from = (past_start - timedelta(days=60)).isoformat()
    say("retention run (auto mode) ...")
    big_s, big_out, big_err = timed_run(args.config, "--sweep-from", sweep_from)
    after_rows = rows(conn)
    after = sizes(conn)
    wal = wal_between(conn, before["lsn"], after["lsn"])
    say(big_out)
    again_s, again_out, _ = timed_run(args.config)
    say(f"second run: {again_s:.1f}s: {again_out}")

    # Sweep mode over real objects: rows in one more past week, objects in MinIO.
    store = S3ObjectStore(cfg.s3)
    store.ensure_bucket()
    week = past_start - timedelta(weeks=1)
    past_partitions(conn, week, week + timedelta(days=7))
    created = week + timedelta(days=1) - timedelta(days=30)
    batch: list[messages.CapturedMessage] = []
    blobs: list[tuple[str, bytes]] = []
    t0 = time.monotonic()
    for i in range(args.objects):
        mid = uuid.uuid4()
        key = message_key(str(orgs[0]), str(mid), created)  # unclassed: only the sweeper
        content, meta = messages.expiry_dates(created, 7, 30)
        blobs.append((key, b"x" * 1200))
        batch.append(messages.CapturedMessage(
            id=mid, org_id=orgs[0], domain="bench.example", queue_id=f"S{i:09d}",
            envelope_from="app@bench.example", recipients=("a@example.net",), size=3000,
            sha256=hashlib.sha256(mid.bytes).digest(), object_key=key, compressed_size=1200,
            created_at=created, content_expires_at=content, metadata_expires_at=meta))
        if len(batch) == 500:
            store.put_many(blobs)
            messages.record_captures(conn, batch)
            batch, blobs = [], []
    if batch:
        store.put_many(blobs)
        messages.record_captures(conn, batch)
    say(f"{args.objects} objects stored in {time.monotonic() - t0:.0f}s")
    sweep_s, sweep_out, _ = timed_run(args.config, "--content-expiry", "sweep",
                                      "--sweep-from", (created - timedelta(days=1)).isoformat())
    say(f"sweep-mode run: {sweep_s:.1f}s: {sweep_out}")

    # Capture-side cost of the retention indexes: alternate with and without,
    # three times each, keep the best of each (the machine is noisy).
    with_t: list[float] = []
    without_t: list[float] = []
    for _ in range(3):
        with_t.append(insert_cost(conn, orgs[0], args.insert_messages))
        conn.execute("DROP INDEX messages_content_expiry_idx, messages_created_brin,"
                     " message_recipients_created_brin")
        without_t.append(insert_cost(conn, orgs[0], args.insert_messages))
        conn.execute("CREATE INDEX messages_content_expiry_idx ON messages"
                     " (content_expires_at, id)")
        conn.execute("CREATE INDEX messages_created_brin ON messages USING brin (created_at)")
        conn.execute("CREATE INDEX message_recipients_created_brin ON message_recipients"
                     " USING brin (created_at)")
    with_idx, without_idx = min(with_t), min(without_t)

    dropped = (before_rows[0] - after_rows[0], before_rows[1] - after_rows[1])
    print("\n## retention bench results\n")
    print(f"- generated: {before_rows[0]:,} messages + {before_rows[1]:,} recipient rows"
          f" ({sum(before_rows):,} rows) in {before['partitions']} message partitions,"
          f" {args.orgs} organisations; database {before['db'] / 2**20:,.0f} MiB")
    print(f"- `retention run` (auto: lifecycle rules on MinIO): **{big_s:.1f} s** wall,"
          f" dropped {dropped[0]:,} messages + {dropped[1]:,} recipient rows"
          f" ({sum(dropped):,} rows, {sum(dropped) / big_s:,.0f} rows/s)"
          f" in {before['partitions'] - after['partitions']} weekly partition pairs;"
          f" WAL {wal / 2**20:,.1f} MiB; database {before['db'] / 2**20:,.0f} ->"
          f" {after['db'] / 2**20:,.0f} MiB")
    print(f"  - summary: `{big_out}`")
    steps = [ln for ln in big_err.splitlines() if "dropped" in ln or "statistics" in ln
             or "sweep: " in ln]
    print(f"  - last progress lines: {steps[-3:]}")
    print(f"- second run right after (nothing to drop): **{again_s:.1f} s**")
    print(f"- sweep mode over {args.objects:,} real objects: **{sweep_s:.1f} s**"
          f" ({args.objects / sweep_s:,.0f} objects/s deleted incl. the run's fixed costs)")
    print(f"- capture INSERT of {args.insert_messages:,} messages (64 a batch, 2 recipients):"
          f" {with_idx:.2f} s with the retention indexes, {without_idx:.2f} s without"
          f" (best of 3 each)"
          f" ({100 * (with_idx - without_idx) / without_idx:+.0f}%)")


if __name__ == "__main__":
    main()
