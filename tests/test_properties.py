"""Properties over arbitrary input (hypothesis): what must hold for any bytes.

- Capture then restore gives back the exact message, however Postfix cuts
  the body into chunks and wherever the spill to disk falls.
- The policy protocol's framing gives the same requests however the bytes
  arrive.
- A report parser never raises, whatever it is sent.
"""

from __future__ import annotations

import io
import uuid
from datetime import UTC, datetime

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from postkeep.envelope import return_path
from postkeep.milter.capture import MessageCapture
from postkeep.policyd.protocol import Limits, ProtocolError, RequestBuilder
from postkeep.storage.content.objects import MemoryObjectStore
from postkeep.storage.content.restore import restore
from postkeep.storage.reports.dsn import parse_report

pytestmark = pytest.mark.unit

PROFILE = settings(max_examples=150, deadline=None,
                   suppress_health_check=[HealthCheck.too_slow])
_NAME = st.from_regex(rb"[A-Za-z][A-Za-z0-9-]{0,20}", fullmatch=True).map(bytes.decode)
_VALUE = st.binary(max_size=200).map(lambda b: b" " + b.replace(b"\r", b"").replace(b"\n", b""))


def _cut(data: bytes, sizes: list[int]) -> list[bytes]:
    out, i = [], 0
    for n in sizes:
        if i >= len(data):
            break
        out.append(data[i:i + n])
        i += n
    if i < len(data):
        out.append(data[i:])
    return out


@PROFILE
@given(headers=st.lists(st.tuples(_NAME, _VALUE), max_size=8),
       body=st.binary(max_size=20_000),
       sizes=st.lists(st.integers(1, 70_000), max_size=6),
       spill=st.sampled_from([0, 64, 1 << 20]))
def test_restore_of_capture_is_the_message(headers: list[tuple[str, bytes]], body: bytes,
                                           sizes: list[int], spill: int) -> None:
    cap = MessageCapture(spill_bytes=spill)
    cap.add_own_header("X-Postkeep-Id", "0190-prop")
    for name, value in headers:
        cap.add_header(name, value)
    cap.end_of_headers()
    for chunk in _cut(body, sizes):
        cap.add_body(chunk)
    content = cap.finish()
    blob = content.stream.read()
    store = MemoryObjectStore()
    store.put("k", io.BytesIO(blob), len(blob))
    expected = (b"".join(f"{n}:".encode() + v + b"\r\n" for n, v in headers)
                + b"X-Postkeep-Id: 0190-prop\r\n\r\n" + body)
    assert b"".join(restore(store, "k")) == expected
    assert content.size == len(expected)
    cap.discard()


@PROFILE
@given(data=st.binary(max_size=3000), sizes=st.lists(st.integers(1, 500), max_size=20))
def test_policy_framing_does_not_depend_on_how_bytes_arrive(data: bytes,
                                                            sizes: list[int]) -> None:
    whole = RequestBuilder(Limits())
    try:
        expected = whole.feed(data)
    except ProtocolError:
        return
    pieces = RequestBuilder(Limits())
    got = []
    for chunk in _cut(data, sizes):
        got += pieces.feed(chunk)
    assert got == expected


KEY = b"property return-path key 32 byte"


@PROFILE
@given(raw=st.binary(max_size=5000))
def test_the_report_parser_is_total(raw: bytes) -> None:
    mid = uuid.uuid4()
    when = datetime(2026, 12, 4, tzinfo=UTC)
    r = parse_report(raw, "", [return_path(mid, when, "b.example", KEY)], when, KEY)
    assert r.size == len(raw) and (r.reason is not None or r.message_id == mid)
