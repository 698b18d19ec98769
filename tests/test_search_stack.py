"""`postkeep messages search` and the same search on dashboard logins (issue 17).

Mail for two organisations goes through the real Postfix, milter and
PostgreSQL; then it is searched with the CLI (owner) and with
storage.metadata.messages.list_messages on each organisation's own database
login (a LOGIN role granted with `tenant grant`, over TCP with its own
password): every filter finds the organisation's own messages and never the
other's, also when the caller tries to widen it (LIKE wildcards in the
subject, another organisation's id in the filter, postkeep.org_id set).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta

import psycopg
import pytest
from click.testing import CliRunner
from conftest import unique_name
from psycopg import sql
from support import smtp
from support.stack import Stack
from support.wait import until

from postkeep import cli
from postkeep.storage.metadata import messages, tenants
from postkeep.storage.metadata.search import MessageFilter

pytestmark = pytest.mark.stack

# Same subject in both organisations; the second subject differs from the
# first only where the first has the LIKE wildcards % and _.
SUBJECT = "Invoice 100% off_sale"
LOOKALIKE = "Invoice 1000 offXsale"


@dataclass(frozen=True)
class Sent:
    org_id: uuid.UUID
    queue_id: str
    sender: str
    recipient: str
    campaign: str


@dataclass(frozen=True)
class Orgs:
    a: list[Sent]  # [SUBJECT, LOOKALIKE] of organisation A
    b: list[Sent]  # [SUBJECT] of organisation B
    token: str


def _send(stack: Stack, org_id: uuid.UUID, sender: str, rcpt: str, subject: str,
          campaign: str, token: str) -> Sent:
    data = (f"From: {sender}\r\nTo: {rcpt}\r\nSubject: {subject} {token}\r\n"
            f"X-Campaign-Id: {campaign}\r\nMessage-ID: <{uuid.uuid4().hex}@search.test>\r\n"
            f"X-Test-Token: {token}\r\n\r\nHello.\r\n").encode()
    reply = smtp.send(*stack.smtp, sender, [rcpt], data)
    assert reply.queue_id is not None, reply
    return Sent(org_id, reply.queue_id, sender, rcpt, campaign)


@pytest.fixture(scope="module")
def orgs(stack: Stack) -> Orgs:
    """Two organisations' mail, captured and delivered (recipient status final)."""
    token = uuid.uuid4().hex[:10]
    (a_id, a_dom), (b_id, b_dom) = stack.new_org("pro"), stack.new_org("pro")
    campaign = f"spring-{token}"
    a = [_send(stack, a_id, f"app@{a_dom}", f"r1-{token}@sink.test", SUBJECT, campaign, token),
         _send(stack, a_id, f"news@{a_dom}", f"R2-{token}@sink.test", LOOKALIKE,
               f"other-{token}", token)]
    b = [_send(stack, b_id, f"app@{b_dom}", f"r1-{token}@sink.test", SUBJECT, campaign, token)]
    queue_ids = [s.queue_id for s in a + b]

    def settled() -> bool:
        with stack.connect() as conn:
            row = conn.execute(
                "SELECT count(*) FILTER (WHERE r.status <> 'queued') FROM messages m"
                " JOIN message_recipients r ON r.message_id = m.id"
                " WHERE m.queue_id = ANY(%s)", (queue_ids,)).fetchone()
        return row is not None and row[0] == len(queue_ids)
    until(settled, "the three messages captured with a final recipient status", timeout=120)
    return Orgs(a, b, token)


def _cli(stack: Stack, *args: str) -> list[dict[str, object]]:
    cli._register()
    out = CliRunner().invoke(cli.cli, ["--config", stack.env["POSTKEEP_CONFIG"], "messages",
                                       "search", "--json", *args])
    assert out.exit_code == 0, out.output
    found: list[dict[str, object]] = json.loads(out.stdout)["messages"]
    return found


def _status(stack: Stack, sent: Sent) -> str:
    with stack.connect() as conn:
        row = conn.execute("SELECT r.status FROM messages m JOIN message_recipients r"
                           " ON r.message_id = m.id WHERE m.queue_id = %s",
                           (sent.queue_id,)).fetchone()
    assert row is not None
    return str(row[0])


def test_cli_search_finds_by_every_filter_newest_first_with_cursor(stack: Stack,
                                                                   orgs: Orgs) -> None:
    a1, a2 = orgs.a
    org = str(a1.org_id)

    def qids(*args: str) -> list[object]:
        return [m["queue_id"] for m in _cli(stack, "--org", org, *args)]

    assert qids("--subject", orgs.token) == [a2.queue_id, a1.queue_id]  # newest first
    assert qids("--subject", "100% OFF_") == [a1.queue_id]  # literal, case-insensitive
    assert qids("--sender", a1.sender.upper()) == [a1.queue_id]
    assert qids("--recipient", a2.recipient.lower()) == [a2.queue_id]
    assert qids("--tag", f"campaign_id={a1.campaign}") == [a1.queue_id]
    status = _status(stack, a1)
    assert qids("--subject", orgs.token, "--status", status) == [a2.queue_id, a1.queue_id]
    assert qids("--subject", orgs.token, "--status", "complained") == []
    assert qids("--recipient", a1.recipient, "--status", status) == [a1.queue_id]
    assert qids("--subject", orgs.token, "--direction", "outbound",
                "--type", "email") == [a2.queue_id, a1.queue_id]
    assert qids("--subject", orgs.token, "--direction", "inbound") == []
    assert qids("--subject", orgs.token, "--type", "reply") == []
    assert qids("--subject", orgs.token, "--since", "1h") == [a2.queue_id, a1.queue_id]
    assert qids("--subject", orgs.token, "--until", "1h") == []
    # one per page: the cursor leads from the newest to the older one, then ends
    cli._register()
    first = CliRunner().invoke(cli.cli, ["--config", stack.env["POSTKEEP_CONFIG"], "messages",
                                         "search", "--org", org, "--subject", orgs.token,
                                         "--limit", "1", "--json"])
    page = json.loads(first.stdout)
    assert [m["queue_id"] for m in page["messages"]] == [a2.queue_id] and page["next_cursor"]
    assert qids("--subject", orgs.token, "--limit", "1",
                "--cursor", page["next_cursor"]) == [a1.queue_id]


@dataclass(frozen=True)
class Login:
    role: str
    password: str


@pytest.fixture
def logins(stack: Stack, orgs: Orgs) -> Iterator[dict[uuid.UUID, Login]]:
    """A dashboard login (LOGIN role, own password) per organisation; dropped after."""
    made: dict[uuid.UUID, Login] = {}
    with stack.connect() as db:
        try:
            for org_id in (orgs.a[0].org_id, orgs.b[0].org_id):
                login = Login(unique_name("dash").replace("-", "_"), uuid.uuid4().hex)
                db.execute(sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(
                    sql.Identifier(login.role), sql.Literal(login.password)))
                made[org_id] = login
                tenants.grant_role(db, org_id, login.role)
            yield made
        finally:
            for login in made.values():
                db.execute("DELETE FROM tenant_roles WHERE role_name = %s", (login.role,))
                db.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(login.role)))
                db.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(login.role)))


def _connect(stack: Stack, login: Login, options: str = "") -> psycopg.Connection:
    pg = stack.config.postgres
    return psycopg.connect(host=pg.host, port=pg.port, dbname=pg.dbname, user=login.role,
                           password=login.password, autocommit=True, options=options)


def test_dashboard_logins_find_only_their_own_messages_with_every_filter(
        stack: Stack, orgs: Orgs, logins: dict[uuid.UUID, Login]) -> None:
    since = datetime.now(UTC) - timedelta(hours=1)
    for mine, theirs in ((orgs.a, orgs.b), (orgs.b, orgs.a)):
        first = mine[0]
        other = theirs[0].org_id
        status = _status(stack, first)
        mine_q = {s.queue_id for s in mine}
        filters = [
            MessageFilter(subject=orgs.token),
            MessageFilter(subject=SUBJECT),
            MessageFilter(sender=first.sender),
            MessageFilter(recipient=first.recipient.upper()),  # same address in both orgs
            MessageFilter(tags=(("campaign_id", first.campaign),)),  # same campaign in both
            MessageFilter(status=status, subject=orgs.token),
            MessageFilter(direction="outbound", message_type="email", subject=orgs.token),
            MessageFilter(since=since, subject=orgs.token),
        ]
        # and the attacker's: another organisation's id, postkeep.org_id set to it
        for options in ("", f"-c postkeep.org_id={other}"):
            with _connect(stack, logins[first.org_id], options) as conn:
                for f in filters:
                    found = {m.queue_id for m in messages.list_messages(conn, f)}
                    assert found and found <= mine_q, (f, found)
                    assert {m.org_id for m in messages.list_messages(conn, f)} == {
                        first.org_id}
                assert messages.list_messages(
                    conn, replace(filters[0], org_id=other)) == []
                # wildcards are literal: "%" alone matches only subjects with a "%"
                assert {m.queue_id for m in messages.list_messages(
                    conn, MessageFilter(subject="%", since=since))} == {first.queue_id}
                assert messages.list_messages(
                    conn, MessageFilter(subject=f"{orgs.token[:3]}_{orgs.token[4:]}")) == []
    # A's lookalike subject is not matched by A's literal % and _
    with _connect(stack, logins[orgs.a[0].org_id]) as conn:
        literal = [m.queue_id for m in messages.list_messages(
            conn, MessageFilter(subject="100% off_", since=since))]
        assert literal == [orgs.a[0].queue_id]
