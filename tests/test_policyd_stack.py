"""Rate limits through the stack's real Postfix, which asks postkeep-policyd.

A free-tier organisation sends its 100 messages of the hour; the 101st gets
450 4.7.1 with the reason (limit kind, tier, limit, when to retry); another
organisation is unaffected; system mail (a [dkim] system domain) is never
limited; a message over the daily bytes is refused at end of data and its
reservation given back.
"""

from __future__ import annotations

import uuid

import psycopg
import pytest
from support import smtp
from support.stack import Stack

pytestmark = pytest.mark.stack


def _message(domain: str, n: int, body_lines: int = 5) -> bytes:
    return (f"From: app@{domain}\r\nTo: r@sink.test\r\nSubject: limit {n}\r\n"
            f"Message-ID: <{uuid.uuid4().hex}@{domain}>\r\n\r\n").encode() + (
        b"body line\r\n" * body_lines)


def _send_many(stack: Stack, domain: str, count: int) -> list[smtp.Reply]:
    client = smtp.Client(*stack.smtp)
    try:
        return [client.send(f"app@{domain}", ["r@sink.test"], _message(domain, n))
                for n in range(count)]
    finally:
        client.close()


def test_the_101st_message_of_a_free_org_is_deferred_with_the_reason(stack: Stack) -> None:
    _, domain = stack.new_org("free")
    _, other = stack.new_org("free")
    accepted = _send_many(stack, domain, 100)
    assert all(r.code == 250 for r in accepted)
    client = smtp.Client(*stack.smtp)
    try:
        with pytest.raises(smtp.SMTPError) as info:
            client.send(f"app@{domain}", ["r@sink.test"], _message(domain, 101))
        reply = info.value.reply
        assert reply.code == 450 and reply.enhanced == "4.7.1", reply
        assert "messages per hour limit of the free tier reached (100 of 100)" in reply.text
        assert "retry after" in reply.text and "UTC" in reply.text
        client.reset()
        # another organisation is not affected
        assert client.send(f"app@{other}", ["r@sink.test"], _message(other, 1)).code == 250
        # system mail is never limited, whoever sends it
        system = stack.config.dkim.system_domains[0]
        sysmsg = _message(system, 0)
        assert client.send(f"noreply@{system}", ["r@sink.test"], sysmsg).code == 250
    finally:
        client.close()


def test_bytes_over_at_end_of_data_gives_the_reservation_back(stack: Stack) -> None:
    oid, domain = stack.new_org("enterprise")
    with psycopg.connect(stack.config.postgres.conninfo(), autocommit=True) as conn:
        conn.execute("UPDATE organisations SET bytes_per_day = 20000 WHERE id = %s", (oid,))
    client = smtp.Client(*stack.smtp)
    try:
        assert client.send(f"app@{domain}", ["r@sink.test"], _message(domain, 1)).code == 250
        with pytest.raises(smtp.SMTPError) as info:
            client.send(f"app@{domain}", ["r@sink.test"], _message(domain, 2, 3000))
        assert info.value.stage == "end of data"
        assert info.value.reply.code == 450 and "bytes per day" in info.value.reply.text
    finally:
        client.close()
    with psycopg.connect(stack.config.postgres.conninfo(), autocommit=True) as conn:
        used = dict(conn.execute("SELECT kind, used FROM rate_counters WHERE org_id = %s",
                                 (oid,)).fetchall())
    assert used["messages"] == 1 and used["recipients"] == 1
    assert 0 < used["bytes"] < 20000
