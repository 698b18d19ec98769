"""postkeep-milter stopped as systemd stops it, with mail in flight (issue 16).

The stack's milter is replaced for the test by one run as its unit runs it
(same binary, configuration and port, NOTIFY_SOCKET set), and put back
afterwards.  A client of the stack's Postfix is in the middle of DATA when
the milter gets SIGTERM: the milter must say STOPPING=1, let that message
finish (250, captured in PostgreSQL) and exit 0 once Postfix closes the
connection.  It used to die at once with -15: threads started before
libmilter's left SIGTERM unblocked, and one of them took it.  (Letting
libmilter's own signal thread take it is no better: its listener stops and,
with Debian's worker pool, the connection in flight is never read again.)
"""

from __future__ import annotations

import signal
import uuid

import pytest
from support import smtp
from support.stack import Stack, load_stack
from support.systemd import Daemon

pytestmark = pytest.mark.outage


@pytest.fixture
def stack() -> Stack:
    return load_stack()


def test_milter_drains_a_message_in_flight_on_sigterm(stack: Stack) -> None:
    _, domain = stack.new_org()
    token = uuid.uuid4().hex
    stack.stack_ctl("stop", "milter")
    milter = Daemon("postkeep-milter", stack.env["POSTKEEP_CONFIG"])
    try:
        milter.notify.wait_for("READY=1")
        client = smtp.Client(*stack.smtp)
        try:
            # Postfix opened its milter connection when the client connected:
            # from here on a message is in flight in the milter.
            client.command(f"MAIL FROM:<sender@{domain}>", 250)
            client.command("RCPT TO:<r@sink.test>", 250)
            client.command("DATA", 354)
            client.sock.sendall(f"From: <sender@{domain}>\r\nTo: <r@sink.test>\r\n"
                                f"Subject: drain\r\nX-Test-Token: {token}\r\n".encode())
            milter.signal(signal.SIGTERM)
            milter.notify.wait_for("STOPPING=1")
            client.sock.sendall(b"\r\nsent while the milter was stopping\r\n.\r\n")
            reply = client._expect("end of data", 250)
        finally:
            client.close()
        assert milter.stop(timeout=120) == 0, milter.stderr()
        assert reply.queue_id, reply.text
        with stack.connect() as conn:
            rows = conn.execute("SELECT count(*) FROM messages WHERE queue_id = %s"
                                " AND envelope_from = %s",
                                (reply.queue_id, f"sender@{domain}")).fetchone()
        assert rows == (1,), milter.stderr()
        assert "Traceback" not in milter.stderr()
    finally:
        milter.close()
        stack.stack_ctl("start", "milter")
