"""Delivery outcomes through the real stack: Postfix delivers to a fake remote
MX that answers per recipient, its DSNs come back to postkeep-storage over
LMTP, and PostgreSQL ends up with each recipient's true status, DSN code and
the remote server's own reply.

Postfix's retry and lifetime settings are shortened for this module (and put
back afterwards) so that deferred -> expired happens in seconds.
"""

from __future__ import annotations

import hashlib
import json
import re
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path
from typing import Any

import pytest
from support import smtp
from support.reports import remote_dsn
from support.smtp_server import smtp_server
from support.stack import Stack
from support.wait import until

from postkeep.envelope import return_path
from postkeep.storage.metadata.db import BackendError

# Markers per test: two tests stop postkeep-storage or PostgreSQL (outage), the
# rest only use the stack.

# Postfix settings for this module: retry every few seconds, give up after 25.
FAST_QUEUE = {
    "maximal_queue_lifetime": "25s",
    "bounce_queue_lifetime": "25s",
    "minimal_backoff_time": "2s",
    "maximal_backoff_time": "4s",
    "queue_run_delay": "2s",
}


@dataclass
class FakeMX:
    """A remote MX on loopback that answers by the recipient's local part.

    ok-*: 250; retry-*: 451 on the first attempt, then 250; unknown-*: 550
    5.1.1; full-*: 552 5.2.2; defer-*: always 451; later-*: 250, then an
    asynchronous (Exim-style, non-DSN) bounce to the return path.
    """

    postfix: tuple[str, int]
    attempts: dict[str, int] = field(default_factory=dict)
    accepted: list[tuple[str, list[str]]] = field(default_factory=list)
    queue_ids: int = 0

    async def handle_RCPT(self, server: Any, session: Any, envelope: Any, address: str,
                          options: list[str]) -> str:
        local = address.split("@")[0].lower()
        n = self.attempts[address] = self.attempts.get(address, 0) + 1
        if local.startswith("unknown-"):
            return f"550 5.1.1 <{address}>: user unknown here"
        if local.startswith("full-"):
            return f"552 5.2.2 <{address}>: mailbox full"
        if local.startswith("defer-") or (local.startswith("retry-") and n == 1):
            return f"451 4.3.0 <{address}>: greylisted, try again (attempt {n})"
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 Ok"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.queue_ids += 1
        qid = f"FAKE{self.queue_ids:04d}"
        self.accepted.append((envelope.mail_from, list(envelope.rcpt_tos)))
        late = [r for r in envelope.rcpt_tos if r.split("@")[0].lower().startswith("later-")]
        if late:
            threading.Thread(target=self._bounce_later,
                             args=(envelope.mail_from, late, envelope.original_content),
                             daemon=True).start()
        return f"250 2.0.0 Ok: queued as {qid}"

    def _bounce_later(self, return_path: str, rcpts: list[str], original: bytes) -> None:
        # Sent at once but dated 5 s on, as a bounce that comes later is: it is
        # the later event whichever of it and Postfix's relayed notice arrives
        # first (no sleep to make it arrive second).
        dated = time.gmtime(time.time() + 5)
        failed = "".join(f"  {r}\r\n    mailbox unavailable\r\n" for r in rcpts)
        body = (
            "From: Mail Delivery System <Mailer-Daemon@mx.test>\r\n"
            f"To: {return_path}\r\n"
            "Subject: Mail delivery failed: returning message to sender\r\n"
            f"Date: {time.strftime('%a, %d %b %Y %H:%M:%S +0000', dated)}\r\n"
            f"Message-ID: <{uuid.uuid4().hex}@mx.test>\r\n\r\n"
            "This message was created automatically by mail delivery software.\r\n\r\n"
            "A message that you sent could not be delivered to one or more of its\r\n"
            "recipients. This is a permanent error. The following address(es) failed:\r\n\r\n"
            f"{failed}\r\n"
            "------ This is a copy of the message, including all the headers. ------\r\n\r\n"
        ).encode() + original
        smtp.send(*self.postfix, "", [return_path], body)


@pytest.fixture(scope="module")
def fast_queue(stack: Stack) -> Iterator[None]:
    pfdir = stack.env["POSTKEEP_POSTFIX_CONFIG_DIR"]
    names = list(FAST_QUEUE)
    before = subprocess.run(["postconf", "-c", pfdir, "-h", *names], check=True,
                            capture_output=True, text=True).stdout.split("\n")
    subprocess.run(["postconf", "-c", pfdir, "-e",
                    *(f"{k} = {v}" for k, v in FAST_QUEUE.items())], check=True)
    subprocess.run(["postfix", "-c", pfdir, "reload"], check=True, capture_output=True)
    try:
        yield
    finally:
        subprocess.run(["postconf", "-c", pfdir, "-e",
                        *(f"{k} = {v}" for k, v in zip(names, before, strict=False))],
                       check=True)
        subprocess.run(["postfix", "-c", pfdir, "reload"], check=True, capture_output=True)


@pytest.fixture(scope="module")
def fake_mx(stack: Stack, fast_queue: None) -> Iterator[FakeMX]:
    mx = FakeMX(stack.smtp)
    with smtp_server(mx, int(stack.env["POSTKEEP_FAKE_MX_PORT"]), "mx.test", "fake-mx"):
        yield mx


def _unverp(sender: str) -> str:
    """A return path without the recipient Postfix's VERP wrote into it."""
    return re.sub(r"\+[^@]*=[^@=]*(?=@)", "", sender)


def _message(domain: str, token: str) -> bytes:
    return (f"From: app@{domain}\r\nTo: customers@{domain}\r\nSubject: outcomes {token}\r\n"
            f"Message-ID: <{token}@{domain}>\r\nX-Test-Token: {token}\r\n\r\n"
            "Hello, this is a tracked message.\r\n").encode()


def _message_id(stack: Stack, queue_id: str) -> uuid.UUID:
    with stack.connect() as conn:
        row = conn.execute("SELECT id FROM messages WHERE queue_id = %s", (queue_id,)).fetchone()
    assert row, f"no messages row for queue id {queue_id}"
    return uuid.UUID(str(row[0]))


def _recipients(stack: Stack, mid: uuid.UUID) -> dict[str, dict[str, Any]]:
    with stack.connect() as conn:
        cur = conn.execute(
            "SELECT recipient, status, dsn_status, remote_mta, diagnostic, notify"
            " FROM message_recipients WHERE message_id = %s", (mid,))
        cols = [c.name for c in cur.description or []]
        return {r[0]: dict(zip(cols, r, strict=True)) for r in cur.fetchall()}


def _history(stack: Stack, mid: uuid.UUID, rcpt: str) -> list[tuple[str, str | None, bool]]:
    with stack.connect() as conn:
        return [(str(s), d, bool(a)) for s, d, a in conn.execute(
            "SELECT status, dsn_status, applied FROM recipient_events"
            " WHERE message_id = %s AND recipient = %s ORDER BY event_at, recorded_at",
            (mid, rcpt)).fetchall()]


def _wait_for(stack: Stack, mid: uuid.UUID, want: dict[str, str],
              timeout: float) -> dict[str, dict[str, Any]]:
    deadline = time.monotonic() + timeout
    while True:
        rows = _recipients(stack, mid)
        if {r: rows.get(r, {}).get("status") for r in want} == want:
            return rows
        if time.monotonic() > deadline:
            got = {r: rows.get(r, {}).get("status") for r in want}
            raise AssertionError(f"statuses after {timeout:.0f}s: {got}, want {want}")
        time.sleep(0.5)


@pytest.mark.stack
def test_every_recipient_ends_with_its_true_outcome(stack: Stack, fake_mx: FakeMX) -> None:
    _, domain = stack.new_org("pro")
    token = uuid.uuid4().hex[:10]
    rcpts = {
        "ok": f"ok-{token}@mx.test", "retry": f"retry-{token}@mx.test",
        "unknown": f"unknown-{token}@mx.test", "full": f"full-{token}@mx.test",
        "defer": f"defer-{token}@mx.test", "later": f"later-{token}@mx.test",
        "sink": f"s-{token}@sink.test",
    }
    reply = smtp.send(*stack.smtp, f"app@{domain}", list(rcpts.values()),
                      _message(domain, token))
    assert reply.queue_id
    mid = _message_id(stack, reply.queue_id)

    final = {
        rcpts["ok"]: "relayed", rcpts["retry"]: "relayed", rcpts["unknown"]: "bounced",
        rcpts["full"]: "bounced", rcpts["defer"]: "expired", rcpts["later"]: "bounced",
        rcpts["sink"]: "relayed",
    }
    rows = _wait_for(stack, mid, final, timeout=90)

    ok = rows[rcpts["ok"]]
    assert ok["dsn_status"] == "2.0.0" and ok["remote_mta"] == "127.0.0.1"
    assert re.fullmatch(r"250 2\.0\.0 Ok: queued as FAKE\d{4}", ok["diagnostic"])
    unknown = rows[rcpts["unknown"]]
    assert unknown["dsn_status"] == "5.1.1"
    assert unknown["diagnostic"] == f"550 5.1.1 <{rcpts['unknown']}>: user unknown here"
    full = rows[rcpts["full"]]
    assert full["dsn_status"] == "5.2.2"
    assert full["diagnostic"] == f"552 5.2.2 <{rcpts['full']}>: mailbox full"
    defer = rows[rcpts["defer"]]
    assert defer["dsn_status"] is not None and defer["dsn_status"].startswith("4.")
    assert "451 4.3.0" in defer["diagnostic"] and "greylisted" in defer["diagnostic"]
    later = rows[rcpts["later"]]
    assert later["diagnostic"].startswith("asynchronous bounce")

    # The histories: retry was deferred first, defer was deferred then
    # expired, later was relayed then bounced by the remote server.
    retry = _history(stack, mid, rcpts["retry"])
    assert retry[0][:2] == ("deferred", "4.3.0") and retry[-1][0] == "relayed"
    assert [s for s, _, _ in _history(stack, mid, rcpts["defer"])][-1] == "expired"
    assert "deferred" in [s for s, _, _ in _history(stack, mid, rcpts["defer"])]
    assert [s for s, _, _ in _history(stack, mid, rcpts["later"])] == ["relayed", "bounced"]
    assert fake_mx.attempts[rcpts["retry"]] >= 2
    # Each applied status change wrote its event (issue 18: relayed, deferred,
    # expired, bounced through the real path), the last one the final status.
    with stack.connect() as conn:
        evs = conn.execute("SELECT recipient, event_type FROM event_outbox"
                           " WHERE message_id = %s AND event_type <> 'suppressed'"
                           " AND recipient IS NOT NULL ORDER BY id",
                           (mid,)).fetchall()
    for rcpt, status in final.items():
        mine = [t for r, t in evs if r == rcpt]
        applied = [s for s, _, a in _history(stack, mid, rcpt) if a]
        assert sorted(mine) == sorted(applied) and mine[-1] == status, (rcpt, mine, applied)
    assert {t for _, t in evs} >= {"relayed", "deferred", "expired", "bounced"}, evs

    with stack.connect() as conn:
        row = conn.execute("SELECT status, return_path FROM messages WHERE id = %s",
                           (mid,)).fetchone()
    assert row is not None
    assert row[0] == "partial"
    assert row[1].startswith(f"pk-{mid.hex}-") and row[1].endswith("@bounces.postkeep.test")
    # The remote server saw the rewritten return path, not the client's sender
    # (in its per-recipient VERP form: pk-...+<local>=<domain>@...).
    assert any(_unverp(frm) == row[1] for frm, _ in fake_mx.accepted)


@pytest.mark.stack
def test_capture_stays_byte_exact_with_the_envelope_rewrite(stack: Stack,
                                                            fake_mx: FakeMX) -> None:
    from support.stack import strip_received


    _, domain = stack.new_org("basic")
    token = uuid.uuid4().hex[:10]
    reply = smtp.send(*stack.smtp, f"app@{domain}", [f"r-{token}@sink.test"],
                      _message(domain, token))
    assert reply.queue_id
    delivered = stack.sink_copy(token)
    mid = _message_id(stack, reply.queue_id)
    with stack.connect() as conn:
        key = conn.execute("SELECT object_key FROM messages WHERE id = %s", (mid,)).fetchone()
    assert key is not None
    assert stack.restored(str(key[0])) == strip_received(delivered)
    meta = json.loads(_sink_json(stack, token).read_text())
    assert meta["mail_from"].startswith(f"pk-{mid.hex}-")


def _unzstd(data: bytes) -> bytes:
    from postkeep.storage.content.restore import decompress_stream

    return b"".join(decompress_stream([data]))


def _sink_json(stack: Stack, token: str) -> Path:
    for eml in sorted(stack.sink_dir.glob("*.eml")):
        if f"X-Test-Token: {token}\r\n".encode() in eml.read_bytes():
            return eml.with_suffix(".json")
    raise AssertionError(f"no sink copy for {token}")


@pytest.mark.stack
def test_clients_notify_is_kept_and_untracked_mail_sends_no_success_notice(
        stack: Stack, fake_mx: FakeMX) -> None:
    _, domain = stack.new_org("basic")
    token = uuid.uuid4().hex[:10]
    never, failure, none = (f"{k}-{token}@sink.test" for k in ("never", "failure", "none"))
    reply = smtp.send(*stack.smtp, f"app@{domain}", [never, failure, none],
                      _message(domain, token),
                      rcpt_params={never: "NOTIFY=NEVER", failure: "NOTIFY=FAILURE"})
    assert reply.queue_id
    mid = _message_id(stack, reply.queue_id)
    rows = _wait_for(stack, mid, {never: "relayed", failure: "relayed", none: "relayed"}, 30)
    assert (rows[never]["notify"], rows[failure]["notify"], rows[none]["notify"]) == (
        "NEVER", "FAILURE", None)

    # System mail is not tracked: its recipients get the client's own NOTIFY
    # back, so the system sender gets no success notice.
    sys_token = uuid.uuid4().hex[:10]
    client = smtp.Client(*stack.smtp)
    try:
        client.xclient("192.0.2.10")
        sys_reply = client.send("noreply@system.postkeep.test", [f"u-{sys_token}@sink.test"],
                                _message("system.postkeep.test", sys_token))
    finally:
        client.close()
    stack.sink_copy(sys_token)
    log = Path(stack.env["POSTKEEP_POSTFIX_LOG"])
    tracked_notice = f"{reply.queue_id}: sender delivery status notification"
    system_notice = f"{sys_reply.queue_id}: sender delivery status notification"
    # Postfix logs a message's notices before it removes the message: once
    # both are removed, every notice either will ever get is in the log.
    def removed(queue_id: str | None) -> bool:
        return f"{queue_id}: removed" in log.read_text(errors="replace")

    for queue_id in (reply.queue_id, sys_reply.queue_id):
        until(partial(removed, queue_id), f"Postfix to finish {queue_id}", 60, interval=0.2)
    text = log.read_text(errors="replace")
    assert tracked_notice in text  # the control
    assert system_notice not in text


@pytest.mark.stack
def test_failure_notices_are_forwarded_when_the_org_asks(stack: Stack, fake_mx: FakeMX) -> None:
    org, domain = stack.new_org("basic")
    with stack.connect() as conn:
        conn.execute("UPDATE organisations SET forward_failures = true WHERE id = %s", (org,))
    token = uuid.uuid4().hex[:10]
    sender = f"ops-{token}@{domain}"
    reply = smtp.send(*stack.smtp, sender, [f"unknown-{token}@mx.test"],
                      _message(domain, token))
    assert reply.queue_id
    mid = _message_id(stack, reply.queue_id)
    _wait_for(stack, mid, {f"unknown-{token}@mx.test": "bounced"}, 30)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        for meta_path in stack.sink_dir.glob("*.json"):
            meta = json.loads(meta_path.read_text())
            if meta.get("rcpt_tos") == [sender]:
                body = meta_path.with_suffix(".eml").read_bytes()
                assert meta["mail_from"] == "<>"
                assert f"unknown-{token}@mx.test".encode() in body
                assert b"delivery-status" in body
                return
        time.sleep(0.5)
    raise AssertionError(f"no forwarded failure notice reached {sender}")


# --------------------------------------------------------------- the LMTP port


def _lmtp(stack: Stack) -> smtp.Client:
    return smtp.Client("127.0.0.1", int(stack.env["POSTKEEP_STORAGE_LMTP_PORT"]),
                       greeting="LHLO")




def _relayed_message(stack: Stack, prefix: str, domain: str = "",
                     rcpt_domain: str = "sink.test") -> tuple[uuid.UUID, str, str]:
    """A message (from DOMAIN, or a new organisation's) to one recipient, once
    relayed: (id, recipient, return path)."""
    domain = domain or stack.new_org("basic")[1]
    token = uuid.uuid4().hex[:10]
    rcpt = f"{prefix}-{token}@{rcpt_domain}"
    reply = smtp.send(*stack.smtp, f"app@{domain}", [rcpt], _message(domain, token))
    assert reply.queue_id
    mid = _message_id(stack, reply.queue_id)
    _wait_for(stack, mid, {rcpt: "relayed"}, 30)
    with stack.connect() as conn:
        row = conn.execute("SELECT return_path FROM messages WHERE id = %s", (mid,)).fetchone()
    assert row is not None
    return mid, rcpt, str(row[0])


@pytest.mark.stack
def test_duplicates_unknown_messages_and_garbage_on_the_lmtp_port(stack: Stack) -> None:
    mid, rcpt, path = _relayed_message(stack, "d")

    bounce = remote_dsn(mid, rcpt, "failed", "5.7.1", "550 5.7.1 rejected after all")
    client = _lmtp(stack)
    try:
        # Garbage first: the daemon answers and carries on.
        client.sock.sendall(b"\x00\xff\xfe\r\n")
        assert client._read().code >= 500
        client.sock.sendall(b"X" * 10000 + b"\r\n")
        assert client._read().code >= 500
        client.command("RCPT TO:<nobody@x>", 503)
        # A real report, twice: recorded, then a duplicate that changes nothing.
        first = client.send("", [path], bounce)
        second = client.send("", [path], bounce)
        # A report for a message that does not exist, to two return paths:
        # kept as unmatched, one reply per recipient (LMTP).
        ghost = uuid.uuid4()
        ghost_path = return_path(ghost, datetime.now(UTC) + timedelta(days=30), "b.test",
                                 stack.config.return_path.key_bytes())
        client.command("MAIL FROM:<>", 250)
        client.command(f"RCPT TO:<{ghost_path}>", 250)
        client.command(f"RCPT TO:<{ghost_path.replace('@b.test', '@c.test')}>", 250)
        client.command("DATA", 354)
        client.sock.sendall(smtp.dot_stuff(remote_dsn(ghost, "a@x", "relayed", "2.0.0", "250"))
                            + b".\r\n")
        unmatched = [client._read(), client._read()]
    finally:
        client.close()
    assert first.code == 250 and "recorded" in first.text
    assert second.code == 250 and "already recorded" in second.text
    assert [r.code for r in unmatched] == [250, 250]
    assert all("unmatched" in r.text for r in unmatched)

    rows = _recipients(stack, mid)
    assert rows[rcpt]["status"] == "bounced" and rows[rcpt]["dsn_status"] == "5.7.1"
    assert [s for s, _, _ in _history(stack, mid, rcpt)] == ["relayed", "bounced"]
    with stack.connect() as conn:
        kept = conn.execute(
            "SELECT u.reason, u.object_key FROM unmatched_reports u"
            " WHERE u.envelope_to LIKE %s", (f"%{ghost.hex}%",)).fetchone()
    assert kept is not None and "not found" in kept[0]
    assert b"Original-Envelope-Id: " + str(ghost).encode() in _unzstd(stack.stored(str(kept[1])))


@pytest.mark.stack
def test_oversize_report_is_refused_and_the_daemon_lives_on(stack: Stack) -> None:
    limit = stack.config.storage.max_report_bytes
    client = _lmtp(stack)
    try:
        client.command("MAIL FROM:<>", 250)
        path = return_path(uuid.uuid4(), datetime.now(UTC), "b.t",
                           stack.config.return_path.key_bytes())
        client.command(f"RCPT TO:<{path}>", 250)
        client.command("DATA", 354)
        line = b"x" * 998 + b"\r\n"
        for _ in range(limit // len(line) + 2):
            client.sock.sendall(line)
        client.sock.sendall(b".\r\n")
        assert client._read().code == 552
    finally:
        client.close()
    with socket.create_connection(("127.0.0.1",
                                   int(stack.env["POSTKEEP_STORAGE_LMTP_PORT"])), 5) as s:
        assert s.recv(100).startswith(b"220")


@pytest.mark.stack
def test_sendmail_mail_needs_dash_n_for_success_notices(stack: Stack, fake_mx: FakeMX) -> None:
    """Mail from sendmail(1) bypasses smtpd's command filter: with
    `-N success,delay,failure` its outcome is tracked like SMTP mail; without
    it Postfix's default (failure, delay) still reports bounces, never success."""
    _, domain = stack.new_org("basic")
    pfdir = stack.env["POSTKEEP_POSTFIX_CONFIG_DIR"]
    ids = {}
    for case, notify in (("full", ["-N", "success,delay,failure"]), ("bare", [])):
        token = uuid.uuid4().hex[:10]
        sender = f"{case}-{token}@{domain}"
        rcpts = [f"ok-{token}@mx.test", f"unknown-{token}@mx.test"]
        data = (f"From: {sender}\nTo: x@mx.test\nSubject: sendmail {case}\n"
                f"X-Test-Token: {token}\n\nbody\n").encode()
        subprocess.run(["/usr/sbin/sendmail", "-C", pfdir, "-f", sender, *notify, "-i", *rcpts],
                       input=data, check=True, timeout=30)
        deadline = time.monotonic() + 30
        while True:
            with stack.connect() as conn:
                row = conn.execute("SELECT id FROM messages WHERE envelope_from = %s",
                                   (sender,)).fetchone()
            if row or time.monotonic() > deadline:
                break
            time.sleep(0.3)
        assert row, f"sendmail message from {sender} was not captured"
        ids[case] = (uuid.UUID(str(row[0])), rcpts)
    full_id, (ok, unknown) = ids["full"]
    rows = _wait_for(stack, full_id, {ok: "relayed", unknown: "bounced"}, 30)
    # The milter is not shown a sendmail recipient's NOTIFY: not recorded.
    assert rows[ok]["notify"] is None
    bare_id, (ok, unknown) = ids["bare"]
    rows = _wait_for(stack, bare_id, {unknown: "bounced"}, 30)
    assert rows[ok]["status"] == "queued" and rows[ok]["notify"] is None


@pytest.mark.stack
def test_storage_metrics_count_reports_statuses_and_lag(stack: Stack, fake_mx: FakeMX) -> None:
    import urllib.request

    def scrape() -> str:
        with urllib.request.urlopen(stack.env["POSTKEEP_STORAGE_METRICS"], timeout=5) as resp:
            return str(resp.read().decode())

    def value(text: str, sample: str, missing: float | None = None) -> float:
        m = re.search(r"^" + re.escape(sample) + r" (\S+)$", text, re.MULTILINE)
        if m is None and missing is not None:
            return missing  # a labelled sample not yet raised since the sidecar started
        assert m, f"{sample} missing from /metrics"
        return float(m.group(1))

    # Cumulative since the sidecar started, and earlier tests raised them: what
    # counts is what this test's one report adds, read before and after.
    raised = ('postkeep_storage_reports_total{kind="dsn"}',
              'postkeep_storage_statuses_total{status="relayed"}',
              "postkeep_storage_outcome_lag_seconds_count",
              "postkeep_storage_batch_reports_count")
    first = scrape()
    before = {s: value(first, s, missing=0.0) for s in raised}
    _, domain = stack.new_org("basic")
    token = uuid.uuid4().hex[:10]
    reply = smtp.send(*stack.smtp, f"app@{domain}", [f"ok-{token}@mx.test"],
                      _message(domain, token))
    _wait_for(stack, _message_id(stack, reply.queue_id or ""), {f"ok-{token}@mx.test":
                                                                 "relayed"}, 30)
    # The counters move just after the row is committed: poll, with a deadline.
    deadline = time.monotonic() + 10
    while True:
        text = scrape()
        short = [s for s in raised if value(text, s, missing=0.0) < before[s] + 1]
        if not short or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert not short, {s: (before[s], value(text, s, missing=0.0)) for s in short}
    assert "postkeep_storage_unmatched_reports_total" in text
    # The sidecar's upkeep jobs run at its start and succeed: only the sidecar
    # raises these, so this fails if they never run or always fail.  An
    # earlier test may have restarted the sidecar a moment ago, and a job's
    # first run (dictionaries over every organisation) takes a while: poll.
    jobs = [f'postkeep_storage_upkeep_runs_total{{job="{job}",result="ok"}}'
            for job in ("report-partitions", "dictionaries", "orphans")]
    until(lambda: all(value(scrape(), j, missing=0.0) >= 1 for j in jobs),
          f"the sidecar's upkeep jobs to succeed once: {jobs}", 120)


def _flush(stack: Stack) -> None:
    subprocess.run(["postqueue", "-c", stack.env["POSTKEEP_POSTFIX_CONFIG_DIR"], "-f"],
                   check=True, timeout=30)


@pytest.mark.outage
def test_reports_wait_in_postfix_while_the_sidecar_is_down(stack: Stack,
                                                            fake_mx: FakeMX) -> None:
    """postkeep-storage stopped for real: Postfix keeps the notices queued and
    delivers them once it is back; nothing is lost."""
    _, domain = stack.new_org("basic")
    token = uuid.uuid4().hex[:10]
    ok, gone = f"ok-{token}@mx.test", f"unknown-{token}@mx.test"
    stack.stack_ctl("stop", "storage")
    try:
        reply = smtp.send(*stack.smtp, f"app@{domain}", [ok, gone], _message(domain, token))
        assert reply.queue_id
        mid = _message_id(stack, reply.queue_id)
        log = Path(stack.env["POSTKEEP_POSTFIX_LOG"])
        deadline = time.monotonic() + 30
        while "pk-" + mid.hex not in "".join(
                line for line in log.read_text(errors="replace").splitlines()
                if "status=deferred" in line):
            assert time.monotonic() < deadline, "no deferred LMTP delivery of the notice"
            time.sleep(0.5)
        assert {r["status"] for r in _recipients(stack, mid).values()} == {"queued"}
    finally:
        stack.stack_ctl("start", "storage")
    _flush(stack)
    _wait_for(stack, mid, {ok: "relayed", gone: "bounced"}, 30)


@pytest.mark.outage
def test_sidecar_tempfails_while_postgres_is_down(stack: Stack) -> None:
    """PostgreSQL stopped for real: the report gets 451 4.3.0 naming postgres
    (Postfix would retry); once it is back the same report is recorded."""
    mid, rcpt, path = _relayed_message(stack, "pg")
    report = remote_dsn(mid, rcpt, "failed", "5.2.1", "550 5.2.1 mailbox disabled later")
    stack.stack_ctl("stop", "postgres")
    try:
        client = _lmtp(stack)
        try:
            with pytest.raises(smtp.SMTPError) as err:
                client.send("", [path], report)
        finally:
            client.close()
        assert err.value.reply.code == 451
        assert "4.3.0" in err.value.reply.text and "postgres" in err.value.reply.text
    finally:
        stack.stack_ctl("start", "postgres")
    deadline = time.monotonic() + 30
    while True:
        client = _lmtp(stack)
        try:
            again = client.send("", [path], report)
            break
        except smtp.SMTPError as exc:
            assert exc.reply.code == 451 and time.monotonic() < deadline, exc.reply
            time.sleep(1)
        finally:
            client.close()
    assert again.code == 250 and "recorded" in again.text
    assert _recipients(stack, mid)[rcpt]["status"] == "bounced"


@pytest.mark.stack
def test_a_sending_domain_can_have_its_own_bounce_domain(stack: Stack, fake_mx: FakeMX) -> None:
    _, domain = stack.new_org("basic")
    bounce = f"bounces.{domain}"
    done = subprocess.run(
        [str(Path(stack.env["POSTKEEP_STACK_VENV"]) / "bin" / "postkeep"), "--config",
         stack.env["POSTKEEP_CONFIG"], "domain", "set-bounce", domain, bounce],
        capture_output=True, text=True, cwd="/", timeout=30)
    assert done.returncode == 0, done.stderr
    _, _, path = _relayed_message(stack, "ok", domain=domain, rcpt_domain="mx.test")
    assert path.endswith(f"@{bounce}")
    assert any(_unverp(frm) == path for frm, _ in fake_mx.accepted)


# --------------------------------------------------------------- forged reports


def _unmatched_reason(stack: Stack, report: bytes) -> str | None:
    with stack.connect() as conn:
        row = conn.execute("SELECT reason FROM unmatched_reports WHERE sha256 = %s",
                           (hashlib.sha256(report).digest(),)).fetchone()
    return None if row is None else str(row[0])


@pytest.mark.stack
def test_forged_reports_over_lmtp_change_nothing(stack: Stack, fake_mx: FakeMX) -> None:
    """An attacker who knows a message's id (it is in X-Postkeep-Id) reports its
    recipient bounced: to the id's return path without a MAC, at any domain, with
    a guessed MAC, or naming it only in Original-Envelope-Id."""
    mid, rcpt, path = _relayed_message(stack, "forged")
    local, _, domain = path.partition("@")
    expiry = local.split("-")[2]
    attempts = {
        f"pk-{mid.hex}@attacker.example": "carries no MAC",
        f"pk-{mid.hex}-{expiry}@{domain}": "carries no MAC",
        f"pk-{mid.hex}-{expiry}-{'0' * 16}@{domain}": "does not verify",
        f"{local}@bounces.attacker.example": "does not verify",
        f"postmaster@{domain}": f"names message {mid} (Original-Envelope-Id",
    }
    client = _lmtp(stack)
    try:
        for to, why in attempts.items():
            forged = remote_dsn(mid, rcpt, "failed", "5.1.1", f"550 5.1.1 forged via {to}")
            reply = client.send("", [to], forged)
            assert reply.code == 250 and "kept as unmatched" in reply.text, (to, reply)
            reason = _unmatched_reason(stack, forged)
            assert reason is not None and why in reason, (to, reason)
    finally:
        client.close()
    rows = _recipients(stack, mid)
    assert rows[rcpt]["status"] == "relayed"
    assert [s for s, _, _ in _history(stack, mid, rcpt)] == ["relayed"]


@pytest.mark.stack
def test_a_forged_bounce_through_postfix_is_neither_recorded_nor_forwarded(
        stack: Stack, fake_mx: FakeMX) -> None:
    """The same from an untrusted SMTP client, through Postfix to the bounce
    domain (as the README has it in relay_domains), for an organisation that
    has failure notices forwarded to the sender."""
    org, domain = stack.new_org("basic")
    with stack.connect() as conn:
        conn.execute("UPDATE organisations SET forward_failures = true WHERE id = %s", (org,))
    mid, rcpt, path = _relayed_message(stack, "viapostfix", domain)
    forged_to = f"pk-{mid.hex}@{path.partition('@')[2]}"
    marker = f"forged-{uuid.uuid4().hex[:8]}"
    forged = remote_dsn(mid, rcpt, "failed", "5.1.1", f"550 5.1.1 {marker}")
    client = smtp.Client(*stack.smtp)
    try:
        client.xclient("203.0.113.9")  # TEST-NET-3: an outside, untrusted client
        reply = client.send("", [forged_to], forged)
    finally:
        client.close()
    assert reply.queue_id
    deadline = time.monotonic() + 30
    while (reason := _unmatched_reason_like(stack, marker)) is None:
        assert time.monotonic() < deadline, "the forged report never reached postkeep-storage"
        time.sleep(0.3)
    assert "carries no MAC" in reason
    assert _recipients(stack, mid)[rcpt]["status"] == "relayed"
    # Nothing went on to the customer's sender (forwarded notices land in the
    # sink; a forward starts as soon as a failure is recorded, which it was not).
    _flush(stack)
    assert not any(marker.encode() in p.read_bytes() for p in stack.sink_dir.glob("*.eml"))


def _unmatched_reason_like(stack: Stack, marker: str) -> str | None:
    """The reason of the unmatched report whose kept bytes hold MARKER (its subject or
    text is all the row has: the marker is found through the stored object)."""
    with stack.connect() as conn:
        rows = conn.execute("SELECT reason, object_key FROM unmatched_reports"
                            " WHERE received_at > now() - interval '5 minutes'").fetchall()
    for reason, key in rows:
        try:
            kept = _unzstd(stack.stored(str(key)))
        except BackendError:  # another test's report, recorded before its bytes were kept
            continue
        if marker.encode() in kept:
            return str(reason)
    return None

