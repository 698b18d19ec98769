"""What the event outbox's triggers (migration 0017) cost the database writes.

Captures N messages (record_captures, B a batch) and records one 'relayed'
report each (record_batch, B a batch) for a fresh organisation, alternating
rounds with the outbox triggers enabled and disabled (ALTER TABLE ...
DISABLE TRIGGER), and prints the median time per message of each.  Run
against a stack's environment:

    . .stack/env && $POSTKEEP_STACK_VENV/bin/python bench/event_outbox_cost.py
"""

from __future__ import annotations

import argparse
import hashlib
import os
import statistics
import time
import uuid
from datetime import UTC, datetime, timedelta

import psycopg

from postkeep.storage.metadata import directory, messages
from postkeep.storage.reports.dsn import Outcome, Report
from postkeep.storage.reports.outcomes import record_batch

TRIGGERS = (("messages", "messages_event_accepted"), ("recipient_events", "recipient_events_event"))


def _toggle(conn: psycopg.Connection, on: bool) -> None:
    for table, trigger in TRIGGERS:
        conn.execute(f"ALTER TABLE {table} {'ENABLE' if on else 'DISABLE'} TRIGGER {trigger}")


def _round(conn: psycopg.Connection, org: uuid.UUID, domain: str, n: int,
           batch: int) -> tuple[float, float]:
    now = datetime.now(UTC)
    content_at, metadata_at = messages.expiry_dates(now, 7, 30)
    msgs = [messages.CapturedMessage(
        id=uuid.uuid4(), org_id=org, domain=domain, queue_id=os.urandom(5).hex().upper(),
        envelope_from=f"bench@{domain}", recipients=("r@example.net",), size=1000,
        sha256=os.urandom(32), object_key="bench/none", compressed_size=500, created_at=now,
        content_expires_at=content_at, metadata_expires_at=metadata_at,
        message_id_header=f"<{uuid.uuid4()}@{domain}>", header_from=f"bench@{domain}",
        subject="bench") for _ in range(n)]
    t = time.perf_counter()
    for i in range(0, n, batch):
        messages.record_captures(conn, msgs[i:i + batch])
    capture = (time.perf_counter() - t) / n
    when = now + timedelta(seconds=5)
    reports = [Report(sha256=hashlib.sha256(os.urandom(16)).digest(), size=3000, kind="dsn",
                      message_id=m.id, expires_at=metadata_at,
                      outcomes=(Outcome("r@example.net", "r@example.net", "relayed", "2.0.0",
                                        "127.0.0.1", "250 2.0.0 Ok", when),))
               for m in msgs]
    t = time.perf_counter()
    for i in range(0, n, batch):
        record_batch(conn, reports[i:i + batch])
    return capture, (time.perf_counter() - t) / n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--messages", type=int, default=300, help="messages a round")
    ap.add_argument("--batch", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=3, help="rounds each way")
    args = ap.parse_args()
    conn = psycopg.connect(autocommit=True)  # PG* from the stack's env
    name = f"bench-{uuid.uuid4().hex[:8]}"
    org = directory.add_organisation(conn, name, "free")
    domain = f"{name}.bench.test"
    directory.add_domain(conn, org, domain)
    times: dict[bool, list[tuple[float, float]]] = {True: [], False: []}
    try:
        for _ in range(args.rounds):
            for on in (True, False):
                _toggle(conn, on)
                times[on].append(_round(conn, org, domain, args.messages, args.batch))
    finally:
        _toggle(conn, True)
    for on in (True, False):
        cap = statistics.median(c for c, _ in times[on]) * 1000
        rep = statistics.median(r for _, r in times[on]) * 1000
        print(f"outbox triggers {'on ' if on else 'off'}: capture {cap:.3f} ms/message,"
              f" report {rep:.3f} ms/report")
    events = conn.execute("SELECT count(*) FROM event_outbox WHERE org_id = %s",
                          (org,)).fetchone()
    print(f"events written: {events[0] if events else 0}"
          f" (expected {2 * args.messages * args.rounds})")


if __name__ == "__main__":
    main()
