"""Drain rate of the outage spool: `postkeep spool drain` on N spooled messages.

Run against a stack (its env sourced, e.g. `.stack-dev/env`), with its spool
empty.  Writes N entries the way the milter does (realistic ~3 KB
transactional messages, each captured and zstd-compressed by
`MessageCapture`, written by `Spool.write` with its fsyncs), for a fresh
organisation, then times `postkeep spool drain` as an operator runs it
(a separate process) and checks that every message has its row and object.

    set -a; . .stack-dev/env; set +a
    .venv/bin/python bench/spool_drain.py --count 5000 [--batch 256]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

from postkeep.config import load
from postkeep.ids import uuid7
from postkeep.milter.capture import MessageCapture
from postkeep.storage.content.objects import message_key
from postkeep.storage.content.spool import Spool
from postkeep.storage.metadata import directory
from postkeep.storage.metadata.db import connect
from postkeep.storage.metadata.messages import CapturedMessage, expiry_dates


def _message(n: int, domain: str) -> tuple[list[tuple[str, bytes]], bytes]:
    headers = [("From", f" Shop <orders@{domain}>".encode()),
               ("To", f" customer{n}@example.net".encode()),
               ("Subject", f" Your order #{100000 + n} has shipped".encode()),
               ("Message-ID", f" <{uuid.uuid4()}@{domain}>".encode()),
               ("MIME-Version", b" 1.0"), ("Content-Type", b" text/plain; charset=utf-8")]
    body = (f"Hello customer {n},\r\n\r\nYour order #{100000 + n} left our warehouse today.\r\n"
            f"Tracking: {uuid.uuid4().hex.upper()}\r\n\r\n").encode()
    body += b"".join(f"Item {i}: widget model {n % 97}-{i}, qty {i % 5 + 1}\r\n".encode()
                     for i in range(40))
    body += b"\r\nThank you for shopping with us.\r\n" + os.urandom(64).hex().encode() + b"\r\n"
    return headers, body


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--count", type=int, default=5000)
    ap.add_argument("--batch", type=int, default=256)
    args = ap.parse_args()
    cfg = load(os.environ.get("POSTKEEP_CONFIG"))
    spool = Spool(cfg.milter.outage_spool_directory)
    spool.ensure()
    if spool.entries():
        print(f"{spool.dir} is not empty: drain it first", file=sys.stderr)
        return 2
    tag = uuid.uuid4().hex[:10]
    with connect(cfg.postgres) as conn:
        org_id = directory.add_organisation(conn, f"bench-spool-{tag}", "enterprise")
        domain = f"bench-spool-{tag}.example"
        directory.add_domain(conn, org_id, domain)
    started = time.monotonic()
    raw_bytes = 0
    for n in range(args.count):
        headers, body = _message(n, domain)
        cap = MessageCapture(dkim_body_hash=False)
        for name, value in headers:
            cap.add_header(name, value)
        mid = uuid7()
        cap.add_own_header("X-Postkeep-Id", str(mid))
        cap.add_body(body)
        content = cap.finish()
        now = datetime.now(UTC)
        cexp, mexp = expiry_dates(now, 365, None)
        m = CapturedMessage(
            id=mid, org_id=org_id, domain=domain, queue_id=f"B{n:09d}",
            envelope_from=f"orders@{domain}", recipients=(f"customer{n}@example.net",),
            size=content.size, sha256=content.sha256,
            object_key=message_key(str(org_id), str(mid), now),
            compressed_size=content.compressed_size, created_at=now,
            content_expires_at=cexp, metadata_expires_at=mexp,
            message_id_header=None, header_from=f"orders@{domain}", subject="shipped")
        spool.write(m, content.stream, "s3: bench")
        content.close()
        raw_bytes += content.size
    wrote = time.monotonic() - started
    st = spool.status()
    print(f"spooled {args.count} messages ({raw_bytes / args.count:.0f} B each, "
          f"{st.bytes / args.count:.0f} B per entry) in {wrote:.1f} s: "
          f"{args.count / wrote:.0f} spool writes/s (fsync'd)")
    venv = Path(sys.executable).parent
    started = time.monotonic()
    result = subprocess.run([str(venv / "postkeep"), "spool", "drain", "--yes", "--batch",
                             str(args.batch)], cwd="/", capture_output=True, text=True)
    took = time.monotonic() - started
    print(result.stdout.strip().splitlines()[-1] if result.stdout.strip() else "")
    if result.returncode != 0:
        print(result.stderr, file=sys.stderr)
        return 1
    with connect(cfg.postgres) as conn:
        rows = conn.execute("SELECT count(*) FROM messages WHERE org_id = %s",
                            (org_id,)).fetchone()
    assert rows is not None and rows[0] == args.count, rows
    assert not spool.entries()
    print(f"drained {args.count} messages in {took:.1f} s (process start included): "
          f"{args.count / took:.0f} messages/s, batch {args.batch}; rows checked: {rows[0]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
