"""Sealed content benchmark (issue 19): crypto-shredding erasure and sealed restore.

1. Erasure among a million: fills a private stack's database with N packed,
   sealed messages (generated server-side: messages, 2 recipients each, pack
   index rows and one data-key row each; no objects, erasure needs none),
   one address on a share of them, then times `erase_address` for that
   address on an Object Lock store (s3.object_lock = "compliance"): sealed
   content is erased by deleting its keys, so the store must see no write at
   all (every call to it is counted; any write fails the bench).
2. Restore of one message: M real messages (about 3 KB each) sealed into
   packs in MinIO exactly as the milter writes them (packs.build with data
   keys, one PUT per pack, rows in PostgreSQL), then R restores of a random
   one by id (`restore_message`: index row, key row, one ranged GET,
   decrypt, decompress), p50/p99/max; the same for the same messages
   unsealed (format 0), for the price of sealing.
3. Content expiry: every data key generated above dropped with its monthly
   partition (`sealing.expire`, as the retention run does after the month).

Prints a markdown summary.  Usage (`make bench-sealing` brings up and tears
down a private stack):
    python bench/sealing_bench.py --config $POSTKEEP_CONFIG [--messages 1000000]
        [--orgs 10] [--address-share 0.01] [--restore-messages 300] [--restores 1000]
"""

from __future__ import annotations

import argparse
import hashlib
import io
import random
import statistics
import sys
import time
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any, ClassVar

import psycopg
import zstandard

from postkeep.config import load
from postkeep.storage.content import packs, sealing
from postkeep.storage.content.objects import S3ObjectStore, message_key, put_content
from postkeep.storage.content.restore import restore_message
from postkeep.storage.lifecycle import erasure, rules
from postkeep.storage.metadata import directory, messages, migrate
from postkeep.storage.metadata.db import connect

CHUNK = 100_000
PACK_OF = 64  # messages per generated pack
TARGET = "subject.of.request@example.net"

# One chunk: packs, then messages (+2 recipients each, the TARGET on every
# 1/share-th message of the first organisation), their pack entries (sealed
# format) and data-key rows, all server-side.
_PACKS = """
INSERT INTO packs (object_key, org_id, expires_at, length, messages)
SELECT DISTINCT 'messages/30d/' || o || '/bench/p' || (i / %(pack_of)s) || '.pack', o,
    %(cexp)s::timestamptz, 3000 * %(pack_of)s, %(pack_of)s
FROM generate_series(%(a)s::bigint, %(b)s::bigint) AS i,
    LATERAL (SELECT (%(orgs)s::uuid[])[1 + (i / %(pack_of)s) %% %(norgs)s] AS o) AS x
ON CONFLICT DO NOTHING
"""
_GENERATE = """
WITH m AS (
    INSERT INTO messages (id, org_id, domain, queue_id, envelope_from, header_from, subject,
        size, object_key, compressed_size, sha256, content_expires_at, metadata_expires_at,
        status, recipient_count, created_at, accepted_at)
    SELECT gen_random_uuid(), o, 'bench.example', upper(substr(md5(i::text), 1, 10)),
        'app@bench.example', 'app@bench.example', 'bench ' || i, 3000 + i %% 5000,
        'messages/30d/' || o || '/bench/p' || (i / %(pack_of)s) || '.pack', 1200 + i %% 2000,
        decode(md5(i::text) || md5(i::text), 'hex'),
        %(cexp)s::timestamptz, %(mexp)s::timestamptz, 'queued', 2, now(), now()
    FROM generate_series(%(a)s::bigint, %(b)s::bigint) AS i,
        LATERAL (SELECT (%(orgs)s::uuid[])[1 + (i / %(pack_of)s) %% %(norgs)s] AS o) AS x
    RETURNING id, org_id, metadata_expires_at, created_at, object_key, queue_id
), r AS (
    INSERT INTO message_recipients (message_id, org_id, recipient, status,
        metadata_expires_at, created_at, updated_at)
    SELECT m.id, m.org_id, CASE WHEN k = 1 AND m.org_id = %(first)s
            AND abs(hashtext(m.queue_id)) %% %(every)s = 0 THEN %(target)s
            ELSE 'r' || k || '-' || substr(m.queue_id, 1, 6) || '@example.net' END,
        'delivered', m.metadata_expires_at, m.created_at, m.created_at
    FROM m CROSS JOIN generate_series(1, 2) AS k
), p AS (
    INSERT INTO message_packs (message_id, org_id, pack_key, pack_offset, length, format)
    SELECT m.id, m.org_id, m.object_key, 0, 1241, 1 FROM m
)
INSERT INTO message_keys (message_id, org_id, expires_at, wrapped)
SELECT m.id, m.org_id, %(cexp)s::timestamptz,
    decode(md5(m.id::text) || md5(m.queue_id) || md5(m.id::text || 'x') || 'aabbccdd', 'hex')
FROM m
"""


def say(text: str) -> None:
    print(f"[{datetime.now(UTC):%H:%M:%S}] {text}", file=sys.stderr, flush=True)


class Counting:
    """A RetentionStore proxy recording every call: erasure must write nothing."""

    READS: ClassVar[set[str]] = {"retained_until", "exists", "object_lock"}

    def __init__(self, inner: Any) -> None:
        self._inner = inner
        self.calls: list[str] = []

    def __getattr__(self, name: str) -> Any:
        value = getattr(self._inner, name)
        if not callable(value):
            return value

        def wrapped(*args: Any, **kwargs: Any) -> Any:
            self.calls.append(name)
            return value(*args, **kwargs)

        return wrapped


def generate(conn: psycopg.Connection, orgs: list[uuid.UUID], n: int, every: int) -> None:
    cexp = datetime.now(UTC) + timedelta(days=30)
    mexp = datetime.now(UTC) + timedelta(days=60)
    conn.execute("SET statement_timeout = 0")
    # Generated rows are not captures: no outbox events for them (the
    # triggers would write a million accepted events the bench does not read).
    conn.execute("ALTER TABLE messages DISABLE TRIGGER USER")
    conn.execute("ALTER TABLE message_recipients DISABLE TRIGGER USER")
    done = 0
    while done < n:
        k = min(CHUNK, n - done)
        t0 = time.monotonic()
        params = {"a": done, "b": done + k - 1, "orgs": orgs, "norgs": len(orgs),
                  "first": orgs[0], "every": every, "target": TARGET, "pack_of": PACK_OF,
                  "cexp": cexp, "mexp": mexp}
        with conn.transaction():
            conn.execute(_PACKS, params)
            conn.execute(_GENERATE, params)
        done += k
        say(f"generated {done}/{n} sealed messages in {time.monotonic() - t0:.1f}s")
    conn.execute("ALTER TABLE messages ENABLE TRIGGER USER")
    conn.execute("ALTER TABLE message_recipients ENABLE TRIGGER USER")
    conn.execute("RESET statement_timeout")
    conn.execute("ANALYZE messages")
    conn.execute("ANALYZE message_recipients")
    conn.execute("ANALYZE message_keys")
    conn.execute("ANALYZE message_packs")


def bench_erasure(conn: psycopg.Connection, s3: S3ObjectStore, org: uuid.UUID
                  ) -> dict[str, Any]:
    store = Counting(rules.S3Retention(s3.client, s3.bucket, object_lock=True))
    keys_before = conn.execute("SELECT count(*) FROM message_keys").fetchone()
    scope = erasure.messages_in_scope(conn, org, TARGET)
    t0 = time.monotonic()
    rep = erasure.erase_address(conn, store, org, TARGET)
    took = time.monotonic() - t0
    keys_after = conn.execute("SELECT count(*) FROM message_keys").fetchone()
    writes = [c for c in store.calls if c not in Counting.READS]
    if writes:
        raise SystemExit(f"erasure wrote to S3: {writes[:5]}")
    assert keys_before and keys_after
    return {"scope": scope, "erased": rep.messages, "seconds": took,
            "keys_destroyed": int(keys_before[0]) - int(keys_after[0]),
            "s3_calls": len(store.calls), "s3_writes": len(writes)}


def put_real(conn: psycopg.Connection, s3: S3ObjectStore, org: uuid.UUID, n: int,
             sealed: bool) -> list[tuple[uuid.UUID, str, bytes]]:
    """N messages of about 3 KB packed (64 a pack) as the milter writes them."""
    rng = random.Random(19 if sealed else 20)
    words = [f"w{i}" for i in range(2000)]
    created = datetime.now(UTC)
    out: list[tuple[uuid.UUID, str, bytes]] = []
    for start in range(0, n, PACK_OF):
        batch, entries = [], []
        for _ in range(min(PACK_OF, n - start)):
            mid = uuid.uuid4()
            text = " ".join(rng.choice(words) for _ in range(600))
            raw = (f"From: app@bench.example\r\nTo: r@example.net\r\nSubject: restore\r\n\r\n"
                   f"{text}\r\n").encode()
            blob = zstandard.ZstdCompressor(level=3).compress(raw)
            cexp, mexp = messages.expiry_dates(created, 30, 60)
            key = message_key(str(org), str(mid), created, content_days=30)
            batch.append(messages.CapturedMessage(
                id=mid, org_id=org, domain="bench.example", queue_id=mid.hex[:10].upper(),
                envelope_from="app@bench.example", recipients=("r@example.net",),
                size=len(raw), sha256=hashlib.sha256(raw).digest(), object_key=key,
                compressed_size=len(blob), created_at=created, content_expires_at=cexp,
                metadata_expires_at=mexp, message_id_header=f"<{mid}@bench.example>",
                header_from="app@bench.example", subject="restore"))
            entries.append(packs.Entry(mid, org, key, cexp, blob))
            out.append((mid, "", raw))
        keys = sealing.data_keys(conn, [(e.message_id, e.org_id, e.content_expires_at)
                                        for e in entries]) if sealed else None
        [pack] = packs.build(entries, keys=keys)
        body = pack.body.getvalue()
        put_content(s3, pack.key, io.BytesIO(body), len(body), pack.expires_at)
        with conn.transaction():
            messages.record_captures(conn, [m.__class__(**{**m.__dict__, "object_key": pack.key})
                                            for m in batch])
            packs.record(conn, [pack])
        out[-len(batch):] = [(mid, pack.key, raw) for mid, _, raw in out[-len(batch):]]
    return out


def bench_restore(conn: psycopg.Connection, s3: S3ObjectStore,
                  written: list[tuple[uuid.UUID, str, bytes]], n: int) -> dict[str, float]:
    rng = random.Random(7)
    times = []
    for i in range(n):
        mid, key, raw = rng.choice(written)
        t0 = time.perf_counter()
        got = b"".join(restore_message(conn, s3, mid, key))
        took = time.perf_counter() - t0
        if got != raw:
            raise SystemExit(f"restore of {mid} is not byte-exact")
        if i >= 20:  # warm-up: connections, plan caches
            times.append(took * 1000)
    times.sort()
    return {"p50": statistics.median(times), "p99": times[int(len(times) * 0.99) - 1],
            "max": times[-1], "n": len(times)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", required=True)
    ap.add_argument("--messages", type=int, default=1_000_000)
    ap.add_argument("--orgs", type=int, default=10)
    ap.add_argument("--address-share", type=float, default=0.01,
                    help="share of the first organisation's messages to the erased address")
    ap.add_argument("--restore-messages", type=int, default=320)
    ap.add_argument("--restores", type=int, default=1000)
    args = ap.parse_args()
    cfg = load(args.config)
    if sealing.install(cfg.storage.master_key_bytes()) is None:
        raise SystemExit("storage.master_key_file is not set: nothing would be sealed")
    conn = connect(cfg.postgres)
    conn.autocommit = True
    s3 = S3ObjectStore(cfg.s3)
    s3.ensure_bucket()
    migrate.ensure_partitions(conn)
    tag = uuid.uuid4().hex[:6]
    orgs = [directory.add_organisation(conn, f"seal-{tag}-{i}", "pro")
            for i in range(args.orgs)]
    say(f"generating {args.messages} sealed messages over {args.orgs} organisations")
    t0 = time.monotonic()
    generate(conn, orgs, args.messages, max(1, round(1 / args.address_share)))
    gen_s = time.monotonic() - t0
    er = bench_erasure(conn, s3, orgs[0])
    say(f"erasure: {er}")
    say(f"writing {args.restore_messages} real messages, sealed and not")
    sealed = put_real(conn, s3, orgs[1], args.restore_messages, sealed=True)
    plain = put_real(conn, s3, orgs[2], args.restore_messages, sealed=False)
    rs = bench_restore(conn, s3, sealed, args.restores)
    rp = bench_restore(conn, s3, plain, args.restores)
    say(f"restore sealed {rs}, plain {rp}")
    total = conn.execute("SELECT count(*) FROM messages").fetchone()
    # Content expiry: the month of keys the generated rows are in, dropped as
    # the retention run does once that month has passed.
    month = conn.execute("SELECT count(*) FROM message_keys").fetchone()
    t0 = time.monotonic()
    with conn.transaction():
        dropped, deleted = sealing.expire(conn, datetime.now(UTC) + timedelta(days=70))
    expire_s = time.monotonic() - t0
    left = conn.execute("SELECT count(*) FROM message_keys").fetchone()
    say(f"expiry: {dropped} partitions dropped, {deleted} rows deleted in {expire_s:.2f}s")
    per_org = args.messages // args.orgs
    rows = [
        (f"erasure: messages of one address (among {per_org} of its organisation)",
         f"{er['erased']}"),
        ("erasure wall time (`erase_address`, Object Lock store)", f"{er['seconds']:.2f} s"),
        ("data keys destroyed", f"{er['keys_destroyed']}"),
        ("S3 calls during erasure (of them writes)", f"{er['s3_calls']} ({er['s3_writes']})"),
        (f"content expiry: data keys destroyed by dropping {dropped} monthly partition(s)"
         f" (`retention run`)", f"{int(month[0]) - int(left[0]) if month and left else '?'}"
         f" keys in {expire_s:.2f} s"),
        (f"restore one sealed message, p50 / p99 / max ({rs['n']:.0f} restores)",
         f"{rs['p50']:.1f} / {rs['p99']:.1f} / {rs['max']:.1f} ms"),
        ("restore one unsealed message, p50 / p99 / max (same shape)",
         f"{rp['p50']:.1f} / {rp['p99']:.1f} / {rp['max']:.1f} ms"),
    ]
    print(f"\n## Sealed content (bench/sealing_bench.py, {datetime.now(UTC):%Y-%m-%d})\n")
    print(f"{total[0] if total else '?'} messages in PostgreSQL ({args.messages} generated in"
          f" {gen_s:.0f} s, each with a pack entry and a data-key row), {args.orgs}"
          " organisations.\n")
    print("| measure | value |\n|---|---|")
    for name, value in rows:
        print(f"| {name} | {value} |")


if __name__ == "__main__":
    main()
