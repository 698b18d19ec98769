"""The system mail lane through the real stack (issue 17).

A customer's backlog of 2,000 messages sits in Postfix's queue for a
destination that has stopped answering (the fake MX holds every customer
delivery open); a password-reset message from a system domain to the same
destination still arrives, through the postkeep-system transport, from its
own source address and HELO name, while the backlog is queued.

The stack routes lane.test to the fake MX with a next hop only
(`lane.test :[127.0.0.1]:PORT` in its transport_maps), outside relay_domains:
the transport is the one the sender chose, smtp for customers and
postkeep-system for the system domains (postfix-conf/main.cf).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import subprocess
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.support import smtp, wait
from tests.support.stack import Stack

pytestmark = pytest.mark.stack

BACKLOG = 2000
# Still queued when the system message has arrived (of BACKLOG): the fake MX
# releases no customer delivery before the test ends, so only the handful in
# flight when it does (at most the smtp transport's concurrency) may be gone.
STILL_QUEUED = 1500
CUSTOMER = "bulk@customer.lane.test"
# The fake MX holds a customer delivery at most this long (a bound, not a
# pace: the test releases them all when it ends).
HOLD_SECONDS = 300.0


@dataclass
class SlowMX:
    """Answers a system sender's DATA at once and holds every other delivery
    open until released (a destination that has stopped answering)."""

    system_domains: frozenset[str]
    release: asyncio.Event = field(default_factory=asyncio.Event)
    # (sender, peer address, HELO name, message) per system message accepted
    system: list[tuple[str, str, str, bytes]] = field(default_factory=list)
    held: int = 0
    connections: int = 0  # open now

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        sender = envelope.mail_from or ""
        # the command filter gives every sender VERP: local+rcpt=domain@domain
        if sender.rpartition("@")[2].lower() in self.system_domains:
            self.system.append((sender, session.peer[0], session.host_name or "",
                                envelope.original_content))
            return "250 2.0.0 Ok: system"
        self.held += 1
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.release.wait(), HOLD_SECONDS)
        return "250 2.0.0 Ok: released"


@pytest.fixture()
def slow_mx(stack: Stack) -> Iterator[SlowMX]:
    from aiosmtpd.smtp import SMTP

    class Counted(SMTP):  # type: ignore[misc]
        def connection_made(self, transport: Any) -> None:
            mx.connections += 1
            super().connection_made(transport)

        def connection_lost(self, exc: Exception | None) -> None:
            mx.connections -= 1
            super().connection_lost(exc)

    mx = SlowMX(frozenset(d.lower() for d in stack.config.dkim.system_domains))
    loop = asyncio.new_event_loop()
    port = int(stack.env["POSTKEEP_FAKE_MX_PORT"])
    server = loop.run_until_complete(loop.create_server(
        lambda: Counted(mx, hostname="lane.test", ident="slow-mx"), "127.0.0.1", port))
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        yield mx
    finally:
        # The backlog is deleted first (backlog fixture); then the held
        # deliveries are answered and Postfix closes its connections itself.
        # A connection cut instead would mark [127.0.0.1]:PORT dead for the
        # smtp transport (minimal_backoff_time), and mx.test, which later
        # tests route to the same next hop, with it.
        loop.call_soon_threadsafe(mx.release.set)
        try:
            wait.until(lambda: mx.connections == 0, "Postfix closing its connections",
                       timeout=60, interval=0.2)
        finally:
            loop.call_soon_threadsafe(server.close)
            loop.call_soon_threadsafe(loop.stop)
            thread.join(10)


def _queued(pfdir: str, sender: str) -> list[str]:
    """Queue ids of the stack's queued messages from SENDER (postqueue -j)."""
    out = subprocess.run(["postqueue", "-c", pfdir, "-j"], capture_output=True, text=True,
                         check=True, timeout=120).stdout
    return [obj["queue_id"] for obj in map(json.loads, out.splitlines())
            if obj.get("sender") == sender]


def _delete(pfdir: str, queue_ids: list[str]) -> None:
    """postsuper -d of these queue ids only, on the stack's instance."""
    subprocess.run(["postsuper", "-c", pfdir, "-d", "-"], input="\n".join(queue_ids) + "\n",
                   capture_output=True, text=True, check=True, timeout=120)


def _inject(host: str, port: int, count: int) -> None:
    client = smtp.Client(host, port)
    try:
        for i in range(count):
            client.send(CUSTOMER, [f"r{i}@lane.test"],
                        f"From: {CUSTOMER}\r\nSubject: offer {i}\r\n\r\nbulk\r\n".encode())
    finally:
        client.close()


@pytest.fixture()
def backlog(stack: Stack, slow_mx: SlowMX) -> Iterator[str]:
    """BACKLOG customer messages queued for lane.test; deleted afterwards."""
    pfdir = stack.env["POSTKEEP_POSTFIX_CONFIG_DIR"]
    host, port = stack.smtp
    # The stack's second smtpd (PORTBASE+12: no milter, no policy) queues a
    # backlog in seconds; what matters here is the queue, not the capture.
    threads = [threading.Thread(target=_inject, args=(host, port + 12, BACKLOG // 4))
               for _ in range(4)]
    for t in threads:
        t.start()
    try:
        for t in threads:
            t.join(300)
        assert not any(t.is_alive() for t in threads), "injecting the backlog hung"
        yield pfdir
    finally:
        for t in threads:
            t.join(300)
        # bounded: each pass deletes what is queued; a message still being
        # injected when a join timed out is caught by the next pass
        wait.until(lambda: not _delete_all(pfdir), "the backlog deleted", timeout=120,
                   interval=0.5)


def _delete_all(pfdir: str) -> list[str]:
    ids = _queued(pfdir, CUSTOMER)
    if ids:
        _delete(pfdir, ids)
    return ids


def _log_tail(path: Path, offset: int) -> str:
    with path.open("rb") as f:
        f.seek(offset)
        return f.read().decode("utf-8", "replace")


def test_system_mail_passes_a_customer_backlog(stack: Stack, slow_mx: SlowMX,
                                               backlog: str) -> None:
    pfdir = backlog
    queued = _queued(pfdir, CUSTOMER)
    assert len(queued) >= STILL_QUEUED, f"only {len(queued)} of the backlog queued"
    wait.until(lambda: slow_mx.held > 0, "the fake MX holding customer deliveries")
    log = Path(stack.env["POSTKEEP_POSTFIX_LOG"])
    offset = log.stat().st_size

    domain = stack.config.dkim.system_domains[0]
    sender = f"reset@{domain}"
    token = uuid.uuid4().hex
    reply = smtp.send(*stack.smtp, sender, ["user@lane.test"],
                      (f"From: Platform <{sender}>\r\nSubject: your code\r\n"
                       f"X-Test-Token: {token}\r\n\r\n123456\r\n").encode())
    qid = reply.queue_id
    assert qid, reply.text

    def arrived() -> tuple[str, str, str, bytes] | None:
        return next((m for m in slow_mx.system if token.encode() in m[3]), None)

    # generous: without the lane it waits behind the whole backlog (hours)
    got = wait.until(arrived, "the system message at the fake MX", timeout=120)
    still = _queued(pfdir, CUSTOMER)  # the queue only shrinks: at least as many then
    assert len(still) >= STILL_QUEUED, f"only {len(still)} customer messages still queued"
    _, peer, helo, _ = got
    assert (peer, helo) == (stack.config.postfix.system_bind_address,
                            stack.config.postfix.system_helo_name)

    # Postfix's log: delivered by the postkeep-system transport (its
    # syslog_name), and nothing else was.
    line = wait.until(lambda: re.search(
        rf"^.*/postkeep-system/smtp\[\d+\]: {qid}: to=<user@lane\.test>.*status=sent.*$",
        _log_tail(log, offset), re.M), "the lane's delivery in Postfix's log")
    assert "relay=127.0.0.1[127.0.0.1]" in line.group(0)
    lane_ids = set(re.findall(r"/postkeep-system/smtp\[\d+\]: ([0-9A-Za-z]+):",
                              _log_tail(log, offset)))
    assert lane_ids == {qid}
