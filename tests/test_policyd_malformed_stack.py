"""Malformed policy requests, sent as an attacker to the stack's postkeep-policyd.

A request with an attribute value no Postfix sends (a recipient count or size
out of range, not a number, invalid UTF-8) gets a permanent refusal for that
request only, naming the attribute, and a log line naming the attribute and
the client.  It must not look like a PostgreSQL outage: the next well-formed
request, on the same connection and on another one, is decided from
PostgreSQL (an organisation over its limit stays refused; degraded mode
would count this host's share afresh in memory and let it through), and
policyd's backend-error and degraded-decision counters do not move.
"""

from __future__ import annotations

import re
import uuid

import pytest
from support.policyd import PolicyClient
from support.sidecar import LogWatch, log_path, metric
from support.stack import Stack

pytestmark = pytest.mark.stack

DEGRADED_SAMPLES = (
    "postkeep_policyd_backend_errors_total",
    *(f'postkeep_policyd_degraded_decisions_total{{mode="{m}"}}'
      for m in ("share", "open", "closed", "unknown_org")),
)


def _raw(state: str, sender: bytes, instance: bytes, recipients: bytes = b"1",
         size: bytes = b"0", sasl: bytes = b"", client: bytes = b"192.0.2.10") -> bytes:
    """A request as Postfix sends it, every value given as raw bytes."""
    return (b"request=smtpd_access_policy\nprotocol_state=" + state.encode()
            + b"\nprotocol_name=ESMTP\nclient_address=" + client
            + b"\nclient_name=unknown\nhelo_name=attacker.test\nsender=" + sender
            + b"\nrecipient=r@sink.test\nrecipient_count=" + recipients
            + b"\ninstance=" + instance + b"\nsize=" + size
            + b"\nsasl_username=" + sasl + b"\n\n")


def _data(domain: str, **kw: bytes) -> bytes:
    return _raw("DATA", f"app@{domain}".encode(), uuid.uuid4().hex.encode(), **kw)


def _degraded(stack: Stack) -> dict[str, float]:
    url = stack.env["POSTKEEP_POLICYD_METRICS"]
    return {s: metric(url, s) for s in DEGRADED_SAMPLES}


def _client(stack: Stack) -> PolicyClient:
    host, port = stack.env["POSTKEEP_POLICYD_HOST"], int(stack.env["POSTKEEP_POLICYD_PORT"])
    assert host == "127.0.0.1", host  # test traffic only ever goes to loopback
    return PolicyClient(port)


def _over_limit(reply: str) -> bool:
    """Refused from PostgreSQL's shared counter (not this host's degraded share)."""
    return (reply.startswith("DEFER_IF_PERMIT 4.7.1")
            and "(100 of 100)" in reply and "this host share" not in reply)


# (what is sent, the attribute the refusal must name, the enhanced code)
MALFORMED = [
    (dict(recipients=b"99999999999999999999"), "recipient_count", "5.5.4"),
    (dict(recipients=b"2147483648"), "recipient_count", "5.5.4"),
    (dict(recipients=b"-3"), "recipient_count", "5.5.4"),
    (dict(recipients=b"twelve"), "recipient_count", "5.5.4"),
    (dict(size=b"99999999999999999999999"), "size", "5.3.4"),
    (dict(size=b"1e9"), "size", "5.5.4"),
]


def test_malformed_requests_are_refused_alone_and_do_not_degrade(stack: Stack) -> None:
    _, full = stack.new_org("free", dkim=False)
    _, fine = stack.new_org("free", dkim=False)
    first = _client(stack)
    try:
        # FULL sends its 100 messages of the hour; the 101st is over.
        replies = [first.ask(_data(full)) for _ in range(100)]
        assert replies == ["DUNNO"] * 100, replies[-1]
        assert _over_limit(first.ask(_data(full)))
        before = _degraded(stack)
        watch = LogWatch(log_path(stack, "policyd"))
        host, port = first.sock.getsockname()[:2]
        peer = f"{host}:{port}"

        for kw, attribute, code in MALFORMED:
            reply = first.ask(_data(fine, **kw))
            assert reply.startswith("5") and f" {code} " in reply, (kw, reply)
            assert attribute in reply, (kw, reply)
            # the connection stays usable and the next request is decided from PostgreSQL
            assert _over_limit(first.ask(_data(full))), kw
            assert first.ask(_data(fine)) == "DUNNO", kw
        # a log line names the attribute and the client (policy peer and SMTP client)
        for attribute in ("recipient_count", "size"):
            watch.wait_for(rf"(?m)^(?=.*\b{attribute}\b)(?=.*{re.escape(peer)})"
                           r"(?=.*192\.0\.2\.10).*$")

        # invalid UTF-8 where policyd reads it (sender, login, instance): answered
        for raw, attribute in [
            (_raw("DATA", b"app@\xff\xfe.example", b"i1"), "sender"),
            (_raw("DATA", f"app@{fine}".encode(), b"i\xc3\x28x"), "instance"),
            (_raw("RCPT", f"app@{fine}".encode(), b"", sasl=b"us\xe9r"), "sasl_username"),
        ]:
            reply = first.ask(raw)
            assert reply.startswith("5") and attribute in reply, (attribute, reply)
            assert _over_limit(first.ask(_data(full))), attribute
        # ... and where it does not (helo_name): decided as usual
        odd = _data(fine).replace(b"helo_name=attacker.test", b"helo_name=\xff\xfe")
        assert first.ask(odd) == "DUNNO"

        # another connection, opened after all that, is decided from PostgreSQL too
        second = _client(stack)
        try:
            assert [_over_limit(second.ask(_data(full))) for _ in range(20)] == [True] * 20
            assert second.ask(_data(fine)) == "DUNNO"
        finally:
            second.close()
        assert _degraded(stack) == before
    finally:
        first.close()


def test_the_refusal_reaches_no_other_organisation(stack: Stack) -> None:
    """A malformed request from one sender, between well-formed ones of others,
    on parallel connections: only it is refused."""
    _, a = stack.new_org("free", dkim=False)
    _, b = stack.new_org("free", dkim=False)
    ca, cb = _client(stack), _client(stack)
    try:
        before = _degraded(stack)
        for n in range(5):
            assert ca.ask(_data(a)) == "DUNNO"
            reply = cb.ask(_data(b, recipients=str(2**63 + n).encode()))
            assert reply.startswith("550 5.5.4") and "recipient_count" in reply, reply
            assert cb.ask(_data(b)) == "DUNNO"
        assert _degraded(stack) == before
    finally:
        ca.close()
        cb.close()
