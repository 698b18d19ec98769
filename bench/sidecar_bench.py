"""postkeep-storage alone: how many reports a second it records, at what latency.

Creates N captured messages' rows (as the milter would), then delivers one
Postfix-style success DSN per message over LMTP from C concurrent
connections (Postfix's lmtp clients), and reports reports/s, the per-report
LMTP latency (DATA's end to the 250), and checks every recipient row ended
'relayed'.  Run against a stack: `set -a; . .stack/env; set +a;
.venv/bin/python bench/sidecar_bench.py -n 5000 -c 20` (from /tmp).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
import uuid
from datetime import UTC, datetime, timedelta

import psycopg

from postkeep.config import load
from postkeep.envelope import return_path
from postkeep.storage.metadata import directory
from postkeep.storage.metadata.messages import CapturedMessage, record_captures


def dsn(mid: uuid.UUID, rcpt: str) -> bytes:
    now = datetime.now(UTC).strftime("%a, %d %b %Y %H:%M:%S +0000")
    return (
        f"From: MAILER-DAEMON@bench.example\r\nDate: {now}\r\n"
        "Subject: Successful Mail Delivery Report\r\nMIME-Version: 1.0\r\n"
        'Content-Type: multipart/report; report-type=delivery-status; boundary="B"\r\n\r\n'
        "--B\r\nContent-Type: text/plain\r\n\r\nYour message was successfully delivered.\r\n\r\n"
        "--B\r\nContent-Type: message/delivery-status\r\n\r\n"
        f"Reporting-MTA: dns; bench.example\r\nX-Postfix-Queue-ID: 4ABC\r\n"
        f"Original-Envelope-Id: {mid}\r\nArrival-Date: {now}\r\n\r\n"
        f"Final-Recipient: rfc822; {rcpt}\r\nOriginal-Recipient: rfc822;{rcpt}\r\n"
        "Action: relayed\r\nStatus: 2.0.0\r\nRemote-MTA: dns; 127.0.0.1\r\n"
        "Diagnostic-Code: smtp; 250 2.0.0 Ok: queued as 1234\r\n\r\n"
        f"--B\r\nContent-Type: text/rfc822-headers\r\n\r\nX-Postkeep-Id: {mid}\r\n"
        "Subject: bench\r\n\r\n--B--\r\n"
    ).encode()


async def read_reply(reader: asyncio.StreamReader) -> bytes:
    while True:
        line = await reader.readline()
        if not line:
            raise ConnectionError("server closed the connection")
        if line[3:4] != b"-":
            return line


async def client(port: int, work: asyncio.Queue[tuple[str, bytes]],
                 latencies: list[float]) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    await read_reply(reader)
    writer.write(b"LHLO bench.example\r\n")
    await read_reply(reader)
    while True:
        try:
            path, data = work.get_nowait()
        except asyncio.QueueEmpty:
            break
        writer.write(f"MAIL FROM:<>\r\nRCPT TO:<{path}>\r\nDATA\r\n".encode())
        for _ in range(3):
            await read_reply(reader)
        t0 = time.perf_counter()
        writer.write(data + b".\r\n")
        reply = await read_reply(reader)
        latencies.append(time.perf_counter() - t0)
        if not reply.startswith(b"250"):
            raise SystemExit(f"report refused: {reply!r}")
    writer.write(b"QUIT\r\n")
    writer.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("-n", type=int, default=5000, help="reports (one per message)")
    ap.add_argument("-c", type=int, default=20, help="concurrent LMTP connections")
    args = ap.parse_args()
    cfg = load(None)
    with psycopg.connect(cfg.postgres.conninfo(), autocommit=True) as conn:
        tag = uuid.uuid4().hex[:8]
        org = directory.add_organisation(conn, f"sidecar-bench-{tag}", "pro")
        expires = datetime.now(UTC) + timedelta(days=365)
        msgs = [CapturedMessage(
            id=uuid.uuid4(), org_id=org, domain="bench.example", queue_id="Q",
            envelope_from="a@bench.example", recipients=(f"r{i}@sink.example",), size=1,
            sha256=b"\0" * 32, object_key="k", compressed_size=1,
            created_at=datetime.now(UTC), content_expires_at=expires,
            metadata_expires_at=expires) for i in range(args.n)]
        for i in range(0, len(msgs), 500):
            record_captures(conn, msgs[i:i + 500])
    work: asyncio.Queue[tuple[str, bytes]] = asyncio.Queue()
    for m in msgs:
        work.put_nowait((return_path(m.id, m.metadata_expires_at, "bounces.bench",
                                     cfg.return_path.key_bytes()),
                         dsn(m.id, m.recipients[0])))
    latencies: list[float] = []

    async def run() -> float:
        t0 = time.perf_counter()
        await asyncio.gather(*(client(cfg.storage.lmtp_port, work, latencies)
                               for _ in range(args.c)))
        return time.perf_counter() - t0

    seconds = asyncio.run(run())
    with psycopg.connect(cfg.postgres.conninfo(), autocommit=True) as conn:
        row = conn.execute("SELECT count(*) FILTER (WHERE status = 'relayed'), count(*)"
                           " FROM message_recipients WHERE org_id = %s", (org,)).fetchone()
    assert row is not None
    latencies.sort()
    p99 = latencies[int(len(latencies) * 0.99) - 1]
    print(f"{args.n} reports over {args.c} LMTP connections in {seconds:.2f}s = "
          f"{args.n / seconds:.0f} reports/s; latency p50 {statistics.median(latencies) * 1000:.1f}"
          f" ms p99 {p99 * 1000:.1f} ms; rows relayed {row[0]} of {row[1]}")
    if row[0] != args.n:
        raise SystemExit("not every report was recorded")


if __name__ == "__main__":
    main()
