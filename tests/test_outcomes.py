"""Delivery outcomes without Postfix: the envelope encoding, report parsing,
and recording in real PostgreSQL (duplicates, ordering, unmatched reports)."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from functools import partial

import psycopg
import pytest
from support.reports import block, dsn
from support.stack import Stack
from support.wait import until

from postkeep.envelope import (
    client_notify,
    mail_from_params,
    parse_return_path,
    restored_params,
    return_path,
    verify_return_path,
)
from postkeep.storage.reports.dsn import Report, parse_report, status_of
from postkeep.storage.reports.outcomes import (
    DUPLICATE,
    DUPLICATE_UNMATCHED,
    UNMATCHED,
    record_batch,
)

# Markers per test: envelope and parsing are unit, recording needs the stack's PostgreSQL.

T0 = datetime(2026, 11, 25, 10, 0, tzinfo=UTC)
# The return-path key these tests sign and verify with (the stack has its own).
KEY = b"test return-path key, 32 bytes!"


# --------------------------------------------------------------- envelope


@pytest.mark.unit
def test_return_path_round_trips_id_and_expiry() -> None:
    mid = uuid.uuid4()
    expires = datetime(2027, 2, 23, 10, 0, 0, 123456, tzinfo=UTC)
    path = return_path(mid, expires, "bounces.example", KEY)
    assert path.startswith(f"pk-{mid.hex}-") and path.endswith("@bounces.example")
    parsed = parse_return_path(f"<{path.upper()}>")
    assert parsed is not None and parsed.message_id == mid
    assert parsed.expires_at == expires.replace(microsecond=0)
    assert parsed.domain == "bounces.example" and verify_return_path(parsed, KEY) is None
    far = datetime(9999, 12, 31, tzinfo=UTC)
    unlimited = parse_return_path(return_path(mid, far, "b.x", KEY))
    assert unlimited is not None and unlimited.expires_at == datetime(9999, 12, 31, tzinfo=UTC)


@pytest.mark.unit
@pytest.mark.parametrize("address", [
    "pk-1234@b.example", "someone@b.example", "", "pk-" + "g" * 32 + "@b.example",
    "xpk-" + "a" * 32 + "@b.example",
])
def test_not_a_return_path(address: str) -> None:
    assert parse_return_path(address) is None


@pytest.mark.unit
def test_return_paths_from_before_the_mac_name_the_message_but_never_verify() -> None:
    mid = uuid.uuid4()
    for legacy in (f"pk-{mid.hex}@b.example", f"pk-{mid.hex}-6a1b2c3d@b.example"):
        parsed = parse_return_path(legacy)
        assert parsed is not None and parsed.message_id == mid and parsed.mac is None
        assert "no MAC" in (verify_return_path(parsed, KEY) or "")


@pytest.mark.unit
def test_a_return_path_does_not_verify_if_anything_in_it_changes() -> None:
    """A forger knows the id (X-Postkeep-Id) and may have seen other return paths."""
    mid, other = uuid.uuid4(), uuid.uuid4()
    good = return_path(mid, T0, "bounces.example", KEY)
    local, _, domain = good.partition("@")
    _, _, expiry, mac = local.split("-")
    forged = [
        f"pk-{other.hex}-{expiry}-{mac}@{domain}",             # another message, same MAC
        f"pk-{mid.hex}-{int(expiry, 16) + 1:x}-{mac}@{domain}",  # another partition
        f"{local}@bounces.elsewhere.example",                  # another domain
        f"pk-{mid.hex}-{expiry}-{'0' * 16}@{domain}",           # a guessed MAC
        return_path(mid, T0, "bounces.example", b"another platform's key, 32 bytes"),
    ]
    for address in forged:
        parsed = parse_return_path(address)
        assert parsed is not None, address
        assert "does not verify" in (verify_return_path(parsed, KEY) or ""), address
    parsed = parse_return_path(good)
    assert parsed is not None and verify_return_path(parsed, KEY) is None
    assert "no return-path key" in (verify_return_path(parsed, b"") or "")
    with pytest.raises(ValueError, match=r"return_path\.key"):
        return_path(mid, T0, "bounces.example", b"")


@pytest.mark.unit
def test_mail_from_params() -> None:
    mid = uuid.uuid4()
    assert mail_from_params(mid) == f"RET=HDRS ENVID={mid}"


@pytest.mark.unit
@pytest.mark.parametrize(("params", "asked"), [
    (("NOTIFY=FAILURE,DELAY,SUCCESS",), None),             # the filter's "none given"
    (("NOTIFY=success,delay,failure",), "NEVER"),
    (("NOTIFY=SUCCESS,DELAY,FAILURE",), "SUCCESS,DELAY,FAILURE"),
    (("NOTIFY=success,delay,FAILURE", "ORCPT=rfc822;a@b"), "FAILURE"),
    (("ORCPT=rfc822;a@b", "NOTIFY=SUCCESS,DELAY,failure"), "SUCCESS,DELAY"),
    ((), None),                                              # sendmail without -N
    (("NOTIFY=delay,success",), "SUCCESS,DELAY"),            # no filter: the client's own
    (("NOTIFY=NEVER",), "NEVER"),
])
def test_client_notify_decodes_the_command_filter(params: tuple[str, ...],
                                                  asked: str | None) -> None:
    assert client_notify(params) == asked


@pytest.mark.unit
@pytest.mark.parametrize(("params", "restored"), [
    (("NOTIFY=FAILURE,DELAY,SUCCESS",), ""),                 # none given: re-add bare
    (("NOTIFY=success,delay,failure",), "NOTIFY=NEVER"),
    (("NOTIFY=success,delay,FAILURE", "ORCPT=rfc822;a@b"), "ORCPT=rfc822;a@b NOTIFY=FAILURE"),
    (("NOTIFY=SUCCESS,DELAY,FAILURE",), None),               # asked for all: leave it
    ((), None),
    (("NOTIFY=FAILURE",), None),                             # not the filter's: leave it
])
def test_untracked_mail_gets_the_clients_notify_back(params: tuple[str, ...],
                                                     restored: str | None) -> None:
    assert restored_params(params) == restored


# --------------------------------------------------------------- parsing


@pytest.mark.unit
@pytest.mark.parametrize(("action", "status", "want"), [
    ("relayed", "2.0.0", "relayed"), ("delivered", "2.0.0", "delivered"),
    ("expanded", "2.0.0", "delivered"), ("delayed", "4.4.1", "deferred"),
    ("failed", "5.1.1", "bounced"), ("failed", "4.4.7", "expired"),
    ("FAILED", "5.0.0", "bounced"), ("nonsense", "2.0.0", None),
])
def test_status_of(action: str, status: str, want: str | None) -> None:
    assert status_of(action, status) == want


@pytest.mark.unit
def test_postfix_dsn_is_parsed_per_recipient() -> None:
    mid = uuid.uuid4()
    raw = dsn(mid, [
        block("a@x.example", "relayed", "2.0.0", "250 2.0.0 Ok: queued as 123"),
        block("b@x.example", "failed", "5.1.1 (user unknown)",
              "550 5.1.1 <b@x.example>: Recipient address\r\n    rejected"),
        block("c@x.example", "delayed", "4.3.0", "451 4.3.0 try later", original="C@X.example"),
    ])
    r = parse_report(raw, "", [return_path(mid, T0, "b.example", KEY)], T0, KEY)
    assert (r.kind, r.message_id, r.reason) == ("dsn", mid, None)
    got = {o.recipient: (o.status, o.dsn_status, o.remote_mta, o.diagnostic, o.original)
           for o in r.outcomes}
    assert got == {
        "a@x.example": ("relayed", "2.0.0", "mx.remote.example", "250 2.0.0 Ok: queued as 123",
                        None),
        "b@x.example": ("bounced", "5.1.1", "mx.remote.example",
                        "550 5.1.1 <b@x.example>: Recipient address rejected", None),
        "c@x.example": ("deferred", "4.3.0", "mx.remote.example", "451 4.3.0 try later",
                        "C@X.example"),
    }
    assert all(o.event_at == datetime(2026, 11, 25, 10, 0, tzinfo=UTC) for o in r.outcomes)
    assert r.failure


@pytest.mark.unit
def test_envid_or_returned_headers_alone_attribute_nothing() -> None:
    """Both are in every recipient's copy: anyone can quote them."""
    mid = uuid.uuid4()
    by_envid = parse_report(dsn(mid, [block("a@x", "failed", "5.1.1")]), "", ["x@y"], T0, KEY)
    by_header = parse_report(dsn(mid, [block("a@x", "failed", "5.1.1")], envid=False), "",
                             ["x@y"], T0, KEY)
    for r in (by_envid, by_header):
        assert r.message_id is None and r.reason is not None
        assert f"names message {mid}" in r.reason and "not trusted" in r.reason
        assert [(o.recipient, o.status) for o in r.outcomes] == [("a@x", "bounced")]
    nothing = parse_report(dsn(None, [block("a@x", "relayed", "2.0.0")]), "", ["x@y"], T0, KEY)
    assert nothing.message_id is None and nothing.reason == "not sent to a postkeep return path"


@pytest.mark.unit
def test_a_report_at_a_forged_return_path_is_unmatched_with_the_reason() -> None:
    mid = uuid.uuid4()
    forged = f"pk-{mid.hex}@b.example"  # the form any recipient could write from the id
    r = parse_report(dsn(mid, [block("a@x", "failed", "5.1.1")]), "", [forged], T0, KEY)
    assert r.message_id is None and r.expires_at is None
    assert r.reason == f"<{forged}>: the return path carries no MAC (forged, or made before" \
        " return paths were signed)"
    wrong_key = return_path(mid, T0, "b.example", b"another platform's key, 32 bytes")
    r = parse_report(dsn(mid, [block("a@x", "failed", "5.1.1")]), "", [wrong_key], T0, KEY)
    assert r.message_id is None and "does not verify" in (r.reason or "")
    # A verified return path among the recipients is the one that counts.
    good = return_path(mid, T0, "b.example", KEY)
    r = parse_report(dsn(mid, [block("a@x", "failed", "5.1.1")]), "", [forged, good], T0, KEY)
    assert (r.message_id, r.reason) == (mid, None)
    # The sidecar without a key attributes nothing.
    r = parse_report(dsn(mid, [block("a@x", "failed", "5.1.1")]), "", [good], T0, b"")
    assert r.message_id is None and "no return-path key" in (r.reason or "")


@pytest.mark.unit
def test_exim_style_bounce_is_found_by_flufl_bounce() -> None:
    mid = uuid.uuid4()
    raw = (
        "From: Mail Delivery System <Mailer-Daemon@mx.remote.example>\r\n"
        "To: pk-x@b.example\r\nSubject: Mail delivery failed: returning message to sender\r\n"
        "Date: Wed, 25 Nov 2026 11:00:00 +0000\r\n\r\n"
        "This message was created automatically by mail delivery software.\r\n\r\n"
        "A message that you sent could not be delivered to one or more of its\r\n"
        "recipients. This is a permanent error. The following address(es) failed:\r\n\r\n"
        "  gone@remote.example\r\n    mailbox is full\r\n\r\n"
        "------ This is a copy of the message, including all the headers. ------\r\n\r\n"
        f"X-Postkeep-Id: {mid}\r\nSubject: hi\r\n\r\nbody\r\n"
    ).encode()
    r = parse_report(raw, "", [return_path(mid, T0, "b.example", KEY)], T0, KEY)
    assert (r.kind, r.message_id, r.reason) == ("async_bounce", mid, None)
    assert [(o.recipient, o.status) for o in r.outcomes] == [("gone@remote.example", "bounced")]
    assert r.outcomes[0].event_at == datetime(2026, 11, 25, 11, 0, tzinfo=UTC)


QMAIL = (
    "From: MAILER-DAEMON@mx.remote.example\r\nSubject: failure notice\r\n\r\n"
    "Hi. This is the qmail-send program at mx.remote.example.\r\n"
    "I'm afraid I wasn't able to deliver your message to the following addresses.\r\n"
    "This is a permanent error; I've given up. Sorry it didn't work out.\r\n\r\n"
    "<gone@remote.example>:\r\nSorry, no mailbox here by that name. (#5.1.1)\r\n\r\n"
    "--- Below this line is a copy of the message.\r\n\r\nSubject: hi\r\n\r\nbody\r\n"
)
SIMPLE = (
    "From: postmaster@remote.example\r\nSubject: Returned mail\r\n\r\n"
    "The following addresses had permanent fatal errors -----\r\n"
    "<gone@remote.example>\r\n\r\n"
    "----- Transcript of session follows -----\r\n550 unknown\r\n"
)


@pytest.mark.unit
@pytest.mark.parametrize("text", [QMAIL, SIMPLE], ids=["qmail", "simplematch"])
def test_other_common_bounce_formats(text: str) -> None:
    mid = uuid.uuid4()
    r = parse_report(text.encode(), "", [return_path(mid, T0, "b.example", KEY)], T0, KEY)
    assert (r.kind, r.message_id, r.reason) == ("async_bounce", mid, None), r.reason
    assert [(o.recipient, o.status) for o in r.outcomes] == [("gone@remote.example", "bounced")]


@pytest.mark.unit
@pytest.mark.parametrize("raw", [
    b"", b"\x00\xff\xfe garbage", b"Subject: hi\r\n\r\nno bounce here",
    b"Content-Type: multipart/report; report-type=delivery-status; boundary=x\r\n\r\n--x\r\n",
    b"Content-Type: message/delivery-status\r\n\r\nFinal-Recipient: rfc822;\r\nAction:\r\n",
    b"From: a\r\n" * 5000,
    b"Content-Type: multipart/mixed; boundary=\"" + b"a" * 5000 + b"\"\r\n\r\n--a",
])
def test_nasty_reports_become_reports_with_a_reason(raw: bytes) -> None:
    mid = uuid.uuid4()
    r = parse_report(raw, "", [return_path(mid, T0, "b.example", KEY)], T0, KEY)
    assert r.reason, r
    assert not r.outcomes
    assert r.size == len(raw)


# --------------------------------------------------------------- recording


@pytest.fixture
def conn(stack: Stack) -> Iterator[psycopg.Connection]:
    with stack.connect() as c:
        yield c


def _message(conn: psycopg.Connection, stack: Stack, rcpts: list[str]) -> tuple[uuid.UUID,
                                                                                datetime]:
    """A captured message's rows (as the milter writes them); returns (id, expiry)."""
    from postkeep.storage.metadata.messages import CapturedMessage, record_captures

    org, domain = stack.new_org("basic", dkim=False)
    mid = uuid.uuid4()
    expires = datetime.now(UTC).replace(microsecond=0) + timedelta(days=90, microseconds=7)
    record_captures(conn, [CapturedMessage(
        id=mid, org_id=org, domain=domain, queue_id="Q1", envelope_from=f"a@{domain}",
        recipients=tuple(rcpts), size=10, sha256=b"\0" * 32, object_key="k",
        compressed_size=5, created_at=datetime.now(UTC), content_expires_at=expires,
        metadata_expires_at=expires)])
    return mid, expires


def _statuses(conn: psycopg.Connection, mid: uuid.UUID) -> dict[str, tuple[object, ...]]:
    rows = conn.execute("SELECT recipient, status, dsn_status, diagnostic FROM"
                        " message_recipients WHERE message_id = %s", (mid,)).fetchall()
    return {r[0]: tuple(r[1:]) for r in rows}


def _rollup(conn: psycopg.Connection, mid: uuid.UUID) -> str:
    row = conn.execute("SELECT status FROM messages WHERE id = %s", (mid,)).fetchone()
    assert row is not None
    return str(row[0])


@pytest.mark.stack
def test_outcomes_recorded_and_rolled_up(stack: Stack, conn: psycopg.Connection) -> None:
    mid, expires = _message(conn, stack, ["a@x.example", "B@x.example"])
    path = return_path(mid, expires, "b.example", KEY)
    first = parse_report(dsn(mid, [block("a@x.example", "relayed", "2.0.0", "250 ok"),
                                   block("b@x.example", "delayed", "4.2.0", "451 busy")]),
                         "", [path], T0, KEY)
    assert record_batch(conn, [first]) == [2]
    assert _statuses(conn, mid) == {"a@x.example": ("relayed", "2.0.0", "250 ok"),
                                    "B@x.example": ("deferred", "4.2.0", "451 busy")}
    assert _rollup(conn, mid) == "deferred"
    # The same bytes again change nothing.
    assert record_batch(conn, [first]) == [DUPLICATE]
    later = parse_report(dsn(mid, [block("b@x.example", "failed", "5.1.1", "550 gone")],
                             date="Wed, 25 Nov 2026 10:05:00 +0000"), "", [path], T0, KEY)
    assert record_batch(conn, [later]) == [1]
    assert _statuses(conn, mid)["B@x.example"] == ("bounced", "5.1.1", "550 gone")
    assert _rollup(conn, mid) == "partial"
    events = conn.execute("SELECT recipient, status, applied FROM recipient_events"
                          " WHERE message_id = %s ORDER BY event_at, recipient",
                          (mid,)).fetchall()
    assert events == [("B@x.example", "deferred", True), ("a@x.example", "relayed", True),
                      ("B@x.example", "bounced", True)]


@pytest.mark.stack
def test_a_delay_never_replaces_a_final_status(stack: Stack, conn: psycopg.Connection) -> None:
    mid, expires = _message(conn, stack, ["a@x.example"])
    path = return_path(mid, expires, "b.example", KEY)
    relayed = parse_report(dsn(mid, [block("a@x.example", "relayed", "2.0.0", "250 ok")],
                               date="Wed, 25 Nov 2026 10:05:00 +0000"), "", [path], T0, KEY)
    # An older delay notice arriving late, in the same batch, and after it.
    delayed = parse_report(dsn(mid, [block("a@x.example", "delayed", "4.2.0", "451 x")],
                               date="Wed, 25 Nov 2026 10:00:00 +0000"), "", [path], T0, KEY)
    assert record_batch(conn, [relayed, delayed]) == [1, 0]
    assert _statuses(conn, mid)["a@x.example"][0] == "relayed"
    assert _rollup(conn, mid) == "relayed"
    applied = conn.execute("SELECT status, applied FROM recipient_events WHERE message_id = %s"
                           " ORDER BY event_at", (mid,)).fetchall()
    assert applied == [("deferred", False), ("relayed", True)]


@pytest.mark.stack
def test_unknown_message_and_strangers_are_kept_unmatched(stack: Stack,
                                                          conn: psycopg.Connection) -> None:
    ghost = uuid.uuid4()
    r = parse_report(dsn(ghost, [block("a@x", "relayed", "2.0.0")]), "",
                     [return_path(ghost, T0, "b.example", KEY)], T0, KEY)
    assert record_batch(conn, [r]) == [UNMATCHED]
    assert record_batch(conn, [r]) == [DUPLICATE_UNMATCHED]
    reason = conn.execute("SELECT reason FROM unmatched_reports WHERE sha256 = %s",
                          (r.sha256,)).fetchone()
    assert reason is not None and "not found" in reason[0]

    mid, expires = _message(conn, stack, ["a@x.example"])
    stranger = parse_report(dsn(mid, [block("z@elsewhere", "failed", "5.1.1")]), "",
                            [return_path(mid, expires, "b.example", KEY)], T0, KEY)
    assert record_batch(conn, [stranger]) == [UNMATCHED]
    assert _statuses(conn, mid)["a@x.example"][0] == "queued"
    row = conn.execute("SELECT reason FROM unmatched_reports WHERE sha256 = %s",
                       (stranger.sha256,)).fetchone()
    assert row is not None and "z@elsewhere" in row[0]


@pytest.mark.stack
def test_garbage_report_is_recorded_as_unmatched(stack: Stack, conn: psycopg.Connection) -> None:
    r = parse_report(b"\x00garbage " + uuid.uuid4().bytes, "", ["nobody@b.example"], T0, KEY)
    assert record_batch(conn, [r]) == [UNMATCHED]
    kind = conn.execute("SELECT kind FROM reports WHERE sha256 = %s", (r.sha256,)).fetchone()
    assert kind is not None and kind[0] in ("async_bounce", "unparsable")


@pytest.mark.stack
def test_report_partitions_are_made_ahead_and_old_days_dropped(conn: psycopg.Connection) -> None:
    from postkeep.storage.reports.outcomes import maintain_report_partitions

    conn.execute("CREATE TABLE IF NOT EXISTS reports_d20200101 PARTITION OF reports"
                 " FOR VALUES FROM ('2020-01-01 00:00+00') TO ('2020-01-02 00:00+00')")
    conn.execute("INSERT INTO reports (sha256, kind, object_key, size, received_at)"
                 " VALUES (%s, 'dsn', 'k', 1, '2020-01-01 12:00+00')", (uuid.uuid4().bytes * 2,))
    maintain_report_partitions(conn, 3)
    names = {r[0] for r in conn.execute(
        "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid"
        " WHERE i.inhparent = 'reports'::regclass")}
    today = datetime.now(UTC).date()
    assert {f"reports_d{today + timedelta(days=d):%Y%m%d}" for d in (-1, 0, 1, 2)} <= names
    assert "reports_d20200101" not in names
    assert maintain_report_partitions(conn, 3) == 0  # idempotent


def _blocked_on_a_lock(conn: psycopg.Connection, pid: int) -> None:
    def waiting() -> bool:
        row = conn.execute("SELECT wait_event_type FROM pg_stat_activity WHERE pid = %s",
                           (pid,)).fetchone()
        return bool(row and row[0] == "Lock")

    until(waiting, f"backend {pid} to wait on a lock", interval=0.02)


def _report_on(m: tuple[uuid.UUID, datetime], action: str, status: str) -> Report:
    """A DSN for recipient r@x.example of message M = (id, expiry), via its return path."""
    return parse_report(dsn(m[0], [block("r@x.example", action, status)]), "",
                        [return_path(m[0], m[1], "b.example", KEY)], T0, KEY)


@pytest.mark.stack
def test_batches_written_at_once_never_deadlock(stack: Stack, conn: psycopg.Connection) -> None:
    """Two batches naming two messages in opposite orders, lined up behind a
    third transaction's lock, both commit with their own codes.  Written in
    arrival order, the second would hold B and wait for A while the first
    holds A and waits for B: PostgreSQL would abort one (deadlock detected)."""
    (a, a_exp), (b, b_exp) = (_message(conn, stack, ["r@x.example"]) for _ in range(2))
    first, second = sorted([(a, a_exp), (b, b_exp)], key=lambda m: m[0].bytes)
    one = [_report_on(first, "delayed", "4.2.0"), _report_on(second, "delayed", "4.2.0")]
    two = [_report_on(second, "relayed", "2.0.0"), _report_on(first, "relayed", "2.0.0")]
    results: dict[str, list[int] | BaseException] = {}

    def write(name: str, batch: list[Report], pid_box: list[int]) -> None:
        with stack.connect() as c:
            pid_box.append(c.info.backend_pid)
            try:
                results[name] = record_batch(c, batch)
            except BaseException as exc:  # recorded, asserted below
                results[name] = exc

    with stack.connect() as blocker, blocker.transaction():
        blocker.execute("SELECT 1 FROM message_recipients WHERE message_id = %s FOR UPDATE",
                        (first[0],))
        pids: list[list[int]] = [[], []]
        threads = [threading.Thread(target=write, args=("one", one, pids[0])),
                   threading.Thread(target=write, args=("two", two, pids[1]))]
        for t, box in zip(threads, pids, strict=True):
            t.start()
            until(partial(len, box), "the writer's connection", interval=0.01)
            _blocked_on_a_lock(conn, box[0])
    for t in threads:
        t.join(30)
    assert results == {"one": [1, 1], "two": [1, 1]}
    assert _statuses(conn, a)["r@x.example"][0] == "relayed"
    assert _statuses(conn, b)["r@x.example"][0] == "relayed"


@pytest.mark.stack
def test_batch_codes_come_back_in_the_callers_order(stack: Stack,
                                                    conn: psycopg.Connection) -> None:
    """The batch is written in message-id order; each code still answers its own report."""
    (a, a_exp), (b, b_exp) = (_message(conn, stack, ["r@x.example"]) for _ in range(2))
    late, early = sorted([(a, a_exp), (b, b_exp)], key=lambda m: m[0].bytes, reverse=True)
    seen = _report_on(early, "relayed", "2.0.0")
    assert record_batch(conn, [seen]) == [1]
    fresh = _report_on(late, "relayed", "2.0.0")
    ghost = parse_report(dsn(uuid.uuid4(), [block("r@x.example", "relayed", "2.0.0")]), "",
                         ["nobody@b.example"], T0, KEY)
    assert record_batch(conn, [ghost, fresh, seen]) == [UNMATCHED, 1, DUPLICATE]


@pytest.mark.stack
def test_a_one_recipient_message_takes_its_recipients_status(stack: Stack,
                                                             conn: psycopg.Connection) -> None:
    """record_report sets a one-recipient message's status without the roll-up
    aggregate (0011): each step must still leave the message as message_rollup
    over its recipients would."""
    mid, expires = _message(conn, stack, ["solo@x.example"])
    path = return_path(mid, expires, "b.example", KEY)
    steps = [("delayed", "4.2.0", "Wed, 25 Nov 2026 10:00:00 +0000", 1, "deferred"),
             ("delayed", "4.4.1", "Wed, 25 Nov 2026 10:01:00 +0000", 1, "deferred"),
             ("failed", "5.1.1", "Wed, 25 Nov 2026 10:02:00 +0000", 1, "bounced"),
             ("delayed", "4.2.0", "Wed, 25 Nov 2026 10:03:00 +0000", 0, "bounced"),
             ("relayed", "2.0.0", "Wed, 25 Nov 2026 09:00:00 +0000", 0, "bounced")]
    for action, status, date, changed, rollup in steps:
        r = parse_report(dsn(mid, [block("solo@x.example", action, status)], date=date), "",
                         [path], T0, KEY)
        assert record_batch(conn, [r]) == [changed], (action, date)
        assert _rollup(conn, mid) == rollup == _statuses(conn, mid)["solo@x.example"][0]
