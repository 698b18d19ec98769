"""The bounce parser against a corpus of real bounces of many MTAs.

tests/golden/bounces/ (see its README): real bounces from Exim, Office 365,
Exchange, Gmail and Google Workspace, Yahoo, Japanese carriers (au/KDDI,
NTT docomo, Biglobe), OpenSMTPD, Amazon SES and WorkMail, qmail, Sendmail,
Postfix, Courier and more, each with the recipient, status code and reply an
independent parser (Sisimai) read from it; and flufl.bounce's own samples
(X.400 gateways, Sun Messaging Server, GroupWise, SMTP32...) with the recipient
flufl expects.  Every one must be attributed to its recipient with the code
the report states (none where it states none: a version number is no code).
"""

from __future__ import annotations

import hashlib
import json
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from postkeep.envelope import return_path
from postkeep.storage.reports.dsn import Report, parse_report

pytestmark = pytest.mark.unit

CORPUS = Path(__file__).parent / "golden" / "bounces"
MANIFEST: list[dict[str, Any]] = json.loads((CORPUS / "manifest.json").read_text())
KEY = b"postkeep-bounce-corpus-test-key"


def _parse(entry: dict[str, Any]) -> Report:
    raw = (CORPUS / entry["file"]).read_bytes()
    path = return_path(uuid.uuid4(), datetime.now(UTC) + timedelta(days=30), "b.example", KEY)
    return parse_report(raw, "", [path], datetime.now(UTC), KEY)


def _verdict(entry: dict[str, Any]) -> str | None:
    """None if the report is read as the manifest says; otherwise what differs."""
    report = _parse(entry)
    if report.reason is not None:
        return f"not attributed: {report.reason}"
    # Matched as record_report matches: by Final- or Original-Recipient.
    mine = [o for o in report.outcomes
            if entry["recipient"] in (o.recipient.lower(), (o.original or "").lower())]
    if not mine:
        return f"recipient not found; outcomes {[o.recipient for o in report.outcomes]}"
    o = mine[0]
    if o.status not in ("bounced", "expired"):
        return f"status {o.status}"
    if o.dsn_status != entry["dsn_status"]:
        return f"code {o.dsn_status}, the report says {entry['dsn_status']}"
    want = entry["diagnostic_contains"]
    if want and want not in " ".join((o.diagnostic or "").split()).lower():
        return f"diagnostic {o.diagnostic!r} lacks {want!r}"
    return None


def test_the_corpus_is_as_checked_in_and_covers_many_mtas() -> None:
    files = {p.name for p in CORPUS.glob("*.eml")}
    assert files == {e["file"] for e in MANIFEST}
    for e in MANIFEST:
        assert hashlib.sha256((CORPUS / e["file"]).read_bytes()).hexdigest() == e["sha256"]
        assert e["source"].startswith(("https://github.com/sisimai/set-of-emails/",
                                       "https://pypi.org/project/flufl.bounce/"))
        assert e["licence"]
    families = {e["file"].rsplit("-", 1)[0] for e in MANIFEST}
    assert len(families) >= 50
    for named in ("lhost-exim", "lhost-office365", "lhost-exchange2007", "rhost-gsuite",
                  "lhost-gmail", "lhost-yahoo", "rhost-kddi", "rhost-nttdocomo",
                  "lhost-opensmtpd", "lhost-amazonworkmail", "lhost-amazonses", "lhost-qmail",
                  "lhost-sendmail", "lhost-postfix"):
        assert named in families
    assert len(MANIFEST) >= 100


@pytest.mark.parametrize("entry", MANIFEST, ids=[e["file"] for e in MANIFEST])
def test_each_real_bounce_is_attributed_with_the_code_it_states(entry: dict[str, Any]) -> None:
    assert _verdict(entry) is None, _verdict(entry)


def test_share_attributed(capsys: pytest.CaptureFixture[str]) -> None:
    """The figure for the report: the share read right (all of them)."""
    wrong = {e["file"]: v for e in MANIFEST if (v := _verdict(e)) is not None}
    with capsys.disabled():
        print(f"\nbounce corpus: {len(MANIFEST) - len(wrong)}/{len(MANIFEST)} attributed"
              " with the stated code")
    assert not wrong
