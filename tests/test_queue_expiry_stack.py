"""Queue hygiene: held mail older than the limit is removed, never silently.

Postfix returns undeliverable mail after maximal_queue_lifetime but never
expires its hold queue.  `postkeep postfix expire-queue` removes held queue
files older than --max-age and records each recipient as 'expired' with the
reason.  Through the stack's real Postfix and PostgreSQL: a message to mx.test
(no MX listening unless a test starts one: it is deferred) is put on hold with
postsuper -h, its queue file aged, and the command run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from support import smtp
from support.stack import Stack
from support.wait import until

pytestmark = pytest.mark.stack


def _postkeep(stack: Stack, *args: str) -> subprocess.CompletedProcess[str]:
    exe = Path(sys.executable).with_name("postkeep")
    return subprocess.run([str(exe), "--config", stack.env["POSTKEEP_CONFIG"], *args],
                          capture_output=True, text=True, check=False)


def _pfdir(stack: Stack) -> str:
    return stack.env["POSTKEEP_POSTFIX_CONFIG_DIR"]


def _queue(stack: Stack) -> dict[str, dict[str, Any]]:
    out = subprocess.run(["postqueue", "-c", _pfdir(stack), "-j"], capture_output=True,
                         text=True, check=True).stdout
    return {m["queue_id"]: m for m in map(json.loads, out.splitlines())}


def _held(stack: Stack, domain: str) -> tuple[str, str]:
    """A message from DOMAIN to a deferred recipient, on hold: (queue id, recipient)."""
    rcpt = f"held-{uuid.uuid4().hex[:10]}@mx.test"
    msg = f"From: app@{domain}\r\nTo: {rcpt}\r\nSubject: held\r\n\r\nheld\r\n".encode()
    reply = smtp.send(*stack.smtp, f"app@{domain}", [rcpt], msg)
    assert reply.queue_id, reply

    def on_hold() -> bool:
        # postsuper -h on a message in the active queue takes effect once it
        # leaves it: ask again until it shows up in hold.
        subprocess.run(["postsuper", "-c", _pfdir(stack), "-h", reply.queue_id or ""],
                       capture_output=True, check=False)
        return _queue(stack).get(reply.queue_id or "", {}).get("queue_name") == "hold"

    until(on_hold, f"{reply.queue_id} on hold", timeout=60, interval=0.5)
    return reply.queue_id, rcpt


def _age(stack: Stack, queue_id: str, seconds: int) -> None:
    spool = subprocess.run(["postconf", "-c", _pfdir(stack), "-xh", "queue_directory"],
                           capture_output=True, text=True, check=True).stdout.strip()
    path = Path(spool, "hold", queue_id)
    then = time.time() - seconds
    os.utime(path, (then, then))


def _recipient(stack: Stack, queue_id: str, rcpt: str) -> tuple[str, str | None]:
    with stack.connect() as conn:
        row = conn.execute(
            "SELECT r.status, r.diagnostic FROM message_recipients r"
            " JOIN messages m ON m.id = r.message_id WHERE m.queue_id = %s AND r.recipient = %s",
            (queue_id, rcpt)).fetchone()
    assert row is not None, f"no recipient row for {queue_id} {rcpt}"
    return str(row[0]), row[1]


def test_held_mail_older_than_the_limit_is_removed_and_expired(stack: Stack) -> None:
    _, domain = stack.new_org("basic")
    old_id, old_rcpt = _held(stack, domain)
    young_id, young_rcpt = _held(stack, domain)
    _age(stack, old_id, 2 * 3600)
    try:
        dry = _postkeep(stack, "postfix", "expire-queue", "--max-age", "1h", "--dry-run",
                        "--json")
        assert dry.returncode == 0, dry.stdout + dry.stderr
        assert [m["queue_id"] for m in json.loads(dry.stdout)["messages"]] == [old_id]
        assert old_id in _queue(stack)
        assert _recipient(stack, old_id, old_rcpt)[0] != "expired"

        done = _postkeep(stack, "postfix", "expire-queue", "--max-age", "1h", "--yes", "--json")
        assert done.returncode == 0, done.stdout + done.stderr
        report = json.loads(done.stdout)
        assert report["removed"] == 1
        assert report["messages"][0]["recipients"] == [old_rcpt]
        assert report["messages"][0]["expired_recipients"] == 1
        queue = _queue(stack)
        assert old_id not in queue
        assert queue[young_id]["queue_name"] == "hold"  # younger than the limit: kept
        status, diagnostic = _recipient(stack, old_id, old_rcpt)
        assert status == "expired"
        assert diagnostic == (f"removed from Postfix's hold queue by postkeep after 1h"
                              f" (queue id {old_id})")
        assert _recipient(stack, young_id, young_rcpt)[0] != "expired"
    finally:
        for queue_id in (old_id, young_id):
            subprocess.run(["postsuper", "-c", _pfdir(stack), "-d", queue_id],
                           capture_output=True, check=False)
