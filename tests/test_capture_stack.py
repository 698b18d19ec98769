"""Capture through real Postfix, PostgreSQL and MinIO: byte-exact, rows right.

For every case of the awkward corpus: the object restored from MinIO equals
what the sink received minus Postfix's own Received: header (which milters
never see), and the rows say the right sender, recipients, size and sha256.
"""

from __future__ import annotations

import hashlib
import subprocess
import uuid

import pytest
from support import corpus, smtp
from support.stack import Stack, strip_received

from postkeep.storage.content.packs import is_pack_key, location

pytestmark = pytest.mark.stack


@pytest.fixture(scope="module")
def org(stack: Stack) -> tuple[uuid.UUID, str]:
    return stack.new_org("pro")


def _row(stack: Stack, queue_id: str) -> dict[str, object]:
    with stack.connect() as conn, conn.cursor() as cur:
        cur.execute("SELECT * FROM messages WHERE queue_id = %s", (queue_id,))
        assert cur.description is not None
        names = [d.name for d in cur.description]
        rows = cur.fetchall()
    assert len(rows) == 1, f"expected one messages row for queue id {queue_id}, got {len(rows)}"
    return dict(zip(names, rows[0], strict=True))


def _recipients(stack: Stack, message_id: object) -> list[tuple[str, str]]:
    with stack.connect() as conn:
        return [(r[0], r[1]) for r in conn.execute(
            "SELECT recipient, status FROM message_recipients WHERE message_id = %s"
            " ORDER BY recipient", (message_id,))]


CASES = [c.name for c in corpus.build("s@x.example", "t")]


@pytest.mark.parametrize("case_name", CASES)
def test_corpus_capture_is_byte_exact(stack: Stack, org: tuple[uuid.UUID, str],
                                      case_name: str) -> None:
    org_id, domain = org
    token = uuid.uuid4().hex
    sender = f"sender@{domain}"
    case = next(c for c in corpus.build(sender, token) if c.name == case_name)
    reply = smtp.send(*stack.smtp, sender, list(case.rcpts), case.data)
    assert reply.queue_id, reply.text

    delivered = stack.sink_copy(f"{token}-{case_name}")
    row = _row(stack, reply.queue_id)
    stored = stack.restored(str(row["object_key"]))

    assert stored == strip_received(delivered)
    assert row["org_id"] == org_id
    assert row["envelope_from"] == sender
    assert row["size"] == len(stored)
    assert bytes(row["sha256"]) == hashlib.sha256(stored).digest()  # type: ignore[arg-type]
    assert row["compressed_size"] > 0
    key = str(row["object_key"])
    # Under the prefix of its retention class (pro: 90 days of content), which
    # one S3 lifecycle rule expires.
    # Its own object, or (layout "packs", storage/content/packs.py) a pack in
    # the same directory that the index names for it.
    assert key.startswith(f"messages/90d/{org_id}/")
    if is_pack_key(key):
        with stack.connect() as conn:
            where = location(conn, row["id"])  # type: ignore[arg-type]
        assert where is not None and where.pack_key == key
    else:
        assert key.endswith(f"/{row['id']}.eml.zst")
    assert f"X-Postkeep-Id: {row['id']}\r\n".encode() in stored
    rcpts = _recipients(stack, row["id"])
    # 'relayed' once Postfix's success notice has reached postkeep-storage.
    assert [r for r, _ in rcpts] == sorted(case.rcpts)
    assert {status for _, status in rcpts} <= {"queued", "relayed"}


def test_client_supplied_id_header_is_replaced(stack: Stack, org: tuple[uuid.UUID, str]) -> None:
    _, domain = org
    token = uuid.uuid4().hex
    forged = str(uuid.uuid4())
    data = (b"From: a@" + domain.encode() + b"\r\nSubject: forged\r\nX-Postkeep-Id: "
            + forged.encode() + b"\r\nX-Test-Token: " + token.encode() + b"\r\n\r\nbody\r\n")
    reply = smtp.send(*stack.smtp, f"a@{domain}", ["r@sink.test"], data)
    delivered = stack.sink_copy(token)
    row = _row(stack, reply.queue_id or "")
    assert forged.encode() not in delivered
    assert delivered.count(b"X-Postkeep-Id:") == 1
    assert f"X-Postkeep-Id: {row['id']}".encode() in delivered


def test_unknown_sender_domain_is_refused_with_reason(stack: Stack) -> None:
    domain = f"nobody-{uuid.uuid4().hex[:8]}.example"
    with pytest.raises(smtp.SMTPError) as err:
        smtp.send(*stack.smtp, f"x@{domain}", ["r@sink.test"],
                  b"From: x@" + domain.encode() + b"\r\n\r\nhi\r\n")
    assert err.value.reply.code == 550
    assert err.value.reply.enhanced == "5.7.1"
    assert domain in err.value.reply.text


def test_sendmail_mail_is_captured(stack: Stack, org: tuple[uuid.UUID, str]) -> None:
    """Mail injected with sendmail(1) goes through non_smtpd_milters."""
    _, domain = org
    token = uuid.uuid4().hex
    sender = f"local@{domain}"
    data = (f"From: {sender}\nTo: r@sink.test\nSubject: via sendmail\n"
            f"X-Test-Token: {token}\n\nbody\n").encode()
    subprocess.run(
        ["/usr/sbin/sendmail", "-C", stack.env["POSTKEEP_POSTFIX_CONFIG_DIR"], "-f", sender,
         "-i", "r@sink.test"], input=data, check=True, timeout=30,
    )
    delivered = stack.sink_copy(token)
    with stack.connect() as conn:
        row = conn.execute(
            "SELECT id, object_key, sha256 FROM messages WHERE envelope_from = %s", (sender,)
        ).fetchone()
    assert row is not None, "sendmail message was not captured"
    stored = stack.restored(row[1])
    assert stored == strip_received(delivered)


def _metric(stack: Stack, name: str) -> float:
    import urllib.request

    with urllib.request.urlopen(stack.env["POSTKEEP_MILTER_METRICS"], timeout=5) as resp:
        text = resp.read().decode()
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"metric {name} not exported")


def test_metrics_count_captures_and_bytes(stack: Stack, org: tuple[uuid.UUID, str]) -> None:
    _, domain = org
    captured = 'postkeep_milter_messages_total{outcome="captured"}'
    refused = 'postkeep_milter_messages_total{outcome="refused"}'
    before = {n: _metric(stack, n) for n in (
        captured, refused, "postkeep_milter_received_bytes_total",
        "postkeep_milter_stored_bytes_total", "postkeep_milter_eom_duration_seconds_count")}
    token = uuid.uuid4().hex
    reply = smtp.send(*stack.smtp, f"m@{domain}", ["r@sink.test"],
                      f"From: m@{domain}\r\nX-Test-Token: {token}\r\n\r\n".encode()
                      + b"metrics body\r\n" * 100)
    with pytest.raises(smtp.SMTPError):
        smtp.send(*stack.smtp, "m@unknown-org.example", ["r@sink.test"], b"Subject: x\r\n\r\n")
    with stack.connect() as conn:
        size, stored = conn.execute("SELECT size, compressed_size FROM messages"
                                    " WHERE queue_id = %s", (reply.queue_id,)).fetchone()
    assert _metric(stack, captured) == before[captured] + 1
    assert _metric(stack, refused) == before[refused] + 1
    assert (_metric(stack, "postkeep_milter_received_bytes_total")
            == before["postkeep_milter_received_bytes_total"] + size)
    assert (_metric(stack, "postkeep_milter_stored_bytes_total")
            == before["postkeep_milter_stored_bytes_total"] + stored)
    assert (_metric(stack, "postkeep_milter_eom_duration_seconds_count")
            >= before["postkeep_milter_eom_duration_seconds_count"] + 2)
