"""Inbound classification (storage/reports/classify.py) against real mail.

tests/golden/inbound/ (see its README): real auto-replies (RFC 3834, Exchange,
Apple Mail) and ARF feedback reports (Yahoo, Amazon SES, others) from sisimai's
set-of-emails, each with the type, complained recipient and references it
must give; every real bounce of tests/golden/bounces/ must read as a bounce.
Vendor marks without a public sample (Exchange's X-MS-Exchange headers,
Precedence: auto_reply, X-Autoreply) are checked on small made-up messages.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest

from postkeep.storage.reports import classify

pytestmark = pytest.mark.unit

GOLDEN = Path(__file__).parent / "golden"
MANIFEST: dict[str, dict[str, Any]] = json.loads(
    (GOLDEN / "inbound" / "manifest.json").read_text())


@pytest.mark.parametrize("name", sorted(MANIFEST))
def test_golden_inbound(name: str) -> None:
    want = MANIFEST[name]
    raw = (GOLDEN / "inbound" / name).read_bytes()
    assert hashlib.sha256(raw).hexdigest() == want["sha256"]
    msg = classify.parse(raw)
    assert classify.message_type(msg, str(msg.get("Return-Path", ""))) == want["message_type"]
    assert classify.complained_recipient(msg) == want["complained_recipient"]
    assert classify.feedback_type(msg) == want["feedback_type"]
    assert classify.references(msg) == want["references"]


def test_corpus_covers_both_kinds() -> None:
    kinds = [v["message_type"] for v in MANIFEST.values()]
    assert kinds.count("complaint") >= 10 and kinds.count("auto_reply") >= 6
    assert sum(1 for v in MANIFEST.values() if v["complained_recipient"]) >= 8


def test_real_bounces_read_as_bounces() -> None:
    files = sorted((GOLDEN / "bounces").glob("*.eml"))
    wrong = [f.name for f in files
             if classify.message_type(classify.parse(f.read_bytes()), "") != "bounce"]
    assert len(files) > 100 and wrong == []


def _msg(headers: str, body: str = "Hello\n") -> str:
    return classify.message_type(classify.parse((headers + "\n" + body).encode()),
                                 "someone@example.org")


@pytest.mark.parametrize("headers", [
    "Subject: Re: offer\nAuto-Submitted: auto-replied\n",
    "Subject: Re: offer\nAuto-Submitted: auto-generated; owner-email=x@y\n",
    "Subject: Re: offer\nPrecedence: auto_reply\n",
    "Subject: away\nX-Autoreply: yes\n",
    "Subject: Re: offer\nX-Autorespond: Re: offer\n",
    "Subject: Automatic reply: offer\nX-Auto-Response-Suppress: All\n"
    "X-MS-Exchange-Inbox-Rules-Loop: a@example.org\n",
    "Subject: offer\nX-MS-Exchange-Generated-Message-Source: Mailbox Rules Agent\n",
    "Subject: Out of Office: offer\n",
    "Subject: Abwesenheitsnotiz: offer\n",
    "Subject: =?UTF-8?Q?R=C3=A9ponse_automatique=C2=A0:_offer?=\n",
])
def test_vendor_auto_replies(headers: str) -> None:
    assert _msg(headers) == "auto_reply"


@pytest.mark.parametrize(("headers", "kind"), [
    ("Subject: Re: offer\nIn-Reply-To: <a@b>\n", "reply"),
    ("Subject: Re: offer\nReferences: <x@b> <a@b>\n", "reply"),
    ("Subject: Re: offer\nIn-Reply-To: <a@b>\nAuto-Submitted: no\n", "reply"),
    # Outlook sets X-Auto-Response-Suppress on ordinary mail too.
    ("Subject: Re: offer\nIn-Reply-To: <a@b>\nX-Auto-Response-Suppress: All\n", "reply"),
    ("Subject: hello\n", "email"),
])
def test_replies_and_plain_mail(headers: str, kind: str) -> None:
    assert _msg(headers) == kind


def test_references_nearest_first() -> None:
    msg = classify.parse(b"In-Reply-To: <c@x>\nReferences: <a@x> <b@x>\n <c@x>\n\nhi\n")
    assert classify.references(msg) == ["<c@x>", "<b@x>", "<a@x>"]


def test_quoted_ids_and_return_paths() -> None:
    raw = (b"Subject: Re\n\n> X-Postkeep-Id: 0190a0b1-c2d3-7e4f-8a9b-0c1d2e3f4a5b\n"
           b"> Return-Path: <pk-0190a0b1c2d37e4f8a9b0c1d2e3f4a5b-6789abcd-0123456789abcdef"
           b"@bounces.example.net>\n")
    assert [str(u) for u in classify.quoted_ids(raw)] == ["0190a0b1-c2d3-7e4f-8a9b-0c1d2e3f4a5b"]
    assert classify.quoted_return_paths(raw) == [
        "pk-0190a0b1c2d37e4f8a9b0c1d2e3f4a5b-6789abcd-0123456789abcdef@bounces.example.net"]
