"""Requests to unsubscribe at a return path (storage/reports/returned.py,
classify.is_unsubscribe), without a database: what counts as one and whom
it may name.  Through the real stack: test_suppression_stack.py."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import pytest

from postkeep.envelope import return_path
from postkeep.storage.reports import classify, returned
from postkeep.storage.reports.dsn import parse_report

pytestmark = pytest.mark.unit

KEY = b"test return-path key, 32 bytes!"
T0 = datetime(2026, 11, 25, 10, 0, tzinfo=UTC)
EXPIRES = T0 + timedelta(days=365)


def _paths(mid: uuid.UUID, rcpt: str | None = None) -> list[str]:
    path = return_path(mid, EXPIRES, "bounces.example", KEY)
    if rcpt is None:
        return [path]
    local, _, domain = path.partition("@")
    r_local, _, r_domain = rcpt.partition("@")
    return [f"{local}+{r_local}={r_domain}@{domain}"]


def _mail(subject: str, extra: str = "", sender: str = "Reader <reader@far.example>") -> bytes:
    return (f"From: {sender}\r\nTo: x@bounces.example\r\nSubject: {subject}\r\n{extra}"
            "\r\nPlease take me off.\r\n").encode()


@pytest.mark.parametrize(("subject", "extra", "want"), [
    ("unsubscribe", "", True),
    ("  UnSubscribe ", "", True),
    ("=?utf-8?q?unsubscribe?=", "", True),                      # RFC 2047, as clients send it
    ("Re: unsubscribe", "", False),                             # a conversation about it
    ("unsubscribe me please", "", False),
    ("unsubscribe", "Auto-Submitted: auto-replied\r\n", False),  # an out-of-office echoing it
    ("Hello", "", False),
])
def test_what_is_a_request_to_unsubscribe(subject: str, extra: str, want: bool) -> None:
    assert classify.is_unsubscribe(classify.parse(_mail(subject, extra))) is want


def test_a_request_is_recorded_as_a_reply_and_names_its_verp_recipient_first() -> None:
    mid = uuid.uuid4()
    raw = _mail("unsubscribe", sender="someone@else.example")
    report = parse_report(raw, "reader@far.example", _paths(mid, "Reader@far.example"), T0, KEY)
    assert returned.reply_type(raw, "reader@far.example", report) == classify.REPLY
    assert returned.unsubscriber(raw, "<reader@far.example>", report) == (
        "Reader@far.example", "someone@else.example", "reader@far.example")


def test_no_request_names_nobody_and_a_forged_path_is_no_reply() -> None:
    mid = uuid.uuid4()
    plain = _mail("Thanks!")
    report = parse_report(plain, "reader@far.example", _paths(mid), T0, KEY)
    assert returned.unsubscriber(plain, "reader@far.example", report) == ()
    raw = _mail("unsubscribe")
    forged = return_path(mid, EXPIRES, "bounces.example", b"another key, 32 bytes long!!!!!")
    report = parse_report(raw, "reader@far.example", [forged], T0, KEY)
    assert report.message_id is None  # the MAC does not verify: not the message's
    assert returned.reply_type(raw, "reader@far.example", report) is None
