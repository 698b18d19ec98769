"""Storage economics benchmark: bytes stored per byte received (`make bench-storage`).

Runs against a private stack (real MinIO + PostgreSQL; Postfix for the last
part).  The 10,000-message corpus is driven through the milter's own capture
code in-process — MessageCapture.finish (part splitting, dictionary) and the
real GroupCommitter (part objects, container objects, rows), from several
threads so group commit batches form — not through Postfix, which would take
an hour on this machine.  A smaller run through real Postfix and the running
postkeep-milter then checks that the ratio goes the same way.

  (a) campaign: one template with per-recipient personalisation,
      N recipients (default 10,000), 20% with the same 300 KB PDF.  The
      organisation's dictionary is trained first on WARMUP earlier messages
      of the same sender (its "recent mail"), which are not counted.
  (b) the awkward-message corpus of the tests (tests/support/corpus.py),
      for an organisation without a dictionary.
  (c) capture cost: paired, alternating runs with splitting and the
      dictionary OFF (the code path as before) and ON, on a mixed slice of
      the campaign; messages/s of capture + commit, and CPU ms per message
      of finish() alone; medians.
  (d) through Postfix: POSTFIX_N campaign messages over SMTP.

Stored bytes are object bytes in MinIO: message objects (checked against a
listing of the bucket), part objects, and the dictionary object.
Prints Markdown.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from support import campaign, corpus
from support.dedup import capture_and_commit

from postkeep.config import Config, load
from postkeep.milter.capture import StoredContent
from postkeep.milter.committer import GroupCommitter
from postkeep.milter.spool import JOURNAL_REASON
from postkeep.storage.content import dictionaries, restore
from postkeep.storage.content import spool as spool_mod
from postkeep.storage.content.dictionaries import DictionaryCache, LoadedDictionary
from postkeep.storage.content.journal import JournalWriter
from postkeep.storage.content.objects import S3ObjectStore
from postkeep.storage.content.spool import Spool
from postkeep.storage.metadata import directory, dkim_keys
from postkeep.storage.metadata.db import Database, connect
from postkeep.storage.metadata.messages import CapturedMessage

THRESHOLD = 128 * 1024
DICT_MAX = 64 * 1024


def log(msg: str) -> None:
    print(f"bench-storage: {msg}", file=sys.stderr, flush=True)


@dataclass
class Org:
    id: uuid.UUID
    name: str
    domain: str


def new_org(cfg: Config, tag: str) -> Org:
    name = f"bench-{tag}-{uuid.uuid4().hex[:8]}"
    domain = f"{name}.example"
    with connect(cfg.postgres) as conn:
        oid = directory.add_organisation(conn, name, "pro")
        directory.add_domain(conn, oid, domain)
        dkim_keys.set_missing_key_policy(conn, oid, "unsigned")
    return Org(oid, name, domain)


def prefix_bytes(objects: S3ObjectStore, prefix: str) -> tuple[int, int]:
    """(objects, bytes) under PREFIX, from a bucket listing."""
    n = total = 0
    for obj in objects.client.list_objects(objects.bucket, prefix=prefix, recursive=True):
        n += 1
        total += obj.size or 0
    return n, total


def parts_bytes(cfg: Config, org: Org) -> tuple[int, int]:
    with connect(cfg.postgres) as conn:
        row = conn.execute("SELECT count(*), coalesce(sum(stored_size), 0) FROM parts"
                           " WHERE org_id = %s", (org.id,)).fetchone()
    assert row is not None
    return int(row[0]), int(row[1])


def dict_bytes(cfg: Config, org: Org) -> int:
    with connect(cfg.postgres) as conn:
        row = conn.execute("SELECT coalesce(sum(size), 0) FROM zstd_dictionaries"
                           " WHERE org_id = %s", (org.id,)).fetchone()
    return int(row[0]) if row else 0


def run_parallel(n: int, threads: int, work: Callable[[int], tuple[int, int]]
                 ) -> tuple[list[tuple[int, int]], float]:
    started = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        results = list(pool.map(work, range(n)))
    return results, time.perf_counter() - started


def warm_up_and_train(cfg: Config, committer: GroupCommitter, org: Org, warmup: int,
                      threads: int) -> None:
    now = datetime.now(UTC)

    def one(i: int) -> tuple[int, int]:
        m = capture_and_commit(committer, org.id, org.domain,
                               campaign.message(1_000_000 + i, org.domain), created=now,
                               content_days=90)
        return m.size, m.compressed_size

    run_parallel(warmup, threads, one)
    with connect(cfg.postgres) as conn:
        r = dictionaries.train_for_org(conn, S3ObjectStore(cfg.s3), org.id, now)
    log(f"{org.name}: dictionary v{r.row.version} of {r.row.size} bytes from {r.row.samples}"
        f" messages; held-out {r.raw_bytes} B -> {r.plain_bytes} B plain, {r.dict_bytes} B"
        " with it")


# ----------------------------------------------------------------------- (a)
def campaign_run(cfg: Config, db: Database, committer: GroupCommitter, n: int, warmup: int,
                 threads: int, pdf: bytes, out: list[str]) -> None:
    objects = S3ObjectStore(cfg.s3)
    org = new_org(cfg, "campaign")
    log(f"(a) warm-up: {warmup} earlier messages of {org.name}, then training")
    warm_up_and_train(cfg, committer, org, warmup, threads)
    _, warm_bytes = prefix_bytes(objects, f"messages/{org.id}/")
    cache = DictionaryCache(db, objects, refresh=300.0, level=cfg.milter.zstd_level)
    now = datetime.now(UTC)
    lock = threading.Lock()
    per: dict[bool, list[int]] = {True: [0, 0, 0], False: [0, 0, 0]}  # n, size, stored

    def one(i: int) -> tuple[int, int]:
        with_pdf = i % 5 == 0
        data = campaign.message(i, org.domain, pdf=pdf if with_pdf else None)
        m = capture_and_commit(committer, org.id, org.domain, data, created=now,
                               content_days=90, threshold=THRESHOLD,
                               dictionary=cache.get(org.id), dictionary_max=DICT_MAX)
        with lock:
            acc = per[with_pdf]
            acc[0] += 1
            acc[1] += m.size
            acc[2] += m.compressed_size
        if i % 50 == 0:  # restore a sample byte for byte
            got = b"".join(restore.restore(objects, m.object_key))
            if got != data:
                raise AssertionError(f"message {i} ({m.object_key}) did not restore exactly")
        return m.size, m.compressed_size

    log(f"(a) capturing {n} campaign messages ({threads} threads)")
    _, elapsed = run_parallel(n, threads, one)
    nparts, pbytes = parts_bytes(cfg, org)
    dbytes = dict_bytes(cfg, org)
    nobj, listed = prefix_bytes(objects, f"messages/{org.id}/")
    received = per[True][1] + per[False][1]
    msg_stored = per[True][2] + per[False][2]
    if listed - warm_bytes != msg_stored:
        log(f"WARNING: bucket listing says {listed - warm_bytes} message bytes, rows say"
            f" {msg_stored}")
    total = msg_stored + pbytes + dbytes
    plain_n, plain_size, plain_stored = per[False]
    pdf_n, pdf_size, pdf_stored = per[True]
    out += [
        f"#### (a) campaign: {n} recipients, {pdf_n} with the same {len(pdf) // 1024} KB PDF",
        "",
        f"In-process capture + group commit, {threads} threads, {elapsed:.0f} s"
        f" ({n / elapsed:.0f} messages/s, {received / elapsed / 1e6:.0f} MB/s received)."
        f" Dictionary trained first on {warmup} earlier messages of the organisation"
        " (not counted). Every 50th message restored byte for byte.",
        "",
        "| what | messages | received bytes | stored bytes | stored / received |",
        "|---|---:|---:|---:|---:|",
        f"| messages without the PDF (message objects) | {plain_n} | {plain_size:,} |"
        f" {plain_stored:,} | **{plain_stored / plain_size:.4f}** |",
        f"| the same, charged the whole dictionary object too | {plain_n} | {plain_size:,} |"
        f" {plain_stored + dbytes:,} | {(plain_stored + dbytes) / plain_size:.4f} |",
        f"| messages with the PDF (message objects only) | {pdf_n} | {pdf_size:,} |"
        f" {pdf_stored:,} | {pdf_stored / pdf_size:.4f} |",
        f"| part objects (the PDF, once) | {nparts} | | {pbytes:,} | |",
        f"| dictionary object | 1 | | {dbytes:,} | |",
        f"| **overall** (messages + parts + dictionary) | {n} | {received:,} | {total:,} |"
        f" **{total / received:.4f}** |",
        "",
        f"Bucket listing: {nobj} message objects under messages/{org.id}/ ({listed:,} bytes"
        f" including the {warmup} warm-up messages' {warm_bytes:,}).",
        "",
    ]


# ----------------------------------------------------------------------- (b)
def awkward_run(cfg: Config, committer: GroupCommitter, out: list[str]) -> None:
    objects = S3ObjectStore(cfg.s3)
    org = new_org(cfg, "awkward")
    now = datetime.now(UTC)
    rows = []
    tot_size = tot_stored = 0
    for case in corpus.build(f"sender@{org.domain}", uuid.uuid4().hex):
        before = parts_bytes(cfg, org)[1]
        m = capture_and_commit(committer, org.id, org.domain, case.data, created=now,
                               content_days=90, threshold=THRESHOLD)
        part = parts_bytes(cfg, org)[1] - before
        if b"".join(restore.restore(objects, m.object_key)) != case.data:
            raise AssertionError(f"awkward case {case.name} did not restore exactly")
        stored = m.compressed_size + part
        rows.append(f"| {case.name} | {m.size:,} | {stored:,} | {stored / m.size:.3f} |")
        tot_size += m.size
        tot_stored += stored
    out += [
        "#### (b) the awkward-message corpus (tests/support/corpus.py), no dictionary",
        "",
        "| case | received bytes | stored bytes | stored / received |",
        "|---|---:|---:|---:|",
        *rows,
        f"| **all** | {tot_size:,} | {tot_stored:,} | **{tot_stored / tot_size:.3f}** |",
        "",
        "All restored byte for byte. The nine-megabyte case is random data in base64"
        " (incompressible beyond base64's 6 bits per byte); the small cases are mostly"
        " headers, where zstd's frame overhead dominates.",
        "",
    ]


# ----------------------------------------------------------------------- (c)
def cost_run(cfg: Config, db: Database, committer: GroupCommitter, threads: int, reps: int,
             n: int, pdf: bytes, out: list[str]) -> None:
    objects = S3ObjectStore(cfg.s3)
    org = new_org(cfg, "cost")
    warm_up_and_train(cfg, committer, org, 500, threads)
    cache = DictionaryCache(db, objects, refresh=300.0, level=cfg.milter.zstd_level)
    loaded = cache.get(org.id)
    now = datetime.now(UTC)
    msgs = [campaign.message(i, org.domain, pdf=pdf if i % 5 == 0 else None) for i in range(n)]
    small = msgs[1]

    def throughput(on: bool) -> float:
        d: LoadedDictionary | None = loaded if on else None

        def one(i: int) -> tuple[int, int]:
            m = capture_and_commit(committer, org.id, org.domain, msgs[i], created=now,
                                   content_days=90, threshold=THRESHOLD if on else 0,
                                   dictionary=d, dictionary_max=DICT_MAX if on else 0)
            return m.size, m.compressed_size

        _, elapsed = run_parallel(len(msgs), threads, one)
        return len(msgs) / elapsed

    def cpu_ms(data: bytes, on: bool, k: int) -> float:
        from postkeep.milter.capture import MessageCapture

        head, _, body = data.partition(b"\r\n\r\n")
        started = time.process_time()
        for _ in range(k):
            cap = MessageCapture(dkim_body_hash=False)
            for line in head.split(b"\r\n"):
                name, _, value = line.partition(b":")
                cap.add_header(name, value)
            cap.end_of_headers()
            for i in range(0, len(body), 65535):
                cap.add_body(body[i : i + 65535])
            c = cap.finish(split_threshold=THRESHOLD if on else 0,
                           dictionary=loaded if on else None,
                           dictionary_max=DICT_MAX if on else 0)
            c.stream.read()
            c.close()
            cap.discard()
        return (time.process_time() - started) / k * 1000

    tp: dict[bool, list[float]] = {False: [], True: []}
    cpu_small: dict[bool, list[float]] = {False: [], True: []}
    cpu_pdf: dict[bool, list[float]] = {False: [], True: []}
    log(f"(c) {reps} paired runs of {n} messages, OFF then ON alternating")
    for rep in range(reps):
        order = (False, True) if rep % 2 == 0 else (True, False)
        for on in order:
            tp[on].append(throughput(on))
            cpu_small[on].append(cpu_ms(small, on, 400))
            cpu_pdf[on].append(cpu_ms(msgs[0], on, 40))
    med = {k: statistics.median(v) for k, v in tp.items()}
    ratios = [a / b for a, b in zip(tp[True], tp[False], strict=True)]
    out += [
        f"#### (c) capture cost: splitting + dictionary OFF vs ON, {reps} paired runs",
        "",
        f"{n} campaign messages per run (20% with the PDF), {threads} threads, capture +"
        " group commit to MinIO/PostgreSQL in-process; runs alternate OFF/ON (order"
        " swapped every pair). CPU: finish() and reading the object, no I/O, one thread.",
        "",
        "| | OFF (as before) | ON | ON / OFF |",
        "|---|---:|---:|---:|",
        f"| messages/s, median | {med[False]:.0f} | {med[True]:.0f} |"
        f" {med[True] / med[False]:.2f} (paired median {statistics.median(ratios):.2f}) |",
        f"| CPU ms per ~{len(small) // 1024} KB templated message | "
        f"{statistics.median(cpu_small[False]):.3f} | {statistics.median(cpu_small[True]):.3f}"
        f" | {statistics.median(cpu_small[True]) / statistics.median(cpu_small[False]):.2f} |",
        f"| CPU ms per ~{len(msgs[0]) // 1024} KB message with the PDF | "
        f"{statistics.median(cpu_pdf[False]):.2f} | {statistics.median(cpu_pdf[True]):.2f} |"
        f" {statistics.median(cpu_pdf[True]) / statistics.median(cpu_pdf[False]):.2f} |",
        "",
        "Per run, messages/s OFF: " + ", ".join(f"{x:.0f}" for x in tp[False])
        + "; ON: " + ", ".join(f"{x:.0f}" for x in tp[True]) + ".",
        "",
    ]


# ----------------------------------------------------------------------- (d)
def postfix_run(cfg: Config, committer: GroupCommitter, smtp_host: str, smtp_port: int,
                n: int, threads: int, pdf: bytes, out: list[str]) -> None:
    import smtplib

    org = new_org(cfg, "postfix")
    log(f"(d) {org.name}: warm-up + training, then {n} messages through Postfix")
    warm_up_and_train(cfg, committer, org, 500, threads)
    sender = f"news@{org.domain}"

    def one(i: int) -> tuple[int, int]:
        data = campaign.message(i, org.domain, pdf=pdf if i % 5 == 0 else None)
        with smtplib.SMTP(smtp_host, smtp_port, timeout=120) as s:
            s.sendmail(sender, [f"r{i}@sink.test"], data)  # accepted once stored
        return len(data), 0

    started = datetime.now(UTC)
    _, elapsed = run_parallel(n, 4, one)
    with connect(cfg.postgres) as conn:
        row = conn.execute(
            "SELECT count(*), sum(size), sum(compressed_size),"
            " sum(size) FILTER (WHERE NOT EXISTS (SELECT 1 FROM attachments a"
            "   WHERE a.message_id = m.id)),"
            " sum(compressed_size) FILTER (WHERE NOT EXISTS (SELECT 1 FROM attachments a"
            "   WHERE a.message_id = m.id))"
            " FROM messages m WHERE org_id = %s AND created_at >= %s",
            (org.id, started)).fetchone()
    assert row is not None
    count, size, stored, plain_size, plain_stored = (int(x or 0) for x in row)
    _, pbytes = parts_bytes(cfg, org)
    dbytes = dict_bytes(cfg, org)
    total = stored + pbytes + dbytes
    out += [
        f"#### (d) through real Postfix + postkeep-milter: {count} campaign messages",
        "",
        f"{n} sent over SMTP (4 connections, {elapsed:.0f} s), DKIM off for this"
        " organisation, same corpus shape (20% with the PDF), dictionary trained first.",
        "",
        "| what | received bytes | stored bytes | stored / received |",
        "|---|---:|---:|---:|",
        f"| messages without the PDF | {plain_size:,} | {plain_stored:,} |"
        f" {plain_stored / max(plain_size, 1):.4f} |",
        f"| overall (messages + parts + dictionary) | {size:,} | {total:,} |"
        f" {total / max(size, 1):.4f} |",
        "",
    ]


# ----------------------------------------------------------------------- (e)
class CountingStore:
    """An S3ObjectStore that counts what reaches the server: requests, and
    objects (a snowball batch is one request that MinIO unpacks into many
    objects; an S3 server without it, AWS included, takes one PUT per object)."""

    def __init__(self, inner: S3ObjectStore) -> None:
        self.inner = inner
        self.requests = self.objects = self.bytes = 0
        self._lock = threading.Lock()

    def _count(self, requests: int, objects: int, size: int) -> None:
        with self._lock:
            self.requests += requests
            self.objects += objects
            self.bytes += size

    def put(self, key: str, data: Any, length: int) -> None:
        self.inner.put(key, data, length)
        self._count(1, 1, length)

    def put_many(self, items: list[tuple[str, bytes]]) -> None:
        self.inner.put_many(items)
        self._count(1, len(items), sum(len(b) for _, b in items))

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


LINGER_MS: dict[str, float] = {}  # --linger-ms: milter.commit_linger_ms for (e)


def minio_cpu_seconds(pid: int) -> float:
    """utime + stime of process PID (and its waited-for children), in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = sum(int(fields[i]) for i in (11, 12, 13, 14))
    return ticks / os.sysconf("SC_CLK_TCK")


@dataclass
class LayoutRun:
    layout: str
    messages: int
    received: int
    requests: int
    objects: int
    stored: int
    minio_cpu: float
    seconds: float


def layout_run(cfg: Config, db: Database, org: Org, layout: str, n: int, sessions: int,
               pdf: bytes | None, minio_pid: int) -> LayoutRun:
    """N campaign messages (every 5th with PDF, if given) captured and committed by
    SESSIONS threads through a fresh GroupCommitter in LAYOUT; what reached MinIO."""
    store = CountingStore(S3ObjectStore(cfg.s3))
    committer = GroupCommitter(db, store, workers=cfg.milter.commit_threads,  # type: ignore[arg-type]
                               max_batch=cfg.milter.commit_batch_max,
                               linger=LINGER_MS.get("ms", cfg.milter.commit_linger_ms) / 1000,
                               level=cfg.milter.zstd_level, layout=layout,
                               siblings=cfg.milter.commit_siblings)
    now = datetime.now(UTC)
    msgs = [campaign.message(i, org.domain, pdf=pdf if pdf and i % 5 == 0 else None)
            for i in range(n)]

    def one(i: int) -> tuple[int, int]:
        # A capture in flight from here to its commit, as the milter counts
        # from MAIL FROM to end of message (the adaptive linger reads it).
        committer.in_flight.capture_started()
        try:
            m = capture_and_commit(committer, org.id, org.domain, msgs[i], created=now,
                                   content_days=90, threshold=THRESHOLD)
        finally:
            committer.in_flight.capture_ended()
        return m.size, m.compressed_size

    cpu0 = minio_cpu_seconds(minio_pid)
    try:
        results, elapsed = run_parallel(n, sessions, one)
    finally:
        committer.close()
    cpu = minio_cpu_seconds(minio_pid) - cpu0
    return LayoutRun(layout, n, sum(r[0] for r in results), store.requests, store.objects,
                     store.bytes, cpu, elapsed)


class Journaling:
    """What `accept_after = 'journal'` does at end of message: the message
    appended to a journal segment and group-fsync'd (JournalWriter), or, when
    parts were cut out of it, the group commit (milter/service.py)."""

    def __init__(self, writer: JournalWriter, committer: GroupCommitter) -> None:
        self.writer = writer
        self.committer = committer

    def commit(self, message: CapturedMessage, content: StoredContent) -> None:
        if content.parts:
            self.committer.commit(message, content)
        else:
            self.writer.append(message, content.stream, JOURNAL_REASON)


def journal_run(cfg: Config, db: Database, org: Org, n: int, sessions: int,
                pdf: bytes | None, minio_pid: int) -> LayoutRun:
    """N campaign messages journaled by SESSIONS threads while a drain runs every
    second, as postkeep-storage does (spool_drain_interval_seconds = 1); the
    run ends when the spool is empty.  What reached MinIO."""
    store = CountingStore(S3ObjectStore(cfg.s3))
    spool = Spool(tempfile.mkdtemp(prefix="pk-bench-journal-"))
    spool.ensure()
    committer = GroupCommitter(db, store, workers=cfg.milter.commit_threads,  # type: ignore[arg-type]
                               max_batch=cfg.milter.commit_batch_max,
                               linger=LINGER_MS.get("ms", cfg.milter.commit_linger_ms) / 1000,
                               level=cfg.milter.zstd_level, layout="packs",
                               siblings=cfg.milter.commit_siblings)
    journal = JournalWriter(spool)
    journal.start()
    writer = Journaling(journal, committer)
    now = datetime.now(UTC)
    msgs = [campaign.message(i, org.domain, pdf=pdf if pdf and i % 5 == 0 else None)
            for i in range(n)]

    def one(i: int) -> tuple[int, int]:
        m = capture_and_commit(writer, org.id, org.domain, msgs[i],  # type: ignore[arg-type]
                               created=now, content_days=90, threshold=THRESHOLD)
        return m.size, m.compressed_size

    stop = threading.Event()
    drainer = threading.Thread(target=spool_mod.drain_forever,
                               args=(spool, store, spool_mod.record_with(db)),
                               kwargs={"interval": 1.0, "stop": stop,
                                       "packing": spool_mod.packing_for(cfg, db)})
    cpu0 = minio_cpu_seconds(minio_pid)
    t0 = time.monotonic()
    drainer.start()
    try:
        results, _ = run_parallel(n, sessions, one)
        deadline = time.monotonic() + 300
        while spool.status().entries:
            if time.monotonic() > deadline:
                raise SystemExit(f"bench: {spool.status().entries} journal entries not"
                                 f" drained after 300 s ({spool.dir})")
            time.sleep(0.05)
        elapsed = time.monotonic() - t0
    finally:
        journal.close()
        stop.set()
        drainer.join(60)
        committer.close()
    cpu = minio_cpu_seconds(minio_pid) - cpu0
    shutil.rmtree(spool.dir, ignore_errors=True)
    return LayoutRun("journal", n, sum(r[0] for r in results), store.requests, store.objects,
                     store.bytes, cpu, elapsed)


def cost_per_million(r: LayoutRun, put_price: float, gb_month: float, months: float
                     ) -> tuple[float, float]:
    """(PUT dollars, storage dollars for MONTHS) per million messages like R's."""
    puts = r.objects / r.messages * 1e6 * put_price / 1000
    storage = r.stored / r.messages * 1e6 / 1e9 * gb_month * months
    return puts, storage


def layouts_run(cfg: Config, db: Database, n: int, sessions: int, reps: int, pdf: bytes,
                put_price: float, gb_month: float, minio_pid: int, out: list[str]) -> None:
    """Old layout (one object per message) vs packs vs packs through the journal,
    alternated, REPS rounds each for the 3 KB campaign messages and for the
    campaign mix with the PDF."""
    out += [f"#### (e) layout: one object per message vs packs, {sessions} sessions", "",
            f"{n} campaign messages per run, captured and committed in-process by {sessions}"
            " threads (one per session) through the real GroupCommitter"
            f" (commit_threads={cfg.milter.commit_threads},"
            f" commit_batch_max={cfg.milter.commit_batch_max}, linger"
            f" {LINGER_MS.get('ms', cfg.milter.commit_linger_ms):g} ms with"
            f" commit_siblings={cfg.milter.commit_siblings}) into MinIO +"
            f" PostgreSQL; {reps} pairs,"
            " order swapped every pair. S3 PUTs: objects written (MinIO's snowball batch"
            " is one request, but any other S3 server, AWS included, takes a PUT per"
            " object); MinIO CPU: utime+stime of the MinIO process (/proc/PID/stat) over"
            f" the run, per message. Prices: ${put_price:g} per 1,000 PUTs,"
            f" ${gb_month:g} per GB-month (storage for 30 days = 1 month, 1 year = 12)."
            " Journal: the same captures written to a spool as `accept_after ="
            " \"journal\"` does, drained every second into packs by the real drain"
            " (storage/content/spool.py), the run ending when the spool is empty; mail"
            " with a part cut out (the PDF) takes the group commit, as in the milter.",
            ""]
    for label, with_pdf in (("3 KB templated messages (no PDF)", None),
                            ("campaign mix: every 5th with the same 300 KB PDF", pdf)):
        org = new_org(cfg, "layout")
        runs: dict[str, list[LayoutRun]] = {"objects": [], "packs": [], "journal": []}
        for rep_i in range(reps):
            names = ["objects", "packs", "journal"]
            order = names[rep_i % 3:] + names[:rep_i % 3]
            for layout in order:
                r = (journal_run(cfg, db, org, n, sessions, with_pdf, minio_pid)
                     if layout == "journal"
                     else layout_run(cfg, db, org, layout, n, sessions, with_pdf, minio_pid))
                runs[layout].append(r)
                log(f"(e) {label}: {layout} run {rep_i + 1}: {r.objects} objects in"
                    f" {r.requests} requests, MinIO {r.minio_cpu * 1000 / r.messages:.3f}"
                    f" ms/message, {r.messages / r.seconds:.0f} messages/s")
        out += [f"**{label}** (received {runs['packs'][0].received / n / 1024:.1f} KB per"
                " message on average)", "",
                "| | one object per message | packs | journal | old / packs | old / journal |",
                "|---|---:|---:|---:|---:|---:|"]
        med: dict[str, dict[str, float]] = {}
        for layout, rs in runs.items():
            puts30, st30 = cost_per_million(rs[0], put_price, gb_month, 1)
            _, st365 = cost_per_million(rs[0], put_price, gb_month, 12)
            med[layout] = {
                "puts": statistics.median(r.objects / r.messages * 1000 for r in rs),
                "reqs": statistics.median(r.requests / r.messages * 1000 for r in rs),
                "bytes": statistics.median(r.stored / r.messages for r in rs),
                "cpu": statistics.median(r.minio_cpu * 1000 / r.messages for r in rs),
                "rate": statistics.median(r.messages / r.seconds for r in rs),
                "put$": puts30, "st30": st30, "st365": st365}
        o, p, j = med["objects"], med["packs"], med["journal"]

        def row(name: str, key: str, fmt: str, o: dict[str, float] = o,
                p: dict[str, float] = p, j: dict[str, float] = j) -> str:
            rp = o[key] / p[key] if p[key] else float("inf")
            rj = o[key] / j[key] if j[key] else float("inf")
            return (f"| {name} | {o[key]:{fmt}} | {p[key]:{fmt}} | {j[key]:{fmt}} | {rp:.1f}x"
                    f" | {rj:.1f}x |")

        def total(d: dict[str, float], st: str) -> float:
            return d["put$"] + d[st]

        out += [
            row("S3 PUTs per 1,000 messages", "puts", ",.1f"),
            row("requests to MinIO per 1,000 messages (snowball counted as one)", "reqs",
                ",.1f"),
            row("stored bytes per message (message objects, packs, parts)", "bytes", ",.0f"),
            row("$ per million messages: PUTs", "put$", ",.2f"),
            row("$ per million messages: storage, 30 days", "st30", ",.3f"),
            row("$ per million messages: storage, 1 year", "st365", ",.3f"),
            *(f"| $ per million messages: PUTs + {span} | {total(o, st):,.2f} |"
              f" {total(p, st):,.2f} | {total(j, st):,.2f} |"
              f" {total(o, st) / total(p, st):.1f}x | {total(o, st) / total(j, st):.1f}x |"
              for span, st in (("30 days", "st30"), ("1 year", "st365"))),
            row("MinIO CPU ms per captured message (median)", "cpu", ".3f"),
            row("messages/s (in-process capture + commit)", "rate", ",.0f"),
            "",
            "Per run, MinIO CPU ms/message, one object each: "
            + ", ".join(f"{r.minio_cpu * 1000 / r.messages:.3f}" for r in runs["objects"])
            + "; packs: " + ", ".join(f"{r.minio_cpu * 1000 / r.messages:.3f}"
                                      for r in runs["packs"])
            + "; journal: " + ", ".join(f"{r.minio_cpu * 1000 / r.messages:.3f}"
                                        for r in runs["journal"])
            + ". Messages per pack (median run): "
            + f"{statistics.median(r.messages / max(r.objects, 1) for r in runs['packs']):.1f}"
            + ", through the journal "
            + f"{statistics.median(r.messages / max(r.objects, 1) for r in runs['journal']):.1f}.",
            ""]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", required=True)
    ap.add_argument("--n", type=int, default=10_000)
    ap.add_argument("--warmup", type=int, default=1000)
    ap.add_argument("--threads", type=int, default=8)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--cost-n", type=int, default=500)
    ap.add_argument("--postfix-n", type=int, default=300)
    ap.add_argument("--smtp", default="")
    ap.add_argument("--parts", default="abcde", help="which parts to run (abcde)")
    ap.add_argument("--layout-n", type=int, default=2000,
                    help="(e) messages per run")
    ap.add_argument("--sessions", type=int, default=20, help="(e) concurrent sessions")
    ap.add_argument("--layout-reps", type=int, default=3, help="(e) pairs of runs")
    ap.add_argument("--linger-ms", type=float, default=None,
                    help="(e) milter.commit_linger_ms for these runs (default: the config's)")
    ap.add_argument("--put-price", type=float, default=0.005, help="$ per 1,000 PUTs")
    ap.add_argument("--gb-month", type=float, default=0.023, help="$ per GB-month")
    ap.add_argument("--minio-pid", type=int, default=0,
                    help="MinIO's pid (default: from the stack's minio/minio.pid)")
    args = ap.parse_args()
    import logging

    logging.basicConfig(level=logging.WARNING)
    cfg = load(args.config)
    db = Database(cfg.postgres)
    committer = GroupCommitter(db, S3ObjectStore(cfg.s3), workers=cfg.milter.commit_threads,
                               max_batch=cfg.milter.commit_batch_max, linger=0,
                               level=cfg.milter.zstd_level)
    pdf = campaign.fake_pdf(300 * 1024)
    out = [f"### Storage economics (run {datetime.now(UTC):%Y-%m-%d %H:%M} UTC)", ""]
    try:
        if "a" in args.parts:
            campaign_run(cfg, db, committer, args.n, args.warmup, args.threads, pdf, out)
        if "b" in args.parts:
            awkward_run(cfg, committer, out)
        if "c" in args.parts:
            cost_run(cfg, db, committer, args.threads, args.reps, args.cost_n, pdf, out)
        if "e" in args.parts:
            if args.linger_ms is not None:
                LINGER_MS["ms"] = args.linger_ms
            pid = args.minio_pid or int((Path(cfg_dir(args.config)) / "minio" / "minio.pid")
                                        .read_text().split()[0])
            layouts_run(cfg, db, args.layout_n, args.sessions, args.layout_reps, pdf,
                        args.put_price, args.gb_month, pid, out)
        if "d" in args.parts and args.smtp:
            host, _, port = args.smtp.rpartition(":")
            postfix_run(cfg, committer, host, int(port), args.postfix_n, args.threads, pdf, out)
    finally:
        committer.close()
        db.close()
    print("\n".join(out))


def cfg_dir(config_path: str) -> str:
    """The stack directory of a stack's postkeep.toml (DIR/postkeep.toml)."""
    return str(Path(config_path).resolve().parent)


if __name__ == "__main__":
    main()
