"""Where a captured message's time goes, measured in-process.

Drives the milter's own code paths against the bench stack's MinIO and
PostgreSQL, one message at a time on one thread (no Postfix, no libmilter,
no GIL contention), and times each step:

  compress   postkeep.milter.capture.MessageCapture: headers, 64 KiB body
             chunks, finish() (zstd frames, sha256, spool file)
  S3 PUT     postkeep.storage.content.objects.S3ObjectStore.put of that object
  PG insert  postkeep.storage.messages.record_capture on a pooled connection
  whole EOM  postkeep.milter.service.CaptureService: begin, headers, body,
             end_of_message (the above plus classification, ids, logging,
             metrics), i.e. everything the milter does per message

Wall and CPU (the whole process's) milliseconds per message are both reported: the
difference is time spent waiting on MinIO or PostgreSQL.  A cProfile of the
whole-EOM loop follows.  Prints Markdown on stdout (appended to the results).

Usage: profile_capture.py --config DIR/postkeep.toml [--n 300]
"""

from __future__ import annotations

import argparse
import base64
import cProfile
import io
import logging
import os
import pstats
import statistics
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime

from postkeep.config import Config, load
from postkeep.ids import uuid7
from postkeep.milter.capture import MessageCapture
from postkeep.milter.service import CaptureService
from postkeep.storage.content.objects import S3ObjectStore, message_key
from postkeep.storage.metadata.db import Database
from postkeep.storage.metadata.directory import find_by_domain
from postkeep.storage.metadata.messages import CapturedMessage, expiry_dates, record_capture

CHUNK = 65535  # Postfix hands the milter body chunks of at most this size
HEADERS = [
    ("From", b" <sender@bench.example>"),
    ("To", b" <rcpt@sink.example>"),
    ("Date", b" Wed, 25 Nov 2026 02:00:22 +0000 (UTC)"),
    ("Message-Id", b" <42ae.0003.0000@vm>"),
    ("Subject", b" bench"),
]


def x_body(size: int) -> bytes:
    """smtp-source -l SIZE's body: numbered lines of 'X' (compresses ~100x)."""
    lines, total, i = [], 0, 0
    while total < size:
        line = (str(i % 10) + "X" * 78)[: max(1, min(79, size - total))].encode() + b"\r\n"
        lines.append(line)
        total += len(line)
        i += 1
    return b"".join(lines)


def b64_body(size: int) -> bytes:
    """A base64 attachment of random bytes: what zstd cannot shrink much."""
    raw = base64.b64encode(os.urandom(size * 3 // 4))
    return b"\r\n".join(raw[i:i + 76] for i in range(0, len(raw), 76))[:size]


def chunks(body: bytes) -> list[bytes]:
    return [body[i:i + CHUNK] for i in range(0, len(body), CHUNK)]


class Timer:
    """Accumulates wall and process-CPU seconds of repeated steps (sequential, so
    the process CPU is this step's, background threads included)."""

    def __init__(self) -> None:
        self.wall: list[float] = []
        self.cpu: list[float] = []

    def __call__(self, fn: Callable[[], object]) -> object:
        w, c = time.perf_counter(), time.process_time()
        out = fn()
        self.cpu.append(time.process_time() - c)
        self.wall.append(time.perf_counter() - w)
        return out

    def row(self, name: str) -> str:
        w = sorted(self.wall)
        p99 = w[min(len(w) - 1, int(len(w) * 0.99))]
        return (f"| {name} | {statistics.mean(self.wall) * 1000:.2f} | "
                f"{statistics.median(self.wall) * 1000:.2f} | {p99 * 1000:.2f} | "
                f"{statistics.mean(self.cpu) * 1000:.2f} |")


def parts(cfg_path: str, n: int, body: bytes, label: str) -> list[str]:
    """Time compress / S3 PUT / PG insert separately for N messages of BODY."""
    cfg = load(cfg_path)
    db = Database(cfg.postgres)
    objects = S3ObjectStore(cfg.s3)
    with db.connection() as conn:
        org = find_by_domain(conn, "bench.example")
    if org is None:
        raise SystemExit("profile: bench.example belongs to no organisation")
    body_chunks = chunks(body)
    t_comp, t_put, t_pg = Timer(), Timer(), Timer()
    stored = 0
    for i in range(n + 10):
        mid = uuid7()
        created = datetime.now(UTC)
        capture = MessageCapture(level=cfg.milter.zstd_level, spill_bytes=cfg.milter.spill_bytes,
                                 spool_dir=cfg.milter.spool_directory)

        def compress(capture: MessageCapture = capture, mid: uuid.UUID = mid) -> object:
            capture.add_own_header(cfg.milter.id_header, str(mid))
            for name, value in HEADERS:
                capture.add_header(name, value)
            capture.end_of_headers()
            for c in body_chunks:
                capture.add_body(c)
            return capture.finish()

        timed = i >= 10  # the first ten warm connections and caches
        content = t_comp(compress) if timed else compress()
        key = message_key(str(org.id), str(mid), created)

        def put(content: object = content, key: str = key) -> None:
            objects.put(key, content.stream, content.compressed_size)  # type: ignore[attr-defined]

        _ = t_put(put) if timed else put()
        content.close()  # type: ignore[attr-defined]
        stored += content.compressed_size  # type: ignore[attr-defined]
        cexp, mexp = expiry_dates(created, org.content_days, org.metadata_days)
        row = CapturedMessage(
            id=mid, org_id=org.id, domain="bench.example", queue_id="BENCH",
            envelope_from="sender@bench.example", recipients=("rcpt@sink.example",),
            size=content.size, sha256=content.sha256, object_key=key,  # type: ignore[attr-defined]
            compressed_size=content.compressed_size,  # type: ignore[attr-defined]
            created_at=created, content_expires_at=cexp, metadata_expires_at=mexp,
            message_id_header="<42ae.0003.0000@vm>", header_from="sender@bench.example",
            subject="bench",
        )

        def insert(row: CapturedMessage = row) -> None:
            with db.connection() as conn:
                record_capture(conn, row)

        _ = t_pg(insert) if timed else insert()
    db.close()
    ratio = len(body) * (n + 10) / max(stored, 1)
    return [
        f"| **{label}** ({len(body):,} B body, zstd level {cfg.milter.zstd_level}, "
        f"~{ratio:.0f}x) | | | | |",
        t_comp.row("compress (MessageCapture)"),
        t_put.row("S3 PUT (S3ObjectStore.put)"),
        t_pg.row("PG insert (record_capture)"),
    ]


def build_service(cfg: Config, db: Database, objects: S3ObjectStore
                  ) -> tuple[CaptureService, Callable[[], None]]:
    """The service wired as daemon.py wires it, for either milter layout:
    group commit (postkeep.milter.committer) or per-message persist (store)."""
    try:
        from postkeep.milter.committer import GroupCommitter
        from postkeep.milter.directory import Directory
    except ImportError:  # the layout before group commit
        from postkeep.milter.store import Directory as OldDirectory
        svc = CaptureService(cfg.milter, db, objects,  # type: ignore[arg-type,call-arg]
                             OldDirectory(db, cfg.milter.directory_cache_seconds))
        return svc, lambda: None
    from postkeep.storage.content import sealing

    sealing.install(cfg.storage.master_key_bytes())  # as every daemon does
    committer = GroupCommitter(db, objects,
                               workers=getattr(cfg.milter, "commit_threads", 2),
                               layout=cfg.s3.effective_layout(
                                   sealed=bool(cfg.storage.master_key)))
    # The return path key signs VERP addresses: outcome tracking is on in the
    # stack's configuration, and the service refuses (451) without it.
    svc = CaptureService(cfg.milter, committer,
                         Directory(db, cfg.milter.directory_cache_seconds),
                         return_path_key=cfg.return_path.key_bytes(), tags=cfg.tags)
    return svc, committer.close


def whole(cfg_path: str, n: int, body: bytes, profile: cProfile.Profile | None) -> Timer:
    """The service's whole per-message path, sequentially, N times."""
    cfg = load(cfg_path)
    db = Database(cfg.postgres)
    objects = S3ObjectStore(cfg.s3)
    service, close = build_service(cfg, db, objects)
    body_chunks = chunks(body)
    timer = Timer()

    def one() -> object:
        tx = service.begin("<sender@bench.example>", None)
        tx.recipients.append("rcpt@sink.example")
        for name, value in HEADERS:
            service.header(tx, name, value)
        tx.capture.end_of_headers()
        for c in body_chunks:
            tx.capture.add_body(c)
        verdict = service.end_of_message(tx, "BENCH")
        if verdict.reply is not None:
            raise SystemExit(f"profile: the service refused: {verdict.reply}")
        return verdict

    for _ in range(10):
        one()
    if profile is not None:
        profile.enable()
    for _ in range(n):
        timer(one)
    if profile is not None:
        profile.disable()
    close()
    db.close()
    return timer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--config", required=True)
    ap.add_argument("--n", type=int, default=300)
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)  # the service logs one INFO line a message
    logging.getLogger("postkeep.milter").setLevel(logging.INFO)
    logging.getLogger("postkeep.milter").handlers = [logging.NullHandler()]
    logging.getLogger("postkeep.milter").propagate = False

    import postkeep.milter
    tree = os.path.dirname(os.path.dirname(os.path.realpath(postkeep.milter.__file__)))
    out = ["", "## In-process profile of the capture path (bench/profile_capture.py)", "",
           f"Code imported from {tree}.", "",
           f"One thread, one message at a time, {args.n} messages per row, against the bench "
           "stack's MinIO and PostgreSQL (loopback). Wall ms includes waiting on the server; "
           "CPU ms is the process's CPU, all threads (committer threads included).", "",
           "| step | wall mean ms | wall p50 ms | wall p99 ms | CPU mean ms |",
           "|---|---:|---:|---:|---:|"]
    for label, body in (("5 KB X-lines", x_body(5 * 1024)),
                        ("100 KB X-lines", x_body(100 * 1024)),
                        ("100 KB base64 random", b64_body(100 * 1024))):
        out += parts(args.config, args.n, body, label)
    out += ["", "Whole per-message path through CaptureService (begin, headers, body, "
            "end_of_message; includes the above plus classification, ids, logging, metrics):",
            "", "| message | wall mean ms | wall p50 ms | wall p99 ms | CPU mean ms |",
            "|---|---:|---:|---:|---:|"]
    for label, body in (("5 KB X-lines", x_body(5 * 1024)),
                        ("100 KB X-lines", x_body(100 * 1024))):
        out.append(whole(args.config, args.n, body, None).row(label))
    prof = cProfile.Profile()  # a separate pass: cProfile slows what it watches
    whole(args.config, args.n, x_body(5 * 1024), prof)
    s = io.StringIO()
    pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(15)
    body_lines = [ln for ln in s.getvalue().splitlines() if ln.strip()]
    start = next((i for i, ln in enumerate(body_lines) if ln.lstrip().startswith("ncalls")), 0)
    out += ["", f"cProfile of the whole path, 5 KB, {args.n} messages, top 15 by own time "
            "(cProfile inflates Python-heavy code; use it for ranking, not absolute cost):", "",
            "```", *body_lines[start:start + 16], "```", ""]
    print("\n".join(out))


if __name__ == "__main__":
    main()
