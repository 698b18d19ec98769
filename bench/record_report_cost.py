"""Time storage.outcomes.record_batch on a stack's own messages.

Builds one 'relayed' report (a fresh hash, event time now + 5 s) for each of
the newest N messages from sender@capture.example (what `make bench` leaves
in .stack-bench), records them B at a time, and prints the wall time per
report.  Run against a stack's environment, e.g.

    . .stack-bench/env && cd / && $POSTKEEP_STACK_VENV/bin/python \\
        /path/to/bench/record_report_cost.py --batch 5 --reports 1000

To compare two versions of record_report(), load each in turn with
`psql -f` and alternate the runs.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import statistics
import time
from datetime import UTC, datetime, timedelta

import psycopg

from postkeep.storage.reports.dsn import Outcome, Report
from postkeep.storage.reports.outcomes import record_batch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=5, help="reports per record_batch call")
    ap.add_argument("--reports", type=int, default=1000, help="how many reports")
    args = ap.parse_args()
    conn = psycopg.connect(autocommit=True)  # PG* from the stack's env
    rows = conn.execute(
        "SELECT m.id, m.metadata_expires_at, r.recipient FROM messages m"
        " JOIN message_recipients r ON r.message_id = m.id"
        " AND r.metadata_expires_at = m.metadata_expires_at"
        " WHERE m.envelope_from = 'sender@capture.example'"
        " ORDER BY m.created_at DESC LIMIT %s", (args.reports,)).fetchall()
    if not rows:
        raise SystemExit("no messages from sender@capture.example: run make bench first")
    when = datetime.now(UTC) + timedelta(seconds=5)
    reports = [Report(sha256=hashlib.sha256(os.urandom(16)).digest(), size=3000, kind="dsn",
                      message_id=mid, expires_at=expires,
                      outcomes=(Outcome(rcpt, rcpt, "relayed", "2.0.0", "127.0.0.1",
                                        "250 2.0.0 Ok", when),))
               for mid, expires, rcpt in rows]
    started, batches = time.perf_counter(), []
    for i in range(0, len(reports), args.batch):
        t = time.perf_counter()
        record_batch(conn, reports[i:i + args.batch])
        batches.append(time.perf_counter() - t)
    took = time.perf_counter() - started
    print(f"{len(reports)} reports, {args.batch} a batch: {took / len(reports) * 1000:.2f} ms "
          f"per report, batch median {statistics.median(batches) * 1000:.1f} ms")


if __name__ == "__main__":
    main()
