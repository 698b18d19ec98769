"""Failure paths that need no service stopped, through the real stack.

- postkeep-storage writes the reports waiting in one batch; when the batch
  fails as a whole it writes each report on its own, so one report PostgreSQL
  refuses does not hold back the others in its batch.  The refusal is
  injected in the real database (a trigger on `reports` for that one report);
  the batch is made real by holding the advisory lock the report before it
  takes, while the others queue behind it.
- A DKIM key that does not decrypt (its ciphertext altered, or sealed under
  another master key) is never used: the milter tempfails the message with
  451 4.7.5 naming the key, or, for an organisation that chose to send
  unsigned, lets it out without any signature; either way one log line says why.
- Dictionary training with too few samples fails naming the count and leaves
  no version behind, neither row nor object.
"""

from __future__ import annotations

import hashlib
import os
import re
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime

import psycopg
import pytest
from conftest import StoreMessage, TestOrg
from support import campaign, smtp
from support.sidecar import (
    LogWatch,
    deliver,
    failure_report,
    log_path,
    metric,
    relayed_message,
    statuses,
)
from support.stack import Stack

from postkeep.storage.content import dictionaries
from postkeep.storage.content.dictionaries import DictionaryError
from postkeep.storage.content.objects import S3ObjectStore
from postkeep.storage.metadata import dkim_keys

pytestmark = pytest.mark.stack


# ------------------------------------------------------------ batch fallback


class Refusal:
    """PostgreSQL refusing to record one report (a trigger raising on its row of
    `reports`), until lifted."""

    def __init__(self, stack: Stack) -> None:
        self.stack = stack
        self.name = f"test_refuse_{uuid.uuid4().hex[:12]}"

    def refuse(self, raw: bytes) -> None:
        digest = hashlib.sha256(raw).hexdigest()
        with self.stack.connect() as conn:
            conn.execute(
                f"CREATE FUNCTION {self.name}() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN"
                f" IF NEW.sha256 = '\\x{digest}'::bytea THEN"
                f" RAISE EXCEPTION 'test: report {digest[:16]} refused'; END IF;"
                " RETURN NEW; END $$")
            conn.execute(f"CREATE TRIGGER {self.name} AFTER INSERT ON reports"
                         f" FOR EACH ROW EXECUTE FUNCTION {self.name}()")

    def lift(self) -> None:
        with self.stack.connect() as conn:
            conn.execute(f"DROP TRIGGER IF EXISTS {self.name} ON reports")
            conn.execute(f"DROP FUNCTION IF EXISTS {self.name}()")


@pytest.fixture
def refusal(stack: Stack) -> Iterator[Refusal]:
    r = Refusal(stack)
    try:
        yield r
    finally:
        r.lift()


def _wait(condition: Callable[[], bool], what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"not within {timeout:.0f}s: {what}"
        time.sleep(0.05)


def _waiting_on_advisory_lock(stack: Stack) -> bool:
    with stack.connect() as conn:
        row = conn.execute("SELECT count(*) FROM pg_stat_activity WHERE"
                           " wait_event_type = 'Lock' AND wait_event = 'advisory'").fetchone()
    return bool(row and row[0])


def test_one_report_refused_in_a_batch_does_not_hold_back_the_others(
        stack: Stack, refusal: Refusal) -> None:
    _, domain = stack.new_org("basic")
    tag = uuid.uuid4().hex[:8]
    rcpts = [f"batch{i}-{tag}@sink.test" for i in range(4)]
    mid, path = relayed_message(stack, domain, rcpts)
    first, bad, *good = [failure_report(mid, r) for r in rcpts]
    refusal.refuse(bad)
    received = stack.env["POSTKEEP_STORAGE_METRICS"], 'postkeep_storage_reports_total{kind="dsn"}'
    log = LogWatch(log_path(stack, "storage"))

    hold = stack.connect()
    try:
        with ThreadPoolExecutor(4) as pool:
            # The first report's batch waits on its advisory lock (record_report
            # takes one per report hash), so the next three queue behind it and
            # are written together as the next batch once it is released.
            hold.execute("BEGIN")
            hold.execute("SELECT pg_advisory_xact_lock(hashtextextended(%s, 7))",
                         (hashlib.sha256(first).hexdigest(),))
            replies = [pool.submit(deliver, stack, path, first)]
            _wait(lambda: _waiting_on_advisory_lock(stack), "the first batch waits on its lock")
            before = metric(*received)
            replies += [pool.submit(deliver, stack, path, r) for r in (bad, *good)]
            _wait(lambda: metric(*received) >= before + 3, "the three reports are queued")
            hold.execute("COMMIT")
            answers = [f.result(timeout=60) for f in replies]
    finally:
        hold.close()

    assert [a.code for a in answers] == [250, 451, 250, 250], answers
    assert all(a.text.endswith(" recorded") for a in answers[::2] + answers[3:]), answers
    assert answers[1].text == "4.3.0 postkeep-storage: internal error; try again later"
    log.wait_for(r"batch of 3 reports failed \(RaiseException: test: report [0-9a-f]{16}"
                 r" refused\); writing each on its own")
    want = dict.fromkeys(rcpts, "bounced") | {rcpts[1]: "relayed"}
    assert statuses(stack, mid) == want
    # Nothing is lost: Postfix retries the refused one, recorded once it can be.
    refusal.lift()
    again = deliver(stack, path, bad)
    assert again.code == 250 and again.text.endswith(" recorded"), again
    assert statuses(stack, mid) == dict.fromkeys(rcpts, "bounced")


# ------------------------------------------------------- DKIM key unusable


def _damaged_key(stack: Stack, domain: str, damage: str) -> None:
    """An active key for DOMAIN that the milter's master key cannot open."""
    with stack.connect() as conn, conn.transaction():
        master = (stack.master_key() if damage == "altered"
                  else dkim_keys.MasterKey.from_bytes(os.urandom(32)))
        dkim_keys.create_key(conn, master, domain, "s1", "rsa-sha256",
                             active_from=datetime.now(UTC))
        if damage == "altered":  # one bit of the ciphertext flipped
            conn.execute("UPDATE dkim_keys SET private_key_enc = set_byte(private_key_enc, 5,"
                         " get_byte(private_key_enc, 5) # 1) WHERE domain = %s", (domain,))


def _message(domain: str, token: str) -> bytes:
    return (f"From: app@{domain}\r\nTo: r@sink.test\r\nSubject: dkim {token}\r\n"
            f"X-Test-Token: {token}\r\n\r\nbody\r\n").encode()


_WHY = {"altered": "does not decrypt: the row was altered",
        "other master": "is sealed under master key id"}


@pytest.mark.parametrize("damage", ["altered", "other master"])
def test_a_dkim_key_that_does_not_decrypt_is_never_used(stack: Stack, damage: str) -> None:
    _, strict = stack.new_org("basic", dkim=False, missing_key="tempfail")
    _, lax = stack.new_org("basic", dkim=False, missing_key="unsigned")
    for domain in (strict, lax):
        _damaged_key(stack, domain, damage)
    log = LogWatch(log_path(stack, "milter"))

    token = uuid.uuid4().hex
    with pytest.raises(smtp.SMTPError) as err:
        smtp.send(*stack.smtp, f"app@{strict}", ["r@sink.test"], _message(strict, token))
    reply = err.value.reply
    assert reply.code == 451 and reply.enhanced == "4.7.5", reply
    assert f"postkeep: DKIM key for {strict} unusable: key s1._domainkey.{strict} " \
           f"{_WHY[damage]}" in reply.text, reply.text
    assert reply.text.endswith("; try again later"), reply.text
    log.wait_for(rf"WARNING tempfailed pk_id=\S+ queue_id=\S+ reason='DKIM key for"
                 rf" {re.escape(strict)} unusable: key s1\._domainkey\.{re.escape(strict)}"
                 rf" {_WHY[damage]}")
    with stack.connect() as conn:
        assert conn.execute("SELECT count(*) FROM messages WHERE domain = %s",
                            (strict,)).fetchone() == (0,)

    # The organisation that sends unsigned without a usable key: out, unsigned.
    token = uuid.uuid4().hex
    smtp.send(*stack.smtp, f"app@{lax}", ["r@sink.test"], _message(lax, token))
    assert b"DKIM-Signature" not in stack.sink_copy(token)
    log.wait_for(rf"INFO not signed pk_id=\S+ queue_id=\S+ reason='DKIM key for {re.escape(lax)}"
                 rf" unusable: key s1\._domainkey\.{re.escape(lax)} {_WHY[damage]}")


# ------------------------------------------------------ dictionary training


def test_training_on_too_few_messages_leaves_no_version(
        stack: Stack, db: psycopg.Connection, objects: S3ObjectStore,
        make_org: Callable[..., TestOrg], store_message: StoreMessage) -> None:
    org = make_org("pro")
    for i in range(dictionaries.MIN_SAMPLES - 1):
        data = campaign.message(i, org.domain)
        head, sep, body = data.partition(b"\r\n\r\n")
        store_message(org, parts=(head + sep, body), content_days=30, metadata_days=90)
    with pytest.raises(DictionaryError, match=rf"^\d+ sample messages; at least"
                       rf" {dictionaries.MIN_SAMPLES} needed$"):
        dictionaries.train_for_org(db, objects, org.id, datetime.now(UTC))
    assert dictionaries.list_dictionaries(db, org.id) == []
    assert list(objects.client.list_objects(objects.bucket, prefix=f"dictionaries/{org.id}/",
                                            recursive=True)) == []
