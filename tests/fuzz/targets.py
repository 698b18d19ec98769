"""Fuzz targets: what postkeep parses from strangers, each with its invariants.

Each target takes arbitrary bytes and raises only on a real defect: an
exception the code does not promise (a parser must be total), or an
invariant broken.  The same functions serve three callers: atheris
(coverage-guided, `python -m fuzz.run TARGET`, `make fuzz`), the short
pass in `make test` (tests/test_fuzz.py), and the golden corpus of inputs
that once broke a target (tests/fuzz/crashes/<target>/), replayed every run.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Callable
from datetime import UTC, datetime

from postkeep.envelope import return_path
from postkeep.milter.mime_split import large_parts
from postkeep.policyd.protocol import Limits, ProtocolError, RequestBuilder
from postkeep.storage.content.objects import MemoryObjectStore
from postkeep.storage.content.restore import restore
from postkeep.storage.metadata.db import BackendError
from postkeep.storage.reports.dsn import STATUSES, parse_report

KEY = b"fuzz return-path key, 32 bytes!!"
T0 = datetime(2026, 12, 4, tzinfo=UTC)
_PATH = return_path(__import__("uuid").UUID(int=7), T0, "bounces.fuzz.example", KEY)


def dsn(data: bytes) -> None:
    """A report is always a Report: never an exception, statuses from the set."""
    r = parse_report(data, "", [_PATH], T0, KEY)
    assert r.size == len(data)
    assert all(o.status in STATUSES for o in r.outcomes)
    assert r.reason is not None or r.message_id is not None


def policy(data: bytes) -> None:
    """Framing: ProtocolError or requests; the same requests however the bytes are cut."""
    limits = Limits()
    whole = RequestBuilder(limits)
    try:
        expected = whole.feed(data)
    except ProtocolError:
        return
    pieces = RequestBuilder(limits)
    got = []
    cut = max(1, (data[0] if data else 1) % 17)
    for i in range(0, len(data), cut):
        got += pieces.feed(data[i:i + cut])
    assert got == expected


def mime(data: bytes) -> None:
    """Part spans lie inside the body, in order, never overlapping."""
    head, _, body = data.partition(b"\r\n\r\n")
    header = b"Content-Type: multipart/mixed; boundary=\"b\"\r\n" + head
    spans = large_parts(header, body, 8)
    end = 0
    for s in spans:
        assert end <= s.start <= s.end <= len(body), (s, len(body))
        end = s.end


def container(data: bytes) -> None:
    """Restoring stored bytes: the bytes back, or BackendError naming what is wrong."""
    store = MemoryObjectStore()
    store.put("k", io.BytesIO(data), len(data))
    with contextlib.suppress(BackendError):
        b"".join(restore(store, "k"))


TARGETS: dict[str, Callable[[bytes], None]] = {
    "dsn": dsn, "policy": policy, "mime": mime, "container": container,
}
