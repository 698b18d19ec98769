"""The end-of-message path is bounded, whatever a backend does.

A message no thread has taken within milter.commit_timeout_seconds (queued
behind a stuck upload, or uploaded and waiting behind stuck rows) is given
up: the caller gets a BackendError naming the backend at once (the milter
then spools it) and the message's rows are never written.  And the S3
client never sleeps out a server's Retry-After.
"""

from __future__ import annotations

import http.server
import io
import threading
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any, BinaryIO

import pytest

from postkeep.config import S3Config
from postkeep.milter.capture import StoredContent
from postkeep.milter.committer import GroupCommitter
from postkeep.storage.content.objects import MemoryObjectStore, S3ObjectStore
from postkeep.storage.metadata.db import BackendError
from postkeep.storage.metadata.messages import CapturedMessage

pytestmark = pytest.mark.unit

GENEROUS = 30.0  # seconds: only ever a deadline for something that should not hang


def _message(tag: int) -> tuple[CapturedMessage, StoredContent]:
    mid = uuid.uuid4()
    now = datetime.now(UTC)
    body = bytes([tag]) * 100
    m = CapturedMessage(mid, uuid.uuid4(), "d.example", "Q", "a@d.example", ("r@x",), 100,
                        b"\0" * 32, f"messages/{mid}.eml.zst", 100, now, now, now)
    return m, StoredContent(io.BytesIO(body), 100, 100, b"\0" * 32, 100)


class StuckStore(MemoryObjectStore):
    """An object store whose first PUT hangs until released."""

    def __init__(self) -> None:
        super().__init__()
        self.entered = threading.Event()
        self.release = threading.Event()

    def put(self, key: str, data: BinaryIO, length: int) -> None:
        if not self.entered.is_set():
            self.entered.set()
            assert self.release.wait(GENEROUS)
        super().put(key, data, length)

    def can_batch(self) -> bool:
        return False


class Rows:
    """A database whose first transaction hangs until released; records the ids."""

    def __init__(self, stuck: bool) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()
        self.stuck = stuck
        self.ids: list[uuid.UUID] = []

    def run(self, work: Any) -> Any:
        if self.stuck and not self.entered.is_set():
            self.entered.set()
            assert self.release.wait(GENEROUS)
        return work(self)

    def execute(self, sql: str, params: dict[str, Any]) -> None:
        self.ids += list(params["id"])


def _in_thread(gc: GroupCommitter, item: tuple[CapturedMessage, StoredContent]
               ) -> tuple[threading.Thread, list[BaseException | None]]:
    out: list[BaseException | None] = [None]

    def go() -> None:
        try:
            gc.commit(*item)
        except BaseException as exc:
            out[0] = exc

    t = threading.Thread(target=go)
    t.start()
    return t, out


def test_a_message_queued_behind_a_stuck_upload_is_given_up_and_never_written() -> None:
    store, rows = StuckStore(), Rows(stuck=False)
    gc = GroupCommitter(rows, store, workers=1, linger=0, timeout=0.2)  # type: ignore[arg-type]
    first, second = _message(1), _message(2)
    t, out = _in_thread(gc, first)
    assert store.entered.wait(GENEROUS)  # the only upload worker is stuck in S3
    with pytest.raises(BackendError) as err:
        gc.commit(*second)
    assert err.value.backend == "s3" and "milter.commit_timeout_seconds" in err.value.reason
    store.release.set()
    t.join(GENEROUS)
    assert not t.is_alive() and out == [None]  # the message being written still lands
    gc.close()
    assert first[0].object_key in store.objects and second[0].object_key not in store.objects
    assert rows.ids == [first[0].id]


def test_an_uploaded_message_behind_stuck_rows_is_given_up_without_rows() -> None:
    store, rows = MemoryObjectStore(), Rows(stuck=True)
    gc = GroupCommitter(rows, store, workers=2, linger=0, timeout=0.2)  # type: ignore[arg-type]
    first, second = _message(1), _message(2)
    t, out = _in_thread(gc, first)
    assert rows.entered.wait(GENEROUS)  # the recorder is stuck in PostgreSQL
    with pytest.raises(BackendError) as err:
        gc.commit(*second)
    assert err.value.backend == "postgres"
    rows.release.set()
    t.join(GENEROUS)
    assert not t.is_alive() and out == [None]
    gc.close()
    # Its object went up before it was given up: no row names it (the spool's
    # drain writes the same key again, with the rows).
    assert second[0].object_key in store.objects
    assert rows.ids == [first[0].id]


class _Busy(http.server.BaseHTTPRequestHandler):
    """Every request: 503 with a Retry-After longer than any test may wait."""

    def _answer(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)
        self.send_response(503)
        self.send_header("Retry-After", "120")
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_GET = do_PUT = do_POST = do_HEAD = _answer

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def busy_s3() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Busy)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_s3_503_with_retry_after_fails_within_the_timeout(busy_s3: str) -> None:
    store = S3ObjectStore(S3Config(endpoint=busy_s3, access_key="k", secret_key="s" * 8,
                                   bucket="postkeep", timeout_seconds=1.0))
    t, out = _in_thread_call(lambda: store.put("k", io.BytesIO(b"x"), 1))
    t.join(GENEROUS)  # honouring Retry-After would take 120 s per try
    assert not t.is_alive(), "the S3 client slept out the server's Retry-After"
    assert isinstance(out[0], BackendError) and out[0].backend == "s3"


def _in_thread_call(fn: Any) -> tuple[threading.Thread, list[BaseException | None]]:
    out: list[BaseException | None] = [None]

    def go() -> None:
        try:
            fn()
        except BaseException as exc:
            out[0] = exc

    t = threading.Thread(target=go, daemon=True)
    t.start()
    return t, out
