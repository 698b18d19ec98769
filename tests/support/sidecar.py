"""postkeep-storage seen from outside, for tests: its LMTP port, its log, its
metrics, and real mail whose delivery reports it records."""

from __future__ import annotations

import re
import time
import urllib.request
import uuid
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from pathlib import Path

from support import smtp
from support.reports import block, dsn
from support.stack import Stack


def lmtp(stack: Stack) -> smtp.Client:
    """A session with the stack's postkeep-storage, greeted with LHLO."""
    return smtp.Client("127.0.0.1", int(stack.env["POSTKEEP_STORAGE_LMTP_PORT"]),
                       greeting="LHLO")


def deliver(stack: Stack, path: str, report: bytes) -> smtp.Reply:
    """REPORT delivered over LMTP to return path PATH, as Postfix would; the reply
    (also a refusal, which Postfix would retry)."""
    client = lmtp(stack)
    try:
        return client.send("", [path], report)
    except smtp.SMTPError as exc:
        return exc.reply
    finally:
        client.close()


def failure_report(mid: uuid.UUID, rcpt: str, status: str = "5.1.1",
                   diag: str = "550 5.1.1 user unknown") -> bytes:
    """A Postfix-style DSN: RCPT of message MID failed.  Dated a little after
    now, so that it wins over the success notice Postfix sent a moment ago."""
    date = format_datetime(datetime.now(UTC) + timedelta(seconds=2))
    return dsn(mid, [block(rcpt, "failed", status, diag)], date=date)


def statuses(stack: Stack, mid: uuid.UUID) -> dict[str, str]:
    """Each recipient's recorded status."""
    with stack.connect() as conn:
        return {str(r): str(s) for r, s in conn.execute(
            "SELECT recipient, status FROM message_recipients WHERE message_id = %s",
            (mid,)).fetchall()}


def wait_statuses(stack: Stack, mid: uuid.UUID, want: dict[str, str],
                  timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while True:
        have = statuses(stack, mid)
        if {r: have.get(r) for r in want} == want:
            return
        assert time.monotonic() < deadline, f"statuses {have}, want {want}"
        time.sleep(0.3)


def relayed_message(stack: Stack, domain: str, rcpts: list[str]) -> tuple[uuid.UUID, str]:
    """A message from DOMAIN to RCPTS (at sink.test) through Postfix, once every
    recipient's success notice was recorded: (message id, return path)."""
    token = uuid.uuid4().hex
    data = (f"From: app@{domain}\r\nTo: list@{domain}\r\nSubject: outcomes {token}\r\n"
            f"Message-ID: <{token}@{domain}>\r\nX-Test-Token: {token}\r\n\r\n"
            "A tracked message.\r\n").encode()
    reply = smtp.send(*stack.smtp, f"app@{domain}", rcpts, data)
    assert reply.queue_id, reply.text
    mid, rpath = stack.sent(reply.queue_id)
    wait_statuses(stack, mid, dict.fromkeys(rcpts, "relayed"))
    return mid, rpath


def log_path(stack: Stack, daemon: str) -> Path:
    """The log of a stack daemon (milter, policyd, storage)."""
    return Path(stack.env["POSTKEEP_STACK_DIR"]) / daemon / f"{daemon}.log"


class LogWatch:
    """What a log file gained since the watch began."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = path.stat().st_size if path.exists() else 0

    def text(self) -> str:
        with self.path.open("rb") as f:
            f.seek(self.offset)
            return f.read().decode("utf-8", "replace")

    def wait_for(self, pattern: str, timeout: float = 30) -> re.Match[str]:
        """The first new line matching PATTERN (a regex), waiting for it."""
        deadline = time.monotonic() + timeout
        while True:
            m = re.search(pattern, self.text())
            if m:
                return m
            assert time.monotonic() < deadline, (
                f"no line matching {pattern!r} in {self.path} after {timeout:.0f}s;"
                f" new lines:\n{self.text()[-3000:]}")
            time.sleep(0.2)


def metric(url: str, sample: str) -> float:
    """The value of one sample (name and labels, exactly) on a /metrics page; 0 if absent."""
    with urllib.request.urlopen(url, timeout=10) as resp:
        text = resp.read().decode()
    m = re.search(r"^" + re.escape(sample) + r" (\S+)$", text, re.MULTILINE)
    return float(m.group(1)) if m else 0.0
