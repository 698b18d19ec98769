"""Webhook lag: from an event's INSERT into event_outbox to the receiver's 2xx.

Runs against a running stack (source its env first, e.g. `source .stack-test/env`):
makes an organisation and an endpoint (`postkeep webhook add`) pointing at a
receiver on 127.0.0.1, writes --events events paced at --rate per second
(spread over --messages messages), and prints the lag's p50/p99/max and how
many arrived.  Not yet part of `make bench` (bench/run.sh): the outbox
writer (issue 18's other half) is what the DSN-to-2xx figure needs.

    .venv/bin/python bench/webhook_lag.py --events 2000 --rate 200
"""

from __future__ import annotations

import argparse
import http.server
import json
import os
import statistics
import subprocess
import threading
import time
import uuid
from typing import Any

import psycopg

from postkeep.config import load
from postkeep.storage.metadata import directory


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--events", type=int, default=1000)
    ap.add_argument("--rate", type=float, default=100.0, help="events per second")
    ap.add_argument("--messages", type=int, default=50)
    ap.add_argument("--timeout", type=float, default=120.0)
    args = ap.parse_args()
    cfg = load(os.environ["POSTKEEP_CONFIG"])
    arrived: dict[int, float] = {}
    lock = threading.Lock()

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *a: Any) -> None:
            pass

        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("Content-Length", "0")))
            with lock:
                arrived.setdefault(int(self.headers["Postkeep-Event-Id"]), time.time())
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    conn = psycopg.connect(cfg.postgres.conninfo(), autocommit=True)
    org = directory.add_organisation(conn, f"bench-{uuid.uuid4().hex[:10]}", "free")
    url = f"http://127.0.0.1:{server.server_address[1]}/bench"
    added = subprocess.run(["postkeep", "webhook", "add", str(org), url, "--json"],
                           check=True, capture_output=True, text=True)
    endpoint = json.loads(added.stdout)["id"]
    messages = [uuid.uuid4() for _ in range(args.messages)]
    written: dict[int, float] = {}
    start = time.monotonic()
    for i in range(args.events):
        due = start + i / args.rate
        time.sleep(max(0.0, due - time.monotonic()))
        m = messages[i % len(messages)]
        row = conn.execute(
            "INSERT INTO event_outbox (org_id, message_id, event_type, payload)"
            " VALUES (%s, %s, 'delivered', %s) RETURNING id",
            (org, m, json.dumps({"id": f"b{i}", "type": "delivered", "message_id": str(m)}))
        ).fetchone()
        assert row is not None
        written[int(row[0])] = time.time()
    deadline = time.monotonic() + args.timeout
    while time.monotonic() < deadline:
        with lock:
            if len(arrived) >= len(written):
                break
        time.sleep(0.2)
    lags = sorted(arrived[k] - written[k] for k in written if k in arrived)
    if not lags:
        raise SystemExit("no event arrived")
    q = statistics.quantiles(lags, n=100) if len(lags) > 1 else lags * 99
    print(f"webhook lag over {len(lags)}/{len(written)} events at {args.rate:g}/s:"
          f" p50 {q[49] * 1000:.0f} ms, p99 {q[98] * 1000:.0f} ms, max {lags[-1] * 1000:.0f} ms")
    # Gone with its receiver: a left-over endpoint would be retried for 24 h.
    subprocess.run(["postkeep", "webhook", "remove", endpoint, "--yes"], check=True,
                   capture_output=True)
    server.shutdown()


if __name__ == "__main__":
    main()
