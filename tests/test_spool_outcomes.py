"""Outcomes of mail accepted through the outage spool are not lost.

With MinIO down, the milter accepts mail by spooling it; Postfix relays it
at once, and its success notice reaches postkeep-storage before the drain
has written the message's rows.  Recorded then, the notice would find no
message, be kept as unmatched, and its retry later would be a duplicate:
the recipient would stay `queued` forever although delivered.  The sidecar
answers such a notice 451 while the message is still in the spool, and
Postfix brings it back once the drain has written the rows.
"""

from __future__ import annotations

import re
import subprocess
import time
import urllib.request
import uuid
from pathlib import Path

import pytest
from support import smtp
from support.stack import Stack

pytestmark = pytest.mark.outage


def _spool_waits(stack: Stack) -> float:
    with urllib.request.urlopen(stack.env["POSTKEEP_STORAGE_METRICS"], timeout=5) as resp:
        text = resp.read().decode()
    m = re.search(r"^postkeep_storage_reports_spool_wait_total (\S+)$", text, re.MULTILINE)
    assert m, "postkeep_storage_reports_spool_wait_total missing from /metrics"
    return float(m.group(1))


def _until(what: str, check: object, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.3)


def test_a_notice_for_spooled_mail_is_applied_once_the_drain_wrote_its_rows(
        stack: Stack) -> None:
    _, domain = stack.new_org("basic", dkim=False, missing_key="unsigned")
    token = uuid.uuid4().hex[:12]
    rcpt = f"spooled-{token}@sink.test"
    message = (f"From: app@{domain}\r\nTo: {rcpt}\r\nSubject: spooled {token}\r\n"
               f"X-Test-Token: {token}\r\n\r\nbody\r\n").encode()
    waits_before = _spool_waits(stack)
    flush = ["postqueue", "-c", stack.env["POSTKEEP_POSTFIX_CONFIG_DIR"], "-f"]
    stack.stack_ctl("stop", "minio")
    try:
        reply = smtp.send(*stack.smtp, f"app@{domain}", [rcpt], message)
        assert reply.code == 250
        delivered = stack.sink_copy(token)
        m = re.search(rb"^X-Postkeep-Id: ([0-9a-f-]{36})\r$", delivered, re.MULTILINE)
        assert m, "the relayed copy has no X-Postkeep-Id"
        mid = uuid.UUID(m.group(1).decode())
        entry = Path(stack.config.milter.outage_spool_directory) / f"{mid}.spool"
        assert entry.exists(), "the message was not spooled"
        # Postfix's success notice came back while the message is still spooled.
        # (Flushed while we wait: after a test that stopped postkeep-storage,
        # Postfix keeps its LMTP destination marked dead for a while and
        # defers the notice; a flush makes it try again now.)
        def answered_451() -> bool:
            subprocess.run(flush, check=True, timeout=30)
            return _spool_waits(stack) > waits_before

        _until("the notice to be answered 451", answered_451, timeout=90)
        with stack.connect() as conn:
            assert conn.execute("SELECT count(*) FROM messages WHERE id = %s",
                                (mid,)).fetchone() == (0,)
    finally:
        stack.stack_ctl("start", "minio")

    def rows_written() -> bool:
        with stack.connect() as conn:
            return conn.execute("SELECT count(*) FROM messages WHERE id = %s",
                                (mid,)).fetchone() == (1,)

    _until("the drain to write the message's rows", rows_written)

    def relayed() -> bool:
        subprocess.run(flush, check=True, timeout=30)
        with stack.connect() as conn:
            row = conn.execute("SELECT status FROM message_recipients WHERE message_id = %s"
                               " AND recipient = %s", (mid, rcpt)).fetchone()
        return row == ("relayed",)

    _until("the recipient's status to be relayed", relayed, timeout=90)
    with stack.connect() as conn:
        kept = conn.execute("SELECT count(*) FROM unmatched_reports WHERE envelope_to LIKE %s",
                            (f"%{mid.hex}%",)).fetchone()
    assert kept == (0,), "the notice was also kept as unmatched"
