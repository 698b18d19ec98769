"""Suppression lists through the real stack (issue 17).

A remote MX on loopback (mx.test) refuses unknown-* with 550 5.1.1 and
full-* with 550 5.2.2; Postfix's own failure notice comes back to the
message's return path, postkeep-storage records it, and the recording
suppresses the address in the same transaction.  The next message to it is
refused at RCPT by postkeep-policyd (550 5.7.1 naming why), or in shadow
mode accepted with a log line and a metric.  Each organisation has its own
list.  The test tier here: entries expire after 30 days, 2 soft bounces in a
day suppress.
"""

from __future__ import annotations

import json
import subprocess
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import click
import pytest
from click.testing import CliRunner
from support import smtp
from support.sidecar import LogWatch, deliver, failure_report, log_path, metric
from support.smtp_server import RemoteMX, serve_remote_mx
from support.stack import Stack
from support.wait import until

from postkeep import cli
from postkeep.storage.metadata import suppression

pytestmark = pytest.mark.stack



@pytest.fixture
def remote_mx(stack: Stack) -> Iterator[RemoteMX]:
    with serve_remote_mx(int(stack.env["POSTKEEP_FAKE_MX_PORT"])) as mx:
        _flush(stack, every=0)
        yield mx


_last_flush = [0.0]


def _flush(stack: Stack, every: float = 5) -> None:
    """postqueue -f (at most every EVERY seconds): an earlier test may have left
    mx.test's next hop marked dead (nothing listened then), and Postfix would
    defer the mail here without trying until its backoff ends; a flush clears
    the dead-destination status and delivers now."""
    now = time.monotonic()
    if now - _last_flush[0] >= every:
        _last_flush[0] = now
        subprocess.run(["postqueue", "-c", stack.env["POSTKEEP_POSTFIX_CONFIG_DIR"], "-f"],
                       check=False, capture_output=True, timeout=30)


@pytest.fixture(scope="module")
def tier(stack: Stack) -> Iterator[str]:
    """A tier like pro, unlimited rates, suppression 30 days, 2 soft bounces a day;
    afterwards its organisations move to pro and it is gone (other tests list tiers)."""
    name = f"suppr-{uuid.uuid4().hex[:8]}"
    with stack.connect() as conn:
        conn.execute(
            "INSERT INTO tiers (name, content_days, metadata_days, suppression_days,"
            " soft_bounce_limit, soft_bounce_window_days)"
            " SELECT %s, content_days, metadata_days, 30, 2, 1 FROM tiers WHERE name = 'pro'",
            (name,))
    try:
        yield name
    finally:
        with stack.connect() as conn, conn.transaction():
            conn.execute("UPDATE organisations SET tier = 'pro' WHERE tier = %s", (name,))
            conn.execute("DELETE FROM tiers WHERE name = %s", (name,))


def _send(stack: Stack, domain: str, rcpt: str) -> uuid.UUID:
    token = uuid.uuid4().hex[:10]
    body = (f"From: app@{domain}\r\nTo: {rcpt}\r\nSubject: suppression {token}\r\n"
            f"Message-ID: <{token}@{domain}>\r\nX-Test-Token: {token}\r\n\r\nHello.\r\n").encode()
    reply = smtp.send(*stack.smtp, f"app@{domain}", [rcpt], body)
    with stack.connect() as conn:
        row = conn.execute("SELECT id FROM messages WHERE queue_id = %s",
                           (reply.queue_id,)).fetchone()
    assert row is not None, reply
    return uuid.UUID(str(row[0]))


def _status(stack: Stack, mid: uuid.UUID) -> tuple[str, str | None]:
    with stack.connect() as conn:
        row = conn.execute("SELECT status, dsn_status FROM message_recipients"
                           " WHERE message_id = %s", (mid,)).fetchone()
    assert row is not None
    return str(row[0]), row[1]


def _events(stack: Stack, mid: uuid.UUID, rcpt: str) -> int:
    with stack.connect() as conn:
        row = conn.execute("SELECT count(*) FROM recipient_events WHERE message_id = %s"
                           " AND recipient = %s AND status = 'bounced'", (mid, rcpt)).fetchone()
    return int(row[0]) if row else 0


def _rcpt(stack: Stack, sender: str, rcpt: str) -> smtp.Reply:
    """Postfix's answer to RCPT TO:<RCPT> (nothing is sent: the session ends there)."""
    client = smtp.Client(*stack.smtp)
    try:
        client.command(f"MAIL FROM:<{sender}>", 250)
        try:
            return client.command(f"RCPT TO:<{rcpt}>", 250)
        except smtp.SMTPError as exc:
            return exc.reply
    finally:
        client.close()


def _entry(stack: Stack, org: uuid.UUID, address: str) -> suppression.Suppression | None:
    with stack.connect() as conn:
        rows = suppression.entries(conn, org, address=address, include_expired=True)
    return rows[0] if rows else None


def test_a_hard_bounce_suppresses_and_the_next_rcpt_is_refused_for_that_org_only(
        stack: Stack, remote_mx: RemoteMX, tier: str) -> None:
    org, domain = stack.new_org(tier)
    other, other_domain = stack.new_org(tier)
    rcpt = f"unknown-{uuid.uuid4().hex[:10]}@mx.test"
    # Never suppressed before: Postfix accepts it, the remote MX refuses it.
    assert _rcpt(stack, f"app@{domain}", rcpt).code == 250
    mid = _send(stack, domain, rcpt)
    until(lambda: _flush(stack) or _status(stack, mid) == ("bounced", "5.1.1"),
          "the 5.1.1 to be recorded", timeout=60)
    e = _entry(stack, org, rcpt)
    assert e is not None and (e.reason, e.source, e.detail, e.message_id) == (
        "hard_bounce", "outcome", "5.1.1", mid)
    assert e.expires_at is not None
    assert e.expires_at - e.suppressed_at == timedelta(days=30)  # the tier's
    day = e.suppressed_at.astimezone(UTC)

    # Refused at RCPT (once policyd's cached "not suppressed" from the first
    # RCPT has expired: policyd.suppression_cache_seconds).
    refused = until(lambda: (r := _rcpt(stack, f"app@{domain}", rcpt)).code == 550 and r,
                    "policyd to refuse the suppressed recipient", timeout=60, interval=0.5)
    assert refused.text == (f"5.7.1 <{rcpt}>: Recipient address rejected:"
                            f" suppressed: hard bounce on {day:%Y-%m-%d} (5.1.1)"), refused
    # The domain is compared case-insensitively, the local part exactly.
    local, _, rdomain = rcpt.partition("@")
    assert _rcpt(stack, f"app@{domain}", f"{local}@{rdomain.upper()}").code == 550
    assert _rcpt(stack, f"app@{domain}", f"{local.upper()}@{rdomain}").code == 250
    # Another organisation's list does not have it.
    assert _entry(stack, other, rcpt) is None
    assert _rcpt(stack, f"app@{other_domain}", rcpt).code == 250


def test_soft_bounces_suppress_after_the_tiers_count_in_its_window(
        stack: Stack, remote_mx: RemoteMX, tier: str) -> None:
    org, domain = stack.new_org(tier)
    rcpt = f"full-{uuid.uuid4().hex[:10]}@mx.test"
    first = _send(stack, domain, rcpt)
    until(lambda: _flush(stack) or _status(stack, first) == ("bounced", "5.2.2"),
          "the first 5.2.2", timeout=60)
    assert _entry(stack, org, rcpt) is None  # one soft bounce is not enough
    # A second notice of the same failure (the remote server's own, late) is
    # still one failed message: one soft bounce.
    with stack.connect() as conn:
        row = conn.execute("SELECT return_path FROM messages WHERE id = %s",
                           (first,)).fetchone()
    assert row is not None
    late = failure_report(first, rcpt, "5.2.2", "550 5.2.2 mailbox full (late notice)")
    assert deliver(stack, str(row[0]), late).code == 250
    until(lambda: _events(stack, first, rcpt) == 2, "the late notice to be recorded")
    assert _entry(stack, org, rcpt) is None
    second = _send(stack, domain, rcpt)
    until(lambda: _flush(stack) or _status(stack, second) == ("bounced", "5.2.2"),
          "the second 5.2.2", timeout=60)
    e = _entry(stack, org, rcpt)
    assert e is not None and e.reason == "soft_bounce", e
    assert e.detail == "2 in 1 days, last 5.2.2"
    refused = until(lambda: (r := _rcpt(stack, f"app@{domain}", rcpt)).code == 550 and r,
                    "policyd to refuse the suppressed recipient", timeout=60, interval=0.5)
    assert "suppressed: repeated soft bounces on " in refused.text, refused


def test_shadow_mode_accepts_logs_and_counts(stack: Stack, remote_mx: RemoteMX,
                                             tier: str) -> None:
    org, domain = stack.new_org(tier)
    rcpt = f"ok-{uuid.uuid4().hex[:10]}@mx.test"
    url = stack.env["POSTKEEP_POLICYD_METRICS"]
    sample = 'postkeep_policyd_suppressed_total{mode="shadow",reason="unsubscribe"}'
    before = metric(url, sample)
    with stack.connect() as conn:
        suppression.set_mode(conn, org, "shadow")
        suppression.suppress(conn, org, rcpt, "unsubscribe", "test")
    watch = LogWatch(log_path(stack, "policyd"))
    mid = _send(stack, domain, rcpt)  # accepted
    watch.wait_for(r"suppression shadow \(not refused\) RCPT .*recipient="
                   + rcpt.replace(".", r"\.") + r": 550 5\.7\.1 .*suppressed: unsubscribe on")
    until(lambda: metric(url, sample) >= before + 1, "the shadow metric to count it")
    until(lambda: _flush(stack) or _status(stack, mid)[0] == "relayed",
          "the message to leave", timeout=60)
    with stack.connect() as conn:
        suppression.set_mode(conn, org, "enforce")
    refused = until(lambda: (r := _rcpt(stack, f"app@{domain}", rcpt)).code == 550 and r,
                    "enforce mode to refuse it", timeout=60, interval=0.5)
    assert "suppressed: unsubscribe on" in refused.text


def test_expired_entries_are_ignored(stack: Stack, tier: str) -> None:
    org, domain = stack.new_org(tier)
    rcpt = f"old-{uuid.uuid4().hex[:10]}@mx.test"
    now = datetime.now(UTC)
    with stack.connect() as conn:
        expires = suppression.suppress(conn, org, rcpt, "complaint", "test",
                                       at=now - timedelta(days=3), days=2)
        assert expires is not None and expires < now
        assert suppression.lookup(conn, org, rcpt) is None
        assert suppression.entries(conn, org) == []
        assert [e.address for e in suppression.entries(conn, org, include_expired=True)] == [rcpt]
        # A new suppression replaces the expired entry; 0 days: never expires.
        assert suppression.suppress(conn, org, rcpt, "complaint", "test", days=0) is None
        hit = suppression.lookup(conn, org, rcpt)
        assert hit is not None and hit.reason == "complaint"
    assert _rcpt(stack, f"app@{domain}", rcpt).code == 550
    # Expired again (as time passing would): accepted again.
    with stack.connect() as conn:
        conn.execute("UPDATE suppressions SET expires_at = now() - interval '1 second'"
                     " WHERE org_id = %s", (org,))
    until(lambda: _rcpt(stack, f"app@{domain}", rcpt).code == 250,
          "the expired entry to be ignored", timeout=60, interval=0.5)
    # Purged (as postkeep-storage does every maintenance_seconds), with the
    # soft-bounce count whose newest bounce left the tier's one-day window;
    # a recent one stays.
    with stack.connect() as conn:
        conn.execute("INSERT INTO suppression_soft_bounces (org_id, address, bounce_at) VALUES"
                     " (%s, 'stale@x.example', ARRAY[now() - interval '25 hours']),"
                     " (%s, 'fresh@x.example', ARRAY[now() - interval '1 hour'])", (org, org))
    cli._register()
    args = ["--config", stack.env["POSTKEEP_CONFIG"], "suppression", "purge"]
    dry = CliRunner().invoke(cli.cli, [*args, "--dry-run"])
    assert dry.exit_code == 0 and dry.stdout.startswith("would delete "), dry.stdout
    assert _entry(stack, org, rcpt) is not None
    done = CliRunner().invoke(cli.cli, [*args, "--yes"])
    assert done.exit_code == 0 and done.stdout.startswith("deleted "), done.stdout
    with stack.connect() as conn:
        assert suppression.entries(conn, org, include_expired=True) == []
        left = conn.execute("SELECT address FROM suppression_soft_bounces WHERE org_id = %s",
                            (org,)).fetchall()
    assert left == [("fresh@x.example",)]


def test_hard_codes_match_the_sql_classification(stack: Stack) -> None:
    codes = [*suppression.HARD_CODES, "5.1.0", "5.1.4", "5.2.2", "5.3.0", "5.4.4", "4.4.1",
             "5.7.1", "5.7.26", "5.1.7", "5.1.8", None]
    with stack.connect() as conn:
        kinds = {c: conn.execute("SELECT suppression_kind('bounced', %s, 'dsn')",
                                 (c,)).fetchone() for c in codes}
        assert conn.execute("SELECT suppression_kind('expired', NULL, 'queue_expiry'),"
                            " suppression_kind('expired', '4.4.1', 'dsn'),"
                            " suppression_kind('deferred', '4.2.2', 'dsn'),"
                            " suppression_kind('relayed', '2.0.0', 'dsn')").fetchone() == (
            None, "soft_bounce", None, None)
        samples = ["A.b@Example.COM.", "<x@Y.org>", "no-at", "a@b@C.example"]
        sql = [conn.execute("SELECT suppression_address(%s)", (s,)).fetchone() for s in samples]
    assert {c: k[0] if k else None for c, k in kinds.items()} == {
        **dict.fromkeys(suppression.HARD_CODES, "hard_bounce"),
        **dict.fromkeys(["5.1.0", "5.1.4", "5.2.2", "5.3.0", "5.4.4", "4.4.1", None],
                        "soft_bounce"),
        **dict.fromkeys(["5.7.1", "5.7.26", "5.1.7", "5.1.8"], None)}
    assert [r[0] if r else None for r in sql] == [suppression.normalise(s) for s in samples]


def test_cli_add_list_export_remove(stack: Stack, tier: str) -> None:
    org, domain = stack.new_org(tier)
    with stack.connect() as conn:
        row = conn.execute("SELECT name FROM organisations WHERE id = %s", (org,)).fetchone()
    assert row is not None
    name = str(row[0])
    cli._register()
    root: click.Group = cli.cli

    def run(*args: str, stdin: str | None = None) -> tuple[int, str, str]:
        r = CliRunner().invoke(root, ["--config", stack.env["POSTKEEP_CONFIG"], "suppression",
                                      *args], input=stdin)
        return r.exit_code, r.stdout, r.stderr

    a, b = (f"cli-{uuid.uuid4().hex[:8]}@Mx.Test", f"cli-{uuid.uuid4().hex[:8]}@mx.test")
    code, out, _ = run("add", name, a, b, "--reason", "unsubscribe", "--note", "form 7")
    assert code == 0 and "never" not in out and suppression.normalise(a) in out, out
    refused = _rcpt(stack, f"app@{domain}", a.lower().replace("mx.test", "MX.test"))
    assert refused.code == 550 and "suppressed: unsubscribe on" in refused.text
    assert refused.text.rstrip().endswith("(form 7)"), refused
    code, out, _ = run("list", name, "--json")
    listed = json.loads(out)
    assert code == 0 and {e["address"] for e in listed} == {suppression.normalise(a), b}
    assert {e["reason"] for e in listed} == {"unsubscribe"}
    code, out, _ = run("export", name)
    lines = out.splitlines()
    assert code == 0 and lines[0].startswith("address,reason,source,detail") and len(lines) == 3
    code, out, _ = run("list", name, "--reason", "complaint", "--json")
    assert (code, json.loads(out)) == (0, [])
    # remove: --dry-run changes nothing, no answer is a no, --yes removes.
    code, out, _ = run("remove", name, b, "--dry-run")
    assert code == 0 and "would remove 1 address" in out
    code, _, err = run("remove", name, b, stdin="")
    assert code == 1 and "not confirmed" in err
    assert _entry(stack, org, b) is not None
    code, out, _ = run("remove", name, b, "--yes")
    assert code == 0 and _entry(stack, org, b) is None
    code, _, err = run("remove", name, b, "--yes")
    assert code == 1 and "not on the suppression list" in err
    code, _, err = run("list", "no-such-org-" + uuid.uuid4().hex[:6])
    assert code == 1 and "no organisation" in err
    code, out, _ = run("tier", tier)
    assert code == 0 and "expire 30 days; soft bounces suppress after 2 in 1 days" in out


def test_recording_outcomes_still_works_without_suppressing_relayed(
        stack: Stack, remote_mx: RemoteMX, tier: str) -> None:
    org, domain = stack.new_org(tier)
    rcpt = f"ok-{uuid.uuid4().hex[:10]}@mx.test"
    mid = _send(stack, domain, rcpt)
    until(lambda: _flush(stack) or _status(stack, mid)[0] == "relayed",
          "the relayed notice", timeout=60)
    with stack.connect() as conn:
        assert suppression.entries(conn, org, include_expired=True) == []
        soft = conn.execute("SELECT count(*) FROM suppression_soft_bounces WHERE org_id = %s",
                            (org,)).fetchone()
    assert soft == (0,)


def test_policyds_lookup_is_an_index_probe(stack: Stack, tier: str) -> None:
    # An organisation with a long list: the lookup is the primary key's probe
    # on both columns, not a walk over the organisation's entries.
    org, _ = stack.new_org(tier)
    with stack.connect() as conn:
        conn.execute("INSERT INTO suppressions (org_id, address, reason, source)"
                     " SELECT %s, 'x' || g || '@b.example', 'manual', 'test'"
                     " FROM generate_series(1, 5000) g", (org,))
        conn.execute("ANALYZE suppressions")
        plan = "\n".join(str(r[0]) for r in conn.execute(
            "EXPLAIN " + suppression.LOOKUP, {"org": org, "addr": "x17@b.example"}).fetchall())
        hit = suppression.lookup(conn, org, "x17@B.Example")
        conn.execute("DELETE FROM suppressions WHERE org_id = %s", (org,))
    assert "Index Scan using suppressions_pkey on suppressions" in plan, plan
    assert any("Index Cond:" in line and "x17@b.example" in line
               for line in plan.splitlines()), plan
    assert hit is not None and hit.reason == "manual"


def test_an_erased_address_stays_suppressed_under_a_pseudonym(
        stack: Stack, remote_mx: RemoteMX, tier: str) -> None:
    from postkeep.storage.lifecycle import erasure, rules

    org, domain = stack.new_org(tier)
    rcpt = f"unknown-{uuid.uuid4().hex[:10]}@mx.test"
    _send(stack, domain, rcpt)
    until(lambda: _flush(stack) or _entry(stack, org, rcpt) is not None,
          "the hard bounce's suppression", timeout=90)
    with stack.connect() as conn:  # a soft-bounce history naming it as well
        conn.execute("INSERT INTO suppression_soft_bounces (org_id, address, bounce_at)"
                     " VALUES (%s, %s, ARRAY[now()])", (org, rcpt.upper()))
        s3 = stack.objects()
        rep = erasure.erase_address(conn, rules.S3Retention(s3.client, s3.bucket), org,
                                    rcpt.lower())
        assert rep.messages == 1 and rep.suppressions_kept == 1
        named = conn.execute(
            "SELECT (SELECT count(*) FROM suppressions WHERE org_id = %(o)s"
            "        AND (address ILIKE %(a)s OR detail ILIKE '%%' || %(a)s || '%%')),"
            " (SELECT count(*) FROM suppression_soft_bounces WHERE org_id = %(o)s),"
            " (SELECT address FROM suppressions WHERE org_id = %(o)s)",
            {"o": org, "a": rcpt}).fetchone()
    assert named is not None and named[:2] == (0, 0), named
    with stack.connect() as conn:  # nor do the message's delivery events
        events = conn.execute("SELECT count(*) FROM event_outbox WHERE org_id = %s"
                              " AND (recipient ILIKE %s OR payload::text ILIKE %s)",
                              (org, rcpt, f"%{rcpt}%")).fetchone()
    assert events == (0,), events
    assert str(named[2]).startswith("sha256:") and len(str(named[2])) == 71, named
    # Still refused at RCPT, with the reason (policyd may answer from its
    # cache of the send's own lookup for suppression_cache_seconds first).
    until(lambda: _rcpt(stack, f"app@{domain}", rcpt).code == 550,
          "a refusal at RCPT", timeout=30)
    refused = _rcpt(stack, f"app@{domain}", rcpt)
    assert refused.code == 550 and "suppressed: hard bounce on" in refused.text, refused
    assert _entry(stack, org, rcpt) is not None  # found by the address it hides
    # Another organisation's list knows nothing of it.
    _, other_domain = stack.new_org(tier)
    assert _rcpt(stack, f"app@{other_domain}", rcpt).code == 250
    # Removing the address removes the pseudonymous entry too.
    with stack.connect() as conn:
        assert suppression.unsuppress(conn, org, rcpt)
    assert _entry(stack, org, rcpt) is None


def _from_outside(stack: Stack, sender: str, rcpt: str, data: bytes) -> None:
    """Mail from a client off the trusted networks (XCLIENT), as a reader's
    mail server would send it."""
    client = smtp.Client(*stack.smtp)
    try:
        client.xclient("198.51.100.24", "mx.reader.example")
        client.send(sender, [rcpt], data)
    finally:
        client.close()


def _unsubscribe(sender: str, to: str) -> bytes:
    # What a mail client's unsubscribe button sends for
    # List-Unsubscribe: <mailto:RETURN-PATH?subject=unsubscribe>
    return (f"From: <{sender}>\r\nTo: <{to}>\r\nSubject: unsubscribe\r\n"
            f"Message-ID: <{uuid.uuid4().hex}@mx.reader.example>\r\n\r\n"
            "This message was automatically generated by Gmail.\r\n").encode()


def _replies(stack: Stack, mid: uuid.UUID) -> int:
    with stack.connect() as conn:
        row = conn.execute("SELECT count(*) FROM messages WHERE parent_message_id = %s"
                           " AND direction = 'inbound' AND message_type = 'reply'",
                           (mid,)).fetchone()
    return int(row[0]) if row else 0


def test_an_unsubscribe_mail_at_the_return_path_suppresses_that_recipient_only(
        stack: Stack, remote_mx: RemoteMX, tier: str) -> None:
    org, domain = stack.new_org(tier)
    token = uuid.uuid4().hex[:10]
    reader, other, victim = (f"{n}-{token}@mx.test" for n in ("reader", "other", "victim"))
    body = (f"From: news@{domain}\r\nTo: list@{domain}\r\nSubject: news {token}\r\n"
            f"Message-ID: <{token}@{domain}>\r\n\r\nNews.\r\n").encode()
    reply = smtp.send(*stack.smtp, f"news@{domain}", [reader, other], body)
    mid, rpath = stack.sent(reply.queue_id)
    base, _, bounce_domain = rpath.partition("@")

    # Someone the message was not sent to asks, at the plain return path (he
    # may have seen it forwarded): recorded as a reply, nobody suppressed.
    _from_outside(stack, victim, rpath, _unsubscribe(victim, rpath))
    until(lambda: _replies(stack, mid) == 1, "the first request recorded as a reply", 60)
    # A recipient's request at a return path whose MAC does not verify is
    # nobody's: kept as an unmatched report, no reply, no entry.
    forged = f"{base[:-16]}{'0' * 16}@{bounce_domain}"
    assert forged != rpath
    _from_outside(stack, other, forged, _unsubscribe(other, forged))

    def unmatched() -> bool:
        with stack.connect() as conn:
            row = conn.execute("SELECT count(*) FROM unmatched_reports WHERE envelope_to LIKE %s",
                               (f"%{forged.partition('@')[0]}%",)).fetchone()
        return bool(row and row[0])
    until(unmatched, "the forged request kept as an unmatched report", 60)

    # The reader asks at the reader's own VERP return path.
    local, _, rdomain = reader.partition("@")
    verp = f"{base}+{local}={rdomain}@{bounce_domain}"
    _from_outside(stack, reader, verp, _unsubscribe(reader, verp))
    entry = until(lambda: _entry(stack, org, reader), "the reader's unsubscribe recorded", 60)
    assert (entry.reason, entry.source, entry.message_id) == ("unsubscribe", "return_path", mid)
    assert _replies(stack, mid) == 2
    assert _entry(stack, org, victim) is None and _entry(stack, org, other) is None
    refused = until(lambda: (r := _rcpt(stack, f"news@{domain}", reader)).code == 550 and r,
                    "policyd to refuse the unsubscribed reader", timeout=60, interval=0.5)
    assert "suppressed: unsubscribe" in refused.text, refused
    assert _rcpt(stack, f"news@{domain}", other).code == 250
