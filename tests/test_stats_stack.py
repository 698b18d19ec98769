"""Per-organisation statistics through the real stack (issue 17).

Campaign mail (X-Campaign-Id) goes out through Postfix: to the sink
(relayed, Postfix's success notice recorded by postkeep-storage) and to the
fake remote MX (mx.test: 550 5.1.1, Postfix's failure notice recorded).
From outside come a reply and an out-of-office (both to the sender, linked
by In-Reply-To) and an ARF complaint (marks its recipient complained).
`postkeep stats` gives exact counts and rates per campaign, the dashboard
views give the same to the organisation's tenant login and nothing to
another organisation's, and all of it stays after an erasure and after the
retention run has dropped the messages' metadata.
"""

from __future__ import annotations

import json
import subprocess
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest
from click.testing import CliRunner
from support import smtp
from support.inbound import send_inbound
from support.retention import past_week
from support.smtp_server import RemoteMX, serve_remote_mx
from support.stack import Stack
from support.wait import until

from postkeep import cli
from postkeep.storage.content import sealed_objects
from postkeep.storage.lifecycle import holds, rules
from postkeep.storage.lifecycle.retention import RetentionSettings, run_retention
from postkeep.storage.metadata import tenants

pytestmark = pytest.mark.stack

OUTSIDE = "198.51.100.24"  # TEST-NET-2: off the stack's trusted networks
FINAL = {"relayed", "delivered", "bounced", "complained"}


@pytest.fixture
def remote_mx(stack: Stack) -> Iterator[RemoteMX]:
    with serve_remote_mx(int(stack.env["POSTKEEP_FAKE_MX_PORT"])) as mx:
        yield mx


def _flush(stack: Stack) -> None:
    """postqueue -f: an earlier test may have left mx.test's next hop marked dead."""
    subprocess.run(["postqueue", "-c", stack.env["POSTKEEP_POSTFIX_CONFIG_DIR"], "-f"],
                   check=False, capture_output=True, timeout=30)


def _cli(stack: Stack, *args: str) -> str:
    cli._register()
    result = CliRunner().invoke(cli.cli, ["--config", stack.env["POSTKEEP_CONFIG"], *args])
    assert result.exit_code == 0, result.output
    return result.output


def _sent(stack: Stack, domain: str, rcpt: str, campaign: str | None,
          template: str | None = None) -> dict[str, Any]:
    token = f"st-{uuid.uuid4().hex[:10]}"
    tag = f"X-Campaign-Id: {campaign}\r\n" if campaign else ""
    tag += f"X-Template-Id: {template}\r\n" if template else ""
    data = (f"From: news@{domain}\r\nTo: {rcpt}\r\nSubject: {token}\r\n{tag}"
            f"Message-ID: <{token}@{domain}>\r\n\r\nOffer\r\n").encode()
    reply = smtp.send(*stack.smtp, f"news@{domain}", [rcpt], data)
    with stack.connect() as conn:
        cur = conn.execute("SELECT id, message_id_header, campaign_id FROM messages"
                           " WHERE queue_id = %s", (reply.queue_id,))
        row = cur.fetchone()
    assert row is not None and row[2] == campaign, row
    return {"id": row[0], "msgid": row[1], "rcpt": rcpt}


def _status(stack: Stack, mid: uuid.UUID) -> str:
    with stack.connect() as conn:
        row = conn.execute("SELECT status FROM message_recipients WHERE message_id = %s",
                           (mid,)).fetchone()
    return str(row[0]) if row else ""


def _inbound(stack: Stack, org: uuid.UUID) -> dict[str, uuid.UUID | None]:
    with stack.connect() as conn:
        return {str(t): p for t, p in conn.execute(
            "SELECT message_type, parent_message_id FROM messages"
            " WHERE org_id = %s AND direction = 'inbound'", (org,))}


def _stats(stack: Stack, org: uuid.UUID, by: str, *more: str) -> dict[str, dict[str, Any]]:
    out = json.loads(_cli(stack, "stats", "--org", str(org), "--since", "2d", "--by", by,
                          *more, "--json"))
    return {g["key"]: g for g in out["groups"]}


def _pick(group: dict[str, Any], *keys: str) -> tuple[Any, ...]:
    return tuple(group[k] for k in keys)


COUNTS = ("messages", "sent", "delivered", "bounced", "complained", "replied", "auto_replied",
          "delivery_rate", "bounce_rate", "complaint_rate", "reply_rate")


def _connect_as(stack: Stack, role: str, password: str) -> psycopg.Connection:
    pg = stack.config.postgres
    return psycopg.connect(host=pg.host, port=pg.port, dbname=pg.dbname, user=role,
                           password=password, autocommit=True)


def _dashboard(conn: psycopg.Connection) -> dict[str, Any]:
    return {
        "orgs": {r[0] for r in conn.execute("SELECT org_id FROM stats_daily")},
        "campaigns": {r[0]: (int(r[1]), int(r[2]), int(r[3]), int(r[4]), int(r[5]))
                      for r in conn.execute(
                          "SELECT campaign_id, sent, delivered, bounced, complained, replied"
                          " FROM stats_campaigns")},
        "templates": {r[0]: int(r[1]) for r in conn.execute(
            "SELECT tag_value, sent FROM stats_tags WHERE tag_key = 'template_id'")},
    }


def _tenant_login(stack: Stack, org: uuid.UUID) -> tuple[str, str]:
    role, password = f"stats_{uuid.uuid4().hex[:10]}", uuid.uuid4().hex
    with stack.connect() as conn:
        conn.execute(f"CREATE ROLE \"{role}\" LOGIN PASSWORD '{password}'")
        tenants.grant_role(conn, org, role)
    return role, password


def _drop_login(stack: Stack, role: str) -> None:
    with stack.connect() as conn:
        conn.execute("DELETE FROM tenant_roles WHERE role_name = %s", (role,))
        conn.execute(f'DROP OWNED BY "{role}"')
        conn.execute(f'DROP ROLE "{role}"')


def test_campaign_rates_exact_for_the_tenant_only_and_kept_after_expiry(
        stack: Stack, remote_mx: RemoteMX) -> None:
    org, domain = stack.new_org()
    other, other_domain = stack.new_org()
    _cli(stack, "domain", "set-inbound", domain, "--archive-only")
    # Statistics per template too (0029): counted once the key is listed.
    added = "template_id" not in json.loads(_cli(stack, "stats-tags", "list", "--json"))
    _cli(stack, "stats-tags", "add", "template_id")
    spring, autumn = f"spring-{uuid.uuid4().hex[:6]}", f"autumn-{uuid.uuid4().hex[:6]}"
    welcome, promo = f"welcome-{uuid.uuid4().hex[:6]}", f"promo-{uuid.uuid4().hex[:6]}"
    u = uuid.uuid4().hex[:8]
    replied = _sent(stack, domain, f"r1-{u}@sink.test", spring, welcome)
    complained = _sent(stack, domain, f"c2-{u}@sink.test", spring, welcome)
    bounced = _sent(stack, domain, f"unknown-{u}@mx.test", spring, promo)
    away = _sent(stack, domain, f"a4-{u}@sink.test", spring, promo)
    plain = _sent(stack, domain, f"p5-{u}@sink.test", autumn, promo)
    untagged = _sent(stack, domain, f"n6-{u}@sink.test", None)
    foreign = _sent(stack, other_domain, f"x7-{u}@sink.test", spring,
                    welcome)  # same campaign and template
    every = (replied, complained, bounced, away, plain, untagged, foreign)
    deadline = time.monotonic() + 90
    while {_status(stack, m["id"]) for m in every} - FINAL:  # bounded by the deadline
        assert time.monotonic() < deadline, [_status(stack, m["id"]) for m in every]
        _flush(stack)
        time.sleep(1)
    assert _status(stack, bounced["id"]) == "bounced"

    # A reply and an out-of-office (null sender, RFC 3834) to the sender.
    send_inbound(stack, f"news@{domain}", (
        f"From: Reader <{replied['rcpt']}>\r\nTo: news@{domain}\r\nSubject: re {u}\r\n"
        f"In-Reply-To: {replied['msgid']}\r\n\r\nYes please.\r\n").encode(), replied["rcpt"],
        client_ip=OUTSIDE)
    send_inbound(stack, f"news@{domain}", (
        f"From: {away['rcpt']}\r\nTo: news@{domain}\r\nSubject: Out of office {u}\r\n"
        f"Auto-Submitted: auto-replied\r\nIn-Reply-To: {away['msgid']}\r\n\r\n"
        "I am away.\r\n").encode(), "", client_ip=OUTSIDE)
    send_inbound(stack, f"news@{domain}", (
        f"From: feedback@fbl.example\r\nTo: news@{domain}\r\nSubject: arf {u}\r\n"
        "MIME-Version: 1.0\r\nContent-Type: multipart/report; report-type=feedback-report;"
        ' boundary="b1"\r\n\r\n--b1\r\nContent-Type: text/plain\r\n\r\nA complaint.\r\n'
        "--b1\r\nContent-Type: message/feedback-report\r\n\r\nFeedback-Type: abuse\r\n"
        f"User-Agent: fbl/1.0\r\nVersion: 1\r\nOriginal-Rcpt-To: <{complained['rcpt']}>"
        "\r\n\r\n--b1\r\nContent-Type: message/rfc822\r\n\r\n"
        f"From: news@{domain}\r\nTo: {complained['rcpt']}\r\n"
        f"Message-ID: {complained['msgid']}\r\nSubject: offer\r\n\r\nOffer\r\n"
        "--b1--\r\n").encode(), "", client_ip=OUTSIDE)
    until(lambda: _inbound(stack, org) == {"reply": replied["id"],
                                           "auto_reply": away["id"],
                                           "complaint": complained["id"]},
          "the reply, out-of-office and complaint captured and linked")
    until(lambda: _status(stack, complained["id"]) == "complained", "the complaint recorded")

    want_spring = (4, 4, 3, 1, 1, 1, 1, 0.75, 0.25, 0.25, 0.25)
    want_autumn = (1, 1, 1, 0, 0, 0, 0, 1.0, 0.0, 0.0, 0.0)
    want_welcome = (2, 2, 2, 0, 1, 1, 0, 1.0, 0.0, 0.5, 0.5)
    want_promo = (3, 3, 2, 1, 0, 0, 1, 0.6667, 0.3333, 0.0, 0.0)

    def check(stage: str) -> None:
        by_campaign = _stats(stack, org, "campaign")
        assert sorted(by_campaign) == sorted([spring, autumn]), stage
        assert _pick(by_campaign[spring], *COUNTS) == want_spring, stage
        assert _pick(by_campaign[autumn], *COUNTS) == want_autumn, stage
        by_template = _stats(stack, org, "tag", "--tag", "template_id")
        assert sorted(by_template) == sorted([welcome, promo]), stage
        assert _pick(by_template[welcome], *COUNTS) == want_welcome, stage
        assert _pick(by_template[promo], *COUNTS) == want_promo, stage
        by_type = _stats(stack, org, "type")
        assert {k: (g["messages"], g["sent"]) for k, g in by_type.items()} == {
            "email": (6, 6), "reply": (1, 1), "auto_reply": (1, 1), "complaint": (1, 1)}, stage
        by_dir = _stats(stack, org, "direction")
        assert {k: g["messages"] for k, g in by_dir.items()} == {
            "outbound": 6, "inbound": 3}, stage
        today = datetime.now(UTC).date().isoformat()
        by_day = _stats(stack, org, "day")
        assert _pick(by_day[today], "messages", "sent", "bounced", "complained", "replied",
                     "auto_replied") == (9, 9, 1, 1, 1, 1), stage

    check("live")
    # The dashboard: the organisation's tenant login sees its own rows, with
    # the same figures; another organisation's login sees none of them.
    mine, theirs = _tenant_login(stack, org), _tenant_login(stack, other)
    try:
        with _connect_as(stack, *mine) as conn:
            seen = _dashboard(conn)
        assert seen["orgs"] == {org}
        assert seen["campaigns"] == {spring: (4, 3, 1, 1, 1), autumn: (1, 1, 0, 0, 0)}
        assert seen["templates"] == {welcome: 2, promo: 3}
        with _connect_as(stack, *theirs) as conn:
            seen = _dashboard(conn)
            assert org not in seen["orgs"]
            assert seen["campaigns"] == {spring: (1, 1, 0, 0, 0)}
            assert seen["templates"] == {welcome: 1}
            conn.execute("SELECT set_config('postkeep.org_id', %s, false)", (str(org),))
            assert org not in _dashboard(conn)["orgs"]
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute("SELECT * FROM message_stats_dropped")
    finally:
        _drop_login(stack, mine[0])
        _drop_login(stack, theirs[0])

    # Erasure redacts the addresses: counts stay.
    _cli(stack, "erase", "--org", str(org), "--address", replied["rcpt"], "--yes")
    check("after erasure")

    # Metadata expiry: the organisation's rows are moved into a week of their
    # own far in the past (never a live partition other tests capture into)
    # and the retention run drops it.
    with stack.connect() as conn:
        week = past_week(conn)
        stamp = week.monday + timedelta(days=1)
        with conn.transaction():
            for table in ("messages", *holds.child_tables(conn)):
                conn.execute(f"UPDATE {table} SET metadata_expires_at = %s"
                             " WHERE org_id = %s", (stamp, org))
        objects = stack.objects()
        report = run_retention(conn, rules.S3Retention(objects.client, objects.bucket),
                               settings=RetentionSettings(content_expiry="sweep"),
                               sweep_from=datetime.now(UTC) - timedelta(days=1))
        assert week.messages in report.partitions_dropped, report.errors
        left = conn.execute("SELECT count(*) FROM messages WHERE org_id = %s",
                            (org,)).fetchone()
    assert left == (0,)
    check("after the metadata expired")
    if added:  # other tests' rollups need not count it
        _cli(stack, "stats-tags", "remove", "template_id", "--yes")


def test_out_of_office_at_the_return_path_is_an_inbound_auto_reply_linked_to_its_message(
        stack: Stack) -> None:
    org, domain = stack.new_org()
    campaign = f"ooo-{uuid.uuid4().hex[:6]}"
    sent = _sent(stack, domain, f"away-{uuid.uuid4().hex[:8]}@sink.test", campaign)
    until(lambda: _status(stack, sent["id"]) == "relayed", "the message relayed")
    with stack.connect() as conn:
        row = conn.execute("SELECT return_path FROM messages WHERE id = %s",
                           (sent["id"],)).fetchone()
    assert row is not None and str(row[0]).startswith("pk-")
    token = f"ooo-{uuid.uuid4().hex[:10]}"
    ooo = (f"From: {sent['rcpt']}\r\nTo: {row[0]}\r\nSubject: Out of office: {token}\r\n"
           "Auto-Submitted: auto-replied\r\nX-Auto-Response-Suppress: All\r\n"
           f"Message-ID: <{token}@sink.test>\r\n\r\nI am away until Monday.\r\n").encode()
    # A remote server's out-of-office to the return path, through Postfix
    # (relay_domains, then the bundle's transport to postkeep-storage), twice.
    for _ in range(2):
        send_inbound(stack, str(row[0]), ooo, "", client_ip=OUTSIDE)

    def inbound() -> list[tuple[Any, ...]]:
        with stack.connect() as conn:
            return conn.execute(
                "SELECT id, org_id, direction, message_type, parent_message_id, object_key"
                " FROM messages WHERE subject = %s", (f"Out of office: {token}",)).fetchall()
    rows = until(inbound, "the out-of-office recorded as an inbound message")
    _, row_org, direction, mtype, parent, key = rows[0]
    assert (row_org, direction, mtype, parent) == (org, "inbound", "auto_reply", sent["id"])
    kept = stack.restored(key)  # as delivered: Postfix added Received: and Date:
    assert f"Message-ID: <{token}@sink.test>\r\n".encode() in kept
    assert kept.endswith(b"\r\n\r\nI am away until Monday.\r\n")
    # Sealed in its own object under its own data key (sealed_objects.py).
    assert b"".join(stack.objects().get(key))[:4] == sealed_objects.MAGIC
    with stack.connect() as conn:
        assert conn.execute("SELECT count(*) FROM message_keys WHERE message_id = %s",
                            (rows[0][0],)).fetchone() == (1,)
    assert _inbound(stack, org) == {"auto_reply": sent["id"]}
    with stack.connect() as conn:
        unmatched = conn.execute("SELECT count(*) FROM unmatched_reports WHERE subject = %s",
                                 (f"Out of office: {token}",)).fetchone()
        answered = conn.execute("SELECT auto_replied_at IS NOT NULL, replied_at IS NULL"
                                " FROM message_recipients WHERE message_id = %s",
                                (sent["id"],)).fetchone()
    assert unmatched == (0,) and answered == (True, True)
    # The second delivery of the same bytes recorded nothing more.
    log = Path(stack.env["POSTKEEP_POSTFIX_LOG"])
    until(lambda: "already recorded as message" in log.read_text(errors="replace"),
          "the second copy answered as a duplicate (Postfix's log of the LMTP reply)")
    assert len(inbound()) == 1
    by_campaign = _stats(stack, org, "campaign")
    assert _pick(by_campaign[campaign], "sent", "delivered", "auto_replied", "replied") == (
        1, 1, 1, 0)
