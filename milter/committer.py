"""Group commit: concurrent messages share one upload and one INSERT.

Each end of message hands its object and rows to `GroupCommitter.commit` and
waits.  Durability is a two-stage pipeline on threads Python owns (see
adapter.py for why that matters):

1. upload workers form batches one at a time (the first message waits up to
   `linger` seconds for company, only while at least `siblings` other
   captures are in flight: milter/linger.py) and store the batch's objects:
   - small objects (compressed size up to `small_object_bytes`) in one S3
     call when the store can batch (MinIO's snowball auto-extract: each tar
     member becomes its own object under its own key), else one PUT each;
   - large objects one streaming PUT each, so memory stays bounded;
   with a master key every object is sealed under the message's own data key
   (packed entries: storage/content/packing.py; own objects, segment by
   segment as they stream: storage/content/sealed_objects.py), its key row
   written with the message's row;
2. one recorder thread takes every uploaded batch that is waiting and writes
   all their rows in one INSERT (one commit).  While PostgreSQL is known to be
   down, upload workers try their own batch's rows instead, so that one batch
   probes and the others fail at once (milter/gate.py).

The stages overlap: while the recorder commits, the next objects go up.  The
recorder's batches are larger than the upload batches (whatever several
uploads finished meanwhile), which is where PostgreSQL's per-commit cost is
shared; on a loaded box that mattered more than anything else here (a commit
per upload batch of one or two messages, as with four workers each doing both
stages, cost more CPU than the latency it saved).

Messages with split-out parts (or a dictionary) are prepared first: each
part's object is found or uploaded for the organisation (storage/content/parts.py),
the dictionary version is kept from sweeping, and the manifest naming the
part objects goes in front of the skeleton; their attachments rows are
inserted in the same transaction as the message rows.

Only when that statement has committed does `commit` return; if any step
fails it raises BackendError for every message of the batch it touched, and
the milter spools or tempfails them.  `commit` waits at most `timeout`
(milter.commit_timeout_seconds) for a message no thread has taken yet: one
still queued for upload, or uploaded and waiting for its rows, is given up
(its rows are then never written; an uploaded object is left to the
orphan sweep or overwritten by the spool's drain) and the caller gets a
BackendError at once, so a stuck backend sends mail to the spool within that
bound.  A message a thread is working on is waited for: every call there is
bounded by the backends' own timeouts (s3.timeout_seconds, whatever a
server's Retry-After says; postgres.connect_timeout_seconds and
statement_timeout_ms).  This is what keeps the S3 and
PostgreSQL cost per message low enough for the milter to keep up with
Postfix.  While PostgreSQL is known to be down, one batch at a time waits to
find out whether it is back; the others fail at once (milter/gate.py).

When the rows of uploaded objects are certainly not written (PostgreSQL
answered with an error, or was never reached), those objects are deleted
before `commit` raises: a tempfailed message, which its client sends again,
leaves no copy behind.  Only a connection lost with the statement sent leaves
that unknown; then the objects stay, as rows may point at them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import queue
import threading
import time
import uuid
from dataclasses import dataclass, field

import psycopg

from postkeep.milter import metrics
from postkeep.milter.capture import StoredContent
from postkeep.milter.gate import BackendGate
from postkeep.milter.linger import InFlight, linger_seconds
from postkeep.storage.content import packing, packs, sealed_objects, sealing
from postkeep.storage.content.dictionaries import DictionaryUse
from postkeep.storage.content.objects import ObjectStore, put_content
from postkeep.storage.content.parts import AttachmentRow, PartStore, hold_parts, record_attachments
from postkeep.storage.metadata.db import BackendError, Database
from postkeep.storage.metadata.messages import CapturedMessage, record_captures
from postkeep.storage.reports.inbound import link_each

log = logging.getLogger("postkeep.milter")


# How often a lingering batch looks again whether more messages may come.
LINGER_POLL = 0.002

# Where a message is in the pipeline.  Only QUEUED and UPLOADED ones (no
# thread has them) can be given up by `commit`; UPLOADING and RECORDING ones
# are a thread's until done.
QUEUED, UPLOADING, UPLOADED, RECORDING, ABANDONED = (
    "queued", "uploading", "uploaded", "recording", "abandoned")


@dataclass
class _Pending:
    message: CapturedMessage
    content: StoredContent
    done: threading.Event = field(default_factory=threading.Event)
    queued: float = field(default_factory=time.perf_counter)
    error: BackendError | None = None
    part_keys: list[str] = field(default_factory=list)
    state: str = QUEUED
    pack: packs.Pack | None = None  # the pack its object went into, if any
    # Its own object's data key (storage/content/sealed_objects.py): the key
    # row is written with the message's row.
    key: sealing.DataKey | None = None


class GroupCommitter:
    """Makes captured messages durable in batches (thread-safe)."""

    def __init__(self, db: Database, objects: ObjectStore, *, workers: int = 2,
                 max_batch: int = 64, linger: float = 0.01,
                 small_object_bytes: int = 256 * 1024, spool_dir: str | None = None,
                 level: int = 3, timeout: float | None = None, layout: str = "objects",
                 siblings: int = 0, in_flight: InFlight | None = None) -> None:
        self._db = db
        # Adaptive linger (milter/linger.py): the daemon shares IN_FLIGHT with
        # the capture service, which counts captures; 0 siblings: always linger.
        self.in_flight = in_flight or InFlight()
        self._siblings = siblings
        # "packs": a batch's small messages go into one object per organisation
        # and retention class (storage/content/packs.py); "objects": one each.
        self._packed = layout == "packs"
        self._timeout = timeout  # None: commit waits for as long as it takes
        self._states = threading.Lock()  # guards every _Pending.state
        self._db_gate = BackendGate()
        self._linger = linger
        self._forming = threading.Lock()  # one worker forms a batch at a time
        # minio-py reads an object of up to S3ObjectStore.STREAM_ABOVE (1 MiB)
        # into memory before sending it (larger ones stream from their file):
        # one large upload at a time keeps that to one such buffer.
        self._large = threading.Lock()
        self._parts = PartStore(db, objects, level=level, spool_dir=spool_dir,
                                upload_lock=self._large)
        self._dictionary_use = DictionaryUse()
        self._objects = objects
        self._max_batch = max_batch
        self._small = small_object_bytes
        self._queue: queue.SimpleQueue[_Pending | None] = queue.SimpleQueue()
        # Uploaded batches waiting for their rows; None: the uploads are over.
        self._uploaded: queue.SimpleQueue[list[_Pending] | None] = queue.SimpleQueue()
        self._threads = [
            threading.Thread(target=self._run, name=f"commit-{i}", daemon=True)
            for i in range(workers)
        ]
        self._recorder = threading.Thread(target=self._record_loop, name="commit-rows",
                                          daemon=True)
        for t in (*self._threads, self._recorder):
            t.start()

    def commit(self, message: CapturedMessage, content: StoredContent) -> None:
        """Block until MESSAGE's object and rows are durable; BackendError if not,
        or if no thread has taken it within the timeout (CONTENT is then the
        caller's again: nothing reads it any more)."""
        pending = _Pending(message, content)
        self.in_flight.commit_started()
        try:
            self._queue.put(pending)
            if not pending.done.wait(self._timeout):
                given_up = self._give_up(pending)
                if given_up is not None:
                    raise given_up
                pending.done.wait()  # a thread has it: bounded by the backends' timeouts
        finally:
            self.in_flight.commit_ended()
        if pending.error is not None:
            raise pending.error

    def _give_up(self, p: _Pending) -> BackendError | None:
        """Abandon P if no thread has it; the error to raise, or None if one has."""
        with self._states:
            stage = p.state
            if stage not in (QUEUED, UPLOADED):
                return None
            p.state = ABANDONED
        backend = "s3" if stage == QUEUED else "postgres"
        metrics.COMMIT_TIMEOUTS.labels(backend).inc()
        return BackendError(backend, f"not durable within {self._timeout:g}s"
                            f" (milter.commit_timeout_seconds; {stage} behind a stuck {backend})")

    def _claim(self, items: list[_Pending], was: str, now: str) -> list[_Pending]:
        """The ITEMS still in state WAS, moved to NOW (the others were abandoned)."""
        with self._states:
            claimed = [p for p in items if p.state == was]
            for p in claimed:
                p.state = now
        return claimed

    def close(self) -> None:
        """Finish what is queued, then stop the workers and the recorder."""
        for _ in self._threads:
            self._queue.put(None)
        for t in self._threads:
            t.join()
        self._uploaded.put(None)
        self._recorder.join()

    # -- upload side -----------------------------------------------------------
    def _run(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            metrics.COMMIT_BATCH.observe(len(batch))
            metrics.COMMIT_WAIT_SECONDS.observe(time.perf_counter() - batch[0].queued)
            stored: list[_Pending] = []
            try:
                started = time.perf_counter()
                stored = self._upload(self._prepare(batch))
                metrics.COMMIT_S3_SECONDS.observe(time.perf_counter() - started)
            except Exception as exc:  # never leave a waiter hanging
                _internal_error(batch, exc)
                stored = []
            later: set[int] = set()  # answered by the recorder
            if stored and self._db_gate.down is None:
                self._claim(stored, UPLOADING, UPLOADED)
                self._uploaded.put(stored)
                later = {id(p) for p in stored}
            elif stored:
                # PostgreSQL is known to be down: this thread tries the rows
                # itself, so that while one batch probes, the others fail at
                # once (milter/gate.py) instead of queueing behind the probe.
                self._record_rows(self._claim(stored, UPLOADING, RECORDING))
            for p in batch:
                if id(p) not in later:
                    p.done.set()

    # -- row side --------------------------------------------------------------
    def _record_loop(self) -> None:
        """Write the rows of every uploaded batch waiting, in one INSERT."""
        stopping = False
        while not stopping:
            first = self._uploaded.get()
            if first is None:
                return
            items = list(first)
            while len(items) < self._max_batch * 4:
                try:
                    more = self._uploaded.get_nowait()
                except queue.Empty:
                    break
                if more is None:  # close(): every upload is already in
                    stopping = True
                    break
                items.extend(more)
            items = self._claim(items, UPLOADED, RECORDING)
            if items:
                self._record_rows(items)
            for p in items:
                p.done.set()

    def _next_batch(self) -> list[_Pending] | None:
        """Wait for a message, then gather more for up to `linger`; None: stop."""
        with self._forming:
            batch: list[_Pending] = []
            while not batch:  # a message given up while queued is skipped
                first = self._queue.get()
                if first is None:
                    return None
                batch = self._claim([first], QUEUED, UPLOADING)
            linger = self._linger_for()
            deadline = time.monotonic() + linger
            while len(batch) < self._max_batch:
                remaining = deadline - time.monotonic()
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    if remaining <= 0 or not self.in_flight.more_may_join(len(batch)):
                        break
                    # Short waits: a capture in flight may end without
                    # committing (refused), which no queue item announces.
                    try:
                        nxt = self._queue.get(timeout=min(remaining, LINGER_POLL))
                    except queue.Empty:
                        continue
                if nxt is None:  # shutting down: let another worker see it too
                    self._queue.put(None)
                    break
                batch += self._claim([nxt], QUEUED, UPLOADING)
            return batch

    def _linger_for(self) -> float:
        """How long the batch just started waits for company (milter/linger.py)."""
        if self._linger <= 0:
            return 0.0
        wait = linger_seconds(self.in_flight.others(), linger=self._linger,
                              siblings=self._siblings)
        metrics.COMMIT_LINGER.labels("waited" if wait else "skipped").inc()
        return wait

    def _record_rows(self, stored: list[_Pending]) -> None:
        """Write STORED's rows; every failure ends up in the items' errors.

        The objects of the messages whose rows are certainly not written are
        deleted before their waiters learn of the failure: a tempfailed
        message retried by its client must not leave a copy behind (one no
        row points at, which no erasure or sweep would ever find).
        """
        started = time.perf_counter()
        failures: list[BaseException] = []  # what each attempt at the rows raised

        def record(conn: psycopg.Connection) -> None:
            try:
                self._record(conn, stored)
            except BaseException as exc:
                failures.append(exc)
                raise

        try:
            with self._db_gate.attempt():
                self._db.run(record)
            metrics.COMMIT_POSTGRES_SECONDS.observe(time.perf_counter() - started)
            metrics.COMMIT_ROWS_BATCH.observe(len(stored))
        except BackendError as exc:
            log.warning("%d objects written but their rows were not confirmed", len(stored))
            for p in stored:
                if p.error is None:
                    p.error = exc
        except Exception as exc:  # never leave a waiter hanging
            _internal_error(stored, exc)
        unrecorded = [p for p in stored if p.error is not None]
        if not unrecorded:
            return
        if all(_rolled_back(f) for f in failures):
            self._delete_objects(unrecorded)
        else:
            # The connection broke with the statement sent: if its COMMIT
            # reached PostgreSQL, rows point at these objects.  Keep them.
            log.warning("%d objects kept: their rows may have been committed before the"
                        " connection broke (%s)", len(unrecorded), failures[-1])

    def _delete_objects(self, unrecorded: list[_Pending]) -> None:
        done: set[str] = set()  # a pack is deleted once for all its messages
        for p in unrecorded:
            key = p.message.object_key
            if key in done:
                continue
            done.add(key)
            try:
                self._objects.delete(key)
            except BackendError as exc:
                log.warning("object of unrecorded message pk_id=%s left in the store: %s",
                            p.message.id.hex, exc.reason)

    def _prepare(self, batch: list[_Pending]) -> list[_Pending]:
        """Store parts and seal containers; return the items ready to upload."""
        ready = []
        for p in batch:
            content, m = p.content, p.message
            try:
                if content.dictionary is not None:
                    self._dictionary_use.ensure(self._db, content.dictionary,
                                                m.content_expires_at)
                for part in content.parts:
                    resolved = self._parts.resolve(m.org_id, part, m.content_expires_at)
                    p.part_keys.append(resolved.key)
                    metrics.PARTS.labels("uploaded" if resolved.uploaded else "reused").inc()
                    metrics.PART_STORED_BYTES.inc(resolved.uploaded)
                if not content.sealed:
                    content.seal(p.part_keys)
                    # the row records the object as stored, manifest included
                    p.message = dataclasses.replace(m, compressed_size=content.compressed_size)
            except BackendError as exc:
                p.error = exc
                continue
            ready.append(p)
        return ready

    def _record(self, conn: psycopg.Connection, stored: list[_Pending]) -> None:
        """The batch's rows: one INSERT; with parts, in one transaction that
        first holds every referenced part (FOR SHARE), so a sweep cannot
        delete one between the check and the commit."""
        if not any(p.part_keys or p.pack or p.key for p in stored):
            record_captures(conn, [p.message for p in stored])
            link_each(conn, [p.message for p in stored])
            return
        with conn.transaction():
            keys = {k for p in stored for k in p.part_keys}
            gone = hold_parts(conn, keys) if keys else set()
            if gone:  # swept since this process last saw them: tempfail those messages
                self._parts.forget_keys(gone)
                for p in stored:
                    if gone.intersection(p.part_keys):
                        p.error = BackendError("postgres", f"part object(s) {sorted(gone)}"
                                               " were deleted meanwhile; retry")
            ok = [p for p in stored if p.error is None]
            rows = [AttachmentRow(p.message.id, p.message.org_id, i, part.filename,
                                  part.content_type, part.size, part.sha256, key,
                                  p.message.content_expires_at, p.message.metadata_expires_at,
                                  p.message.created_at)
                    for p in ok
                    for i, (part, key) in enumerate(zip(p.content.parts, p.part_keys,
                                                        strict=True))]
            if ok:
                record_captures(conn, [p.message for p in ok])
                packs.record(conn, _packs_of(ok))
                sealing.record(conn, [p.key for p in ok if p.key is not None])
                record_attachments(conn, rows)
                link_each(conn, [p.message for p in ok])

    def _upload(self, batch: list[_Pending]) -> list[_Pending]:
        """Put every object; return the items now in the store."""
        ok: list[_Pending] = []
        if self._packed:
            # Inbound mail keeps its own object: unmatched reports name it by key.
            packable = [p for p in batch if p.content.compressed_size <= self._small
                        and p.message.direction != "inbound"]
            ok += self._upload_packs(packable)
            taken = {id(p) for p in packable}
            batch = [p for p in batch if id(p) not in taken]
        keys = self._data_keys(batch)
        batch = [p for p in batch if p.error is None]
        small = [p for p in batch if p.content.compressed_size <= self._small]
        singles = batch
        if len(small) > 1 and self._objects.can_batch():
            singles = [p for p in batch if p.content.compressed_size > self._small]
            try:
                self._objects.put_many(
                    [(p.message.object_key, self._sealed_bytes(p, keys.get(p.message.id)))
                     for p in small]
                )
                ok.extend(small)
            except BackendError as exc:
                for p in small:
                    p.error = exc
        for p in singles:
            large = p.content.compressed_size > self._small
            try:
                with self._large if large else contextlib.nullcontext():
                    self._put_single(p, keys.get(p.message.id))
                ok.append(p)
            except BackendError as exc:
                p.error = exc
        return ok

    def _data_keys(self, items: list[_Pending]) -> dict[uuid.UUID, sealing.DataKey]:
        """A fresh data key per item for its own object when sealing
        (sealing.py), by message id; {} when not.  As packing.store_packs:
        an organisation whose key cannot be read fails its own items only
        (their errors say why)."""
        if not items:
            return {}
        keys, failed = packing.new_keys(self._db, [
            (p.message.id, p.message.org_id, p.message.content_expires_at) for p in items])
        for p in items:
            if p.message.id in failed:
                p.error = failed[p.message.id]
        return keys or {}

    @staticmethod
    def _sealed_bytes(p: _Pending, key: sealing.DataKey | None) -> bytes:
        """A small own object's bytes: sealed under KEY if there is one."""
        p.key = key
        return sealed_objects.own_bytes(key, p.content.stream.read())

    def _put_single(self, p: _Pending, key: sealing.DataKey | None) -> None:
        """P's own object, streamed (sealed segment by segment under KEY if any)."""
        stream, length = sealed_objects.own_stream(key, p.content.stream,
                                                   p.content.compressed_size)
        put_content(self._objects, p.message.object_key, stream, length,
                    p.message.content_expires_at)
        p.key = key

    def _upload_packs(self, items: list[_Pending]) -> list[_Pending]:
        """Put ITEMS' objects into packs, one PUT per pack; the items stored.

        Each item's row then names its pack (object_key) and its place in it.
        """
        if not items:
            return []
        by_id = {p.message.id: p for p in items}
        stored, failed = packing.store_packs(
            self._db, self._objects,
            [packs.Entry(p.message.id, p.message.org_id, p.message.object_key,
                         p.message.content_expires_at, p.content.stream.read())
             for p in items])
        for mid, exc in failed.items():
            by_id[mid].error = exc
        ok: list[_Pending] = []
        for pack in stored:
            metrics.PACKS.inc()
            members = [by_id[mid] for mid in pack.members]
            for p in members:
                p.pack = pack
                p.message = dataclasses.replace(p.message, object_key=pack.key)
            ok += members
        return ok


def _packs_of(items: list[_Pending]) -> list[packs.Pack]:
    """The packs of ITEMS, each listing only ITEMS' messages (a message refused
    after its upload keeps no index row: its bytes are dead in the pack)."""
    ids = {p.message.id for p in items}
    out: dict[str, packs.Pack] = {}
    for p in items:
        if p.pack is not None and p.pack.key not in out:
            members = {m: loc for m, loc in p.pack.members.items() if m in ids}
            out[p.pack.key] = dataclasses.replace(p.pack, members=members)
    return list(out.values())


def _rolled_back(exc: BaseException) -> bool:
    """Did the attempt that raised EXC certainly leave no rows?

    PostgreSQL reports an error (SQLSTATE) for a statement only if its
    transaction did not commit.  A connection lost with the statement sent
    (no SQLSTATE) leaves that unknown.  Attempts that never got a connection
    raise nothing here at all.
    """
    return isinstance(exc, psycopg.Error) and exc.sqlstate is not None


def _internal_error(batch: list[_Pending], exc: Exception) -> None:
    log.exception("group commit failed")
    for p in batch:
        if p.error is None:
            p.error = BackendError("postkeep", f"internal error: {exc}")
