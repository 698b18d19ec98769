"""Who a message is attributed to, through the stack's real Postfix (issue 21: 2, 4, 12).

The attacker's view: a SASL login that is no registered submitter names a
customer's domain in the envelope.  It must get no signature, no capture in
that customer's name and no way around that customer's limits; a registered
login signs and is counted for its own organisation only.  Postfix's XCLIENT
sets the login (LOGIN=, what smtpd records after a successful AUTH: the
milter's {auth_authen}, policyd's sasl_username) and the client address,
here one off the trusted networks.  Also: a From: domain of another
organisation or of none is refused for good (550 5.7.1), counted apart from
"no key yet"; a client with no address is decided like an untrusted one.
"""

from __future__ import annotations

import re
import urllib.request
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import dkim as dkimpy
import pytest
from support import smtp
from support.daemon_settings import daemon_settings
from support.policyd import PolicyClient, request
from support.stack import Stack

from postkeep.storage.metadata import directory

pytestmark = pytest.mark.stack

UNTRUSTED = "203.0.113.21"  # TEST-NET-3: off the stack's trusted networks


def _send_as(stack: Stack, xclient: str, sender: str, header_from: str,
             token: str) -> smtp.Reply:
    """One message from a client XCLIENT makes up (ADDR=, LOGIN=, ...)."""
    client = smtp.Client(*stack.smtp)
    try:
        client.command(f"XCLIENT {xclient}", 220)
        client.command("EHLO test.example", 250)
        return client.send(sender, ["r@sink.test"],
                           (f"From: {header_from}\r\nSubject: attribution\r\n"
                            f"X-Test-Token: {token}\r\n\r\nbody\r\n").encode())
    finally:
        client.close()


def _dns(stack: Stack):  # type: ignore[no-untyped-def]
    records = stack.public_keys()
    return lambda name, timeout=5: records.get(name)


def _captured(stack: Stack, org_id: uuid.UUID) -> int:
    with stack.connect() as conn:
        row = conn.execute("SELECT count(*) FROM messages WHERE org_id = %s",
                           (org_id,)).fetchone()
    assert row is not None
    return int(row[0])


def _counted(stack: Stack, org_id: uuid.UUID) -> dict[str, int]:
    with stack.connect() as conn:
        return dict(conn.execute("SELECT kind, sum(used)::int FROM rate_counters"
                                 " WHERE org_id = %s GROUP BY kind", (org_id,)).fetchall())


def _metric(url: str, sample: str) -> float:
    with urllib.request.urlopen(url, timeout=5) as resp:
        text = resp.read().decode()
    m = re.search(r"^" + re.escape(sample) + r" (\S+)$", text, re.MULTILINE)
    return float(m.group(1)) if m else 0.0


def _submitter(stack: Stack, org_id: uuid.UUID) -> str:
    login = f"app-{uuid.uuid4().hex[:10]}"
    with stack.connect() as conn:
        directory.add_submitter(conn, org_id, login)
    return login


# --- 2. signing and limits for any SASL user ---------------------------------


def test_unknown_login_gets_no_signature_and_no_capture_for_the_domain_it_claims(
        stack: Stack) -> None:
    victim, domain = stack.new_org("pro")
    login = f"mallory-{uuid.uuid4().hex[:8]}"
    with pytest.raises(smtp.SMTPError) as err:
        _send_as(stack, f"ADDR={UNTRUSTED} LOGIN={login}", f"billing@{domain}",
                 f"billing@{domain}", uuid.uuid4().hex)
    reply = err.value.reply
    assert err.value.stage == "MAIL", err.value  # refused as soon as the login is seen
    assert reply.code == 550 and reply.enhanced == "5.7.1", reply
    assert login in reply.text and "not a registered submitter" in reply.text, reply
    assert _captured(stack, victim) == 0
    assert _counted(stack, victim) == {}


def test_unknown_login_does_not_get_past_the_claimed_customer_limits(stack: Stack) -> None:
    victim, domain = stack.new_org("basic")
    with stack.connect() as conn:
        conn.execute("UPDATE organisations SET messages_per_hour = 1 WHERE id = %s", (victim,))
    smtp.send(*stack.smtp, f"app@{domain}", ["r@sink.test"],
              f"From: app@{domain}\r\n\r\nthe one allowed\r\n".encode())
    with pytest.raises(smtp.SMTPError) as over:
        smtp.send(*stack.smtp, f"app@{domain}", ["r@sink.test"],
                  f"From: app@{domain}\r\n\r\none too many\r\n".encode())
    assert over.value.reply.code == 450, over.value  # the customer is at its limit

    login = f"mallory-{uuid.uuid4().hex[:8]}"
    with pytest.raises(smtp.SMTPError) as err:
        _send_as(stack, f"ADDR={UNTRUSTED} LOGIN={login}", f"app@{domain}",
                 f"app@{domain}", uuid.uuid4().hex)
    assert err.value.reply.code == 550 and err.value.reply.enhanced == "5.7.1", err.value
    assert _captured(stack, victim) == 1
    assert _counted(stack, victim)["messages"] == 1

    # policyd, asked first (at RCPT) where no milter refused at MAIL FROM,
    # refuses the login too instead of answering DUNNO for an unknown user.
    policy = PolicyClient(int(stack.env["POSTKEEP_POLICYD_PORT"]))
    try:
        answer = policy.ask(request("RCPT", f"app@{domain}", uuid.uuid4().hex,
                                    sasl_username=login))
    finally:
        policy.close()
    assert answer.startswith("550 5.7.1 ") and login in answer, answer


def test_registered_login_signs_and_counts_only_for_its_own_organisation(
        stack: Stack) -> None:
    own, domain = stack.new_org("pro")
    other, theirs = stack.new_org("pro")
    login = _submitter(stack, own)
    token = uuid.uuid4().hex
    reply = _send_as(stack, f"ADDR={UNTRUSTED} LOGIN={login}", f"app@{domain}",
                     f"app@{domain}", token)
    delivered = stack.sink_copy(token)
    assert f"d={domain}".encode() in delivered and dkimpy.verify(delivered, dnsfunc=_dns(stack))
    assert reply.queue_id and _captured(stack, own) == 1
    assert _counted(stack, own)["messages"] == 1

    # The same login claiming another organisation's domain, in the envelope
    # and in From:, is neither signed nor captured nor counted for it.
    with pytest.raises(smtp.SMTPError) as err:
        _send_as(stack, f"ADDR={UNTRUSTED} LOGIN={login}", f"app@{theirs}",
                 f"ceo@{theirs}", uuid.uuid4().hex)
    assert err.value.reply.code == 550 and err.value.reply.enhanced == "5.7.1", err.value
    assert _captured(stack, other) == 0 and _counted(stack, other) == {}


@contextmanager
def _unknown_login_passes(stack: Stack) -> Iterator[None]:
    """Milter and policyd run with [milter] unknown_login = "pass" inside the block."""
    with daemon_settings(stack, "milter", {"unknown_login": "pass"},
                         services=("milter", "policyd")):
        yield


def test_unknown_login_passed_unsigned_and_uncaptured_when_configured(stack: Stack) -> None:
    victim, domain = stack.new_org("pro")
    token = uuid.uuid4().hex
    with _unknown_login_passes(stack):
        reply = _send_as(stack, f"ADDR={UNTRUSTED} LOGIN=mallory-{token[:8]}",
                         f"billing@{domain}", f"billing@{domain}", token)
        assert reply.code == 250
        delivered = stack.sink_copy(token)
    assert b"DKIM-Signature" not in delivered
    assert _captured(stack, victim) == 0 and _counted(stack, victim) == {}


# --- 4. a From: domain that is not the organisation's -------------------------


def test_from_domain_of_another_org_or_of_none_is_refused_for_good(stack: Stack) -> None:
    _, domain = stack.new_org("pro")  # missing_key = tempfail: the default
    _, theirs = stack.new_org("pro")
    metrics = stack.env["POSTKEEP_MILTER_METRICS"]
    sample = 'postkeep_milter_dkim_unsigned_total{reason="foreign_from"}'
    no_key = 'postkeep_milter_dkim_unsigned_total{reason="no_key"}'
    before, no_key_before = _metric(metrics, sample), _metric(metrics, no_key)
    for header_from in (f"ceo@{theirs}", f"ceo@nobody-{uuid.uuid4().hex[:8]}.example"):
        with pytest.raises(smtp.SMTPError) as err:
            smtp.send(*stack.smtp, f"app@{domain}", ["r@sink.test"],
                      f"From: {header_from}\r\n\r\nx\r\n".encode())
        reply = err.value.reply
        assert reply.code == 550 and reply.enhanced == "5.7.1", reply
        assert header_from.split("@")[1] in reply.text and "try again" not in reply.text
    assert _metric(metrics, sample) == before + 2
    assert _metric(metrics, no_key) == no_key_before  # "no key yet" is another count

    # The organisation's choice to send unsigned still holds.
    _, lax = stack.new_org("pro", missing_key="unsigned")
    token = uuid.uuid4().hex
    smtp.send(*stack.smtp, f"app@{lax}", ["r@sink.test"],
              f"From: ceo@{theirs}\r\nX-Test-Token: {token}\r\n\r\nx\r\n".encode())
    assert b"DKIM-Signature" not in stack.sink_copy(token)


# --- 12. a client with no address ---------------------------------------------


def test_client_without_address_is_decided_like_an_untrusted_client(stack: Stack) -> None:
    org, domain = stack.new_org("pro")
    token = uuid.uuid4().hex
    reply = _send_as(stack, "ADDR=[UNAVAILABLE] NAME=[UNAVAILABLE]", f"app@{domain}",
                     f"app@{domain}", token)
    assert reply.code == 250 and reply.queue_id
    assert b"DKIM-Signature" not in stack.sink_copy(token)  # untrusted: never signed
    assert _captured(stack, org) == 1
    with pytest.raises(smtp.SMTPError) as err:
        _send_as(stack, "ADDR=[UNAVAILABLE]", f"a@nobody-{token[:8]}.example",
                 f"a@nobody-{token[:8]}.example", uuid.uuid4().hex)
    assert err.value.reply.code == 550 and err.value.reply.enhanced == "5.7.1", err.value

    # With a registered login it is that login's client: signed for its organisation.
    login = _submitter(stack, org)
    token = uuid.uuid4().hex
    _send_as(stack, f"ADDR=[UNAVAILABLE] LOGIN={login}", f"app@{domain}", f"app@{domain}",
             token)
    assert dkimpy.verify(stack.sink_copy(token), dnsfunc=_dns(stack))


def test_system_and_customer_domains_cannot_be_mixed(stack: Stack) -> None:
    # The system lane and policyd choose system mail by the envelope sender;
    # the milter used the From: domain first, so a trusted client could take
    # the priority lane and skip the limits with a customer's From: (or skip
    # storage with a system From: on a customer's envelope).  Both are
    # refused for good now, and nothing is stored.
    org, domain = stack.new_org("basic")
    system = stack.config.dkim.system_domains[0]
    for sender, header_from in ((f"reset@{system}", f"app@{domain}"),
                                (f"app@{domain}", f"reset@{system}")):
        with pytest.raises(smtp.SMTPError) as err:
            smtp.send(*stack.smtp, sender, ["r@sink.test"],
                      f"From: {header_from}\r\nSubject: mix\r\n\r\nbody\r\n".encode())
        assert (err.value.reply.code, err.value.reply.enhanced) == (550, "5.7.1"), err.value
        assert system in err.value.reply.text, err.value
    assert _captured(stack, org) == 0
    # A registered submitter (a customer) may not send as a system domain.
    login = _submitter(stack, org)
    with pytest.raises(smtp.SMTPError) as err:
        _send_as(stack, f"ADDR=127.0.0.1 LOGIN={login}",
                 f"reset@{system}", f"reset@{system}", uuid.uuid4().hex)
    assert (err.value.reply.code, err.value.reply.enhanced) == (550, "5.7.1"), err.value
    assert "SASL login" in err.value.reply.text, err.value
    assert _captured(stack, org) == 0
