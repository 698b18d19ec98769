"""What one captured message and its delivery report cost PostgreSQL and S3.

Sends N messages (bounded, default 200, 5 KB) through a running stack's
Postfix for a fresh organisation, waits until every message has its row and
every recipient its 'relayed' outcome (the success notice came back through
postkeep-storage), then prints, per message: WAL bytes (pg_current_wal_lsn()
before/after), WAL bytes by table (pg_walinspect, each record counted against
the first relation it touches), transactions committed, rows inserted /
updated / deleted per table (pg_stat_user_tables), and objects added to the
bucket (one PUT each).  Run against a stack's environment:

    . .stack-scal/env && cd / && /path/to/.venv/bin/python /path/to/bench/pg_cost.py

The stack's PostgreSQL is shared by nothing else while it runs (other
sessions' stacks are separate clusters); autovacuum and checkpoints add noise.
"""

from __future__ import annotations

import argparse
import os
import smtplib
import time
import uuid
from collections import Counter

import psycopg

from postkeep.config import load
from postkeep.storage.content.objects import S3ObjectStore
from postkeep.storage.metadata import directory, dkim_keys

_TUPLES = """SELECT relname, n_tup_ins, n_tup_upd, n_tup_del FROM pg_stat_user_tables"""

# WAL bytes per root table (partitions and indexes folded into their table).
_WAL_BY_TABLE = """
WITH r AS (
  SELECT record_length,
         pg_filenode_relation(0, (regexp_match(block_ref, 'rel \\d+/\\d+/(\\d+)'))[1]::oid) AS rel
    FROM pg_get_wal_records_info(%s::pg_lsn, %s::pg_lsn))
SELECT coalesce(pg_partition_root(coalesce(x.indrelid, r.rel))::regclass::text,
                coalesce(x.indrelid, r.rel)::regclass::text, '(no relation: commits etc.)'),
       sum(record_length)
  FROM r LEFT JOIN pg_index x ON x.indexrelid = r.rel
 GROUP BY 1 ORDER BY 2 DESC
"""


def fold(name: str) -> str:
    """A partition's statistics row under its table's name (messages_e2026w49 -> messages)."""
    for suffix in ("_held", "_unlimited"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    head, _, tail = name.rpartition("_")
    return head if head and tail[:1] in ("d", "e", "p", "r", "w") and tail[1:5].isdigit() else name


def tuples(conn: psycopg.Connection) -> Counter[tuple[str, str]]:
    out: Counter[tuple[str, str]] = Counter()
    for rel, ins, upd, dele in conn.execute(_TUPLES).fetchall():
        out[(fold(rel), "ins")] += ins
        out[(fold(rel), "upd")] += upd
        out[(fold(rel), "del")] += dele
    return out


def wait_for(conn: psycopg.Connection, sql: str, args: tuple[object, ...], want: int,
             deadline: float) -> int:
    got = 0
    while time.monotonic() < deadline:
        got = conn.execute(sql, args).fetchone()[0]  # type: ignore[index]
        if got >= want:
            return int(got)
        time.sleep(0.5)
    raise SystemExit(f"timed out: {got} of {want} for {sql}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--messages", type=int, default=200)
    ap.add_argument("--size", type=int, default=5000)
    args = ap.parse_args()
    n = min(args.messages, 2000)  # bounded
    cfg = load(os.environ["POSTKEEP_CONFIG"])
    conn = psycopg.connect(cfg.postgres.conninfo(), autocommit=True)
    conn.execute("CREATE EXTENSION IF NOT EXISTS pg_walinspect")
    tag = uuid.uuid4().hex[:12]
    domain = f"cost{tag}.example"
    oid = directory.add_organisation(conn, f"cost-{tag}", "enterprise")
    directory.add_domain(conn, oid, domain)
    dkim_keys.set_missing_key_policy(conn, oid, "unsigned")
    store = S3ObjectStore(cfg.s3)

    def objects() -> int:
        return sum(1 for _ in store.client.list_objects(cfg.s3.bucket, recursive=True))

    time.sleep(12)  # let the statistics of the setup above flush
    obj0, tup0 = objects(), tuples(conn)
    lsn0, xact0 = conn.execute(
        "SELECT pg_current_wal_lsn(), xact_commit FROM pg_stat_database"
        " WHERE datname = current_database()").fetchone()  # type: ignore[misc]
    body = ("x" * 76 + "\r\n") * (args.size // 78)
    host, port = os.environ["POSTKEEP_SMTP_HOST"], int(os.environ["POSTKEEP_SMTP_PORT"])
    with smtplib.SMTP(host, port, timeout=60) as smtp:
        for i in range(n):
            msg = (f"From: a@{domain}\r\nTo: rcpt@example.net\r\nSubject: cost {i}\r\n"
                   f"Message-ID: <{tag}.{i}@{domain}>\r\n\r\n{body}")
            smtp.sendmail(f"a@{domain}", ["rcpt@example.net"], msg.encode())
    deadline = time.monotonic() + 300
    wait_for(conn, "SELECT count(*) FROM messages WHERE org_id = %s", (oid,), n, deadline)
    wait_for(conn, "SELECT count(*) FROM message_recipients WHERE org_id = %s"
             " AND status = 'relayed'", (oid,), n, deadline)
    time.sleep(12)  # an idle backend flushes its statistics within 10 s (PostgreSQL 15)
    lsn1, xact1, wal = conn.execute(
        "SELECT pg_current_wal_lsn(), xact_commit, pg_current_wal_lsn() - %s::pg_lsn"
        " FROM pg_stat_database WHERE datname = current_database()", (lsn0,)).fetchone()  # type: ignore[misc]
    tup1, obj1 = tuples(conn), objects()
    print(f"{n} messages of {args.size} bytes, 1 recipient each, captured and reported:")
    print(f"  WAL {int(wal) / n:.0f} bytes/message; transactions {(xact1 - xact0 - 2) / n:.2f}"
          f"/message (this script's own few included); objects {(obj1 - obj0) / n:.2f}/message")
    print("  WAL by table, bytes/message:")
    for table, total in conn.execute(_WAL_BY_TABLE, (lsn0, lsn1)).fetchall():
        print(f"    {table:40s} {int(total) / n:8.0f}")
    print("  rows per message (ins/upd/del):")
    for table in sorted({t for t, _ in tup1}):
        d = [tup1[(table, k)] - tup0[(table, k)] for k in ("ins", "upd", "del")]
        if any(d):
            print(f"    {table:40s} " + " / ".join(f"{x / n:.2f}" for x in d))


if __name__ == "__main__":
    main()
