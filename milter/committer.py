"""Group commit: concurrent messages share one upload and one INSERT.

Each end of message hands its object and rows to `GroupCommitter.commit` and
waits.  A few worker threads (Python-owned, see adapter.py for why that
matters) form batches one at a time: the first message waits up to `linger`
seconds for company (a few milliseconds, far less than an SMTP round trip),
then the batch is made durable together while the next one forms:

- small objects (compressed size up to `small_object_bytes`) in one S3 call
  when the store can batch (MinIO's snowball auto-extract: each tar member
  becomes its own object under its own key), else one PUT each;
- large objects one streaming PUT each, so memory stays bounded;
- every stored message's rows in one INSERT statement.

Only when that statement has committed does `commit` return; if any step
fails it raises BackendError for every message of the batch it touched, and
the milter spools or tempfails them.  This is what keeps the S3 and
PostgreSQL cost per message low enough for the milter to keep up with
Postfix.  While PostgreSQL is known to be down, one batch at a time waits to
find out whether it is back; the others fail at once (milter/gate.py).
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from dataclasses import dataclass, field

from postkeep.milter import metrics
from postkeep.milter.capture import StoredContent
from postkeep.milter.gate import BackendGate
from postkeep.storage.db import BackendError, Database
from postkeep.storage.messages import CapturedMessage, record_captures
from postkeep.storage.objects import ObjectStore

log = logging.getLogger("postkeep.milter")


@dataclass
class _Pending:
    message: CapturedMessage
    content: StoredContent
    done: threading.Event = field(default_factory=threading.Event)
    error: BackendError | None = None


class GroupCommitter:
    """Makes captured messages durable in batches (thread-safe)."""

    def __init__(self, db: Database, objects: ObjectStore, *, workers: int = 2,
                 max_batch: int = 64, linger: float = 0.01,
                 small_object_bytes: int = 256 * 1024) -> None:
        self._db = db
        self._db_gate = BackendGate()
        self._linger = linger
        self._forming = threading.Lock()  # one worker forms a batch at a time
        # minio-py holds up to one 5 MiB part of a large object in memory:
        # one large upload at a time keeps the milter's memory bounded.
        self._large = threading.Lock()
        self._objects = objects
        self._max_batch = max_batch
        self._small = small_object_bytes
        self._queue: queue.SimpleQueue[_Pending | None] = queue.SimpleQueue()
        self._threads = [
            threading.Thread(target=self._run, name=f"commit-{i}", daemon=True)
            for i in range(workers)
        ]
        for t in self._threads:
            t.start()

    def commit(self, message: CapturedMessage, content: StoredContent) -> None:
        """Block until MESSAGE's object and rows are durable; BackendError if not."""
        pending = _Pending(message, content)
        self._queue.put(pending)
        pending.done.wait()
        if pending.error is not None:
            raise pending.error

    def close(self) -> None:
        """Finish what is queued, then stop the workers."""
        for _ in self._threads:
            self._queue.put(None)
        for t in self._threads:
            t.join()

    # -- worker side ---------------------------------------------------------
    def _run(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            metrics.COMMIT_BATCH.observe(len(batch))
            try:
                self._store(batch)
            except Exception as exc:  # never leave a waiter hanging
                log.exception("group commit failed")
                for p in batch:
                    if p.error is None:
                        p.error = BackendError("postkeep", f"internal error: {exc}")
            finally:
                for p in batch:
                    p.done.set()

    def _next_batch(self) -> list[_Pending] | None:
        """Wait for a message, then gather more for up to `linger`; None: stop."""
        with self._forming:
            first = self._queue.get()
            if first is None:
                return None
            batch = [first]
            deadline = time.monotonic() + self._linger
            while len(batch) < self._max_batch:
                remaining = deadline - time.monotonic()
                try:
                    nxt = (self._queue.get(timeout=remaining) if remaining > 0
                           else self._queue.get_nowait())
                except queue.Empty:
                    break
                if nxt is None:  # shutting down: let another worker see it too
                    self._queue.put(None)
                    break
                batch.append(nxt)
            return batch

    def _store(self, batch: list[_Pending]) -> None:
        stored = self._upload(batch)
        if not stored:
            return
        try:
            with self._db_gate.attempt():
                self._db.run(lambda conn: record_captures(conn, [p.message for p in stored]))
        except BackendError as exc:
            # Objects stay: if the COMMIT reached PostgreSQL before the error,
            # rows point at them; an object without a row is invisible.
            log.warning("%d objects written but their rows were not confirmed", len(stored))
            for p in stored:
                p.error = exc

    def _upload(self, batch: list[_Pending]) -> list[_Pending]:
        """Put every object; return the items now in the store."""
        small = [p for p in batch if p.content.compressed_size <= self._small]
        singles = batch
        ok: list[_Pending] = []
        if len(small) > 1 and self._objects.can_batch():
            singles = [p for p in batch if p.content.compressed_size > self._small]
            try:
                self._objects.put_many(
                    [(p.message.object_key, p.content.stream.read()) for p in small]
                )
                ok.extend(small)
            except BackendError as exc:
                for p in small:
                    p.error = exc
        for p in singles:
            large = p.content.compressed_size > self._small
            try:
                with self._large if large else contextlib.nullcontext():
                    self._objects.put(p.message.object_key, p.content.stream,
                                      p.content.compressed_size)
                ok.append(p)
            except BackendError as exc:
                p.error = exc
        return ok
