"""Delivery reports for tests: Postfix-style RFC 3464 DSNs."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime


def dsn(mid: uuid.UUID | None, blocks: list[dict[str, str]], *, envid: bool = True,
        date: str = "Wed, 25 Nov 2026 10:00:00 +0000") -> bytes:
    """A Postfix-style DSN (multipart/report) for MID with per-recipient BLOCKS."""
    per_msg = "Reporting-MTA: dns; mta.example\r\nX-Postfix-Queue-ID: 4ABC\r\n"
    if envid and mid is not None:
        per_msg += f"Original-Envelope-Id: {mid}\r\n"
    per_msg += "Arrival-Date: Wed, 25 Nov 2026 09:59:59 +0000\r\n"
    rcpt = "".join(
        "\r\n" + "".join(f"{k}: {v}\r\n" for k, v in b.items()) for b in blocks)
    headers = (f"X-Postkeep-Id: {mid}\r\n" if mid else "") + "Subject: hello\r\n"
    return (
        f"From: MAILER-DAEMON@mta.example\r\nDate: {date}\r\n"
        "Subject: Delivery Status Notification\r\nMIME-Version: 1.0\r\n"
        'Content-Type: multipart/report; report-type=delivery-status; boundary="B"\r\n\r\n'
        "--B\r\nContent-Type: text/plain\r\n\r\nThe mail system\r\n\r\n"
        "--B\r\nContent-Type: message/delivery-status\r\n\r\n"
        f"{per_msg}{rcpt}\r\n"
        f"--B\r\nContent-Type: text/rfc822-headers\r\n\r\n{headers}\r\n--B--\r\n"
    ).encode()


def block(rcpt: str, action: str, status: str, diag: str | None = None,
          original: str | None = None) -> dict[str, str]:
    b = {"Final-Recipient": f"rfc822; {rcpt}"}
    if original:
        b["Original-Recipient"] = f"rfc822;{original}"
    b |= {"Action": action, "Status": status, "Remote-MTA": "dns; mx.remote.example"}
    if diag:
        b["Diagnostic-Code"] = f"smtp; {diag}"
    return b


def remote_dsn(mid: uuid.UUID, rcpt: str, action: str, status: str, diag: str, *,
               mta: str = "test.example", subject: str = "report") -> bytes:
    """A remote MTA's notice for RCPT (no returned headers: the envelope id
    alone names MID), dated a little after now: a later final status wins
    over the relayed notice Postfix sent a moment ago (a fixed date would
    fall behind it)."""
    date = format_datetime(datetime.now(UTC) + timedelta(seconds=2))
    return (
        f"From: MAILER-DAEMON@{mta}\r\nSubject: {subject}\r\n"
        f"Date: {date}\r\nMIME-Version: 1.0\r\n"
        'Content-Type: multipart/report; report-type=delivery-status; boundary="b"\r\n\r\n'
        "--b\r\nContent-Type: message/delivery-status\r\n\r\n"
        f"Reporting-MTA: dns; {mta}\r\nOriginal-Envelope-Id: {mid}\r\n\r\n"
        f"Final-Recipient: rfc822; {rcpt}\r\nAction: {action}\r\nStatus: {status}\r\n"
        f"Diagnostic-Code: smtp; {diag}\r\n\r\n--b--\r\n"
    ).encode()
