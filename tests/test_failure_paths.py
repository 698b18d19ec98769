"""Failure paths through the real stack with a service stopped or failing.

- postkeep-storage with S3 down: a report it must keep (unmatched, or
  unparsable) is answered 451 4.3.0 naming s3, and nothing is lost: once
  MinIO is back, Postfix's retry is kept (row and object, restorable).
- postkeep-storage with PostgreSQL down while reports wait in a batch: every
  one is answered 451 naming postgres at once, not after one timeout per report.
- A failure notice the organisation asked to have forwarded, with the
  forward relay unreachable or refusing for now: the outcome is recorded but
  the report is answered 451 (Postfix retries; the retry only forwards), so
  the notice is never silently dropped; a permanent refusal is logged and
  counted, not retried.
- postkeep-policyd in lease mode with PostgreSQL stopped: it spends the block
  it holds without PostgreSQL, then decides in degraded mode (its share of
  the limit); once PostgreSQL is back it leases again, and the shared counter
  holds exactly what the leases admitted.
- Dictionary training with S3 failing (while reading samples, or between
  reading them and storing the dictionary): an error naming s3, and the
  current version stays current, with no new row or object.
"""

from __future__ import annotations

import hashlib
import re
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, BinaryIO

import psycopg
import pytest
import zstandard
from conftest import StoreMessage, TestOrg
from support import campaign, smtp
from support.daemon_settings import daemon_settings
from support.policyd import PolicyClient, config_with, free_port, policyds, request
from support.reports import block, dsn
from support.sidecar import (
    LogWatch,
    deliver,
    failure_report,
    log_path,
    metric,
    relayed_message,
    statuses,
)
from support.smtp_server import smtp_server
from support.stack import Stack

from postkeep.config import Config
from postkeep.envelope import return_path
from postkeep.storage.content import dictionaries
from postkeep.storage.content.objects import S3ObjectStore
from postkeep.storage.metadata.db import BackendError
from postkeep.storage.reports.outcomes import report_key

pytestmark = pytest.mark.outage



def _cli(stack: Stack, *args: str) -> subprocess.CompletedProcess[str]:
    """`postkeep ARGS` as an operator runs it, against the stack's configuration."""
    return subprocess.run(
        [str(Path(stack.env["POSTKEEP_STACK_VENV"]) / "bin" / "postkeep"), "--config",
         stack.env["POSTKEEP_CONFIG"], *args],
        capture_output=True, text=True, cwd="/", timeout=120)


@contextmanager
def stopped(stack: Stack, service: str) -> Iterator[None]:
    """SERVICE stopped for real inside the block, started again however it ends."""
    stack.stack_ctl("stop", service)
    try:
        yield
    finally:
        stack.stack_ctl("start", service)


def _wait(condition: Callable[[], bool], what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"not within {timeout:.0f}s: {what}"
        time.sleep(0.05)


def _until_accepted(stack: Stack, path: str, report: bytes, timeout: float = 30) -> smtp.Reply:
    """REPORT delivered until the sidecar takes it (its backends just came back)."""
    deadline = time.monotonic() + timeout
    while True:
        reply = deliver(stack, path, report)
        if reply.code == 250 or time.monotonic() > deadline:
            return reply
        assert reply.code == 451, reply
        time.sleep(0.5)


# ------------------------------------------------- S3 down, a report to keep


def _object(stack: Stack, key: str) -> bytes | None:
    try:
        return zstandard.ZstdDecompressor().decompressobj().decompress(stack.stored(key))
    except BackendError:
        return None


def test_reports_to_keep_while_s3_is_down_are_tempfailed_then_kept(stack: Stack) -> None:
    """Through Postfix: a remote server's report about a message postkeep does not
    know, which must be kept as unmatched, arrives while MinIO is stopped."""
    ghost = uuid.uuid4()
    path = return_path(ghost, datetime.now(UTC) + timedelta(days=30),
                       stack.env["POSTKEEP_BOUNCE_DOMAIN"], stack.config.return_path.key_bytes())
    token = uuid.uuid4().hex
    report = dsn(ghost, [block(f"gone-{token}@remote.example", "failed", "5.1.1")])
    garbage = f"not a report at all {token}\r\n".encode()
    postfix_log = LogWatch(Path(stack.env["POSTKEEP_POSTFIX_LOG"]))
    with stopped(stack, "minio"):
        smtp.send(*stack.smtp, "", [path], report)
        deferred = postfix_log.wait_for(
            rf"to=<{re.escape(path)}>.*status=deferred \(.*said: (451 4\.3\.0 [^(]*)")
        assert deferred.group(1).strip() == \
            "451 4.3.0 postkeep-storage: s3 unavailable; try again later"
        # An unparsable one is kept before it is recorded: nothing recorded yet.
        refused = deliver(stack, path, garbage)
        assert (refused.code, refused.text) == (
            451, "4.3.0 postkeep-storage: s3 unavailable; try again later")
        with stack.connect() as conn:
            assert conn.execute("SELECT count(*) FROM unmatched_reports WHERE sha256 = %s",
                                (hashlib.sha256(garbage).digest(),)).fetchone() == (0,)
    subprocess.run(["postqueue", "-c", stack.env["POSTKEEP_POSTFIX_CONFIG_DIR"], "-f"],
                   check=True, timeout=30)
    postfix_log.wait_for(rf"to=<{re.escape(path)}>.*status=sent \(250 2\.0\.0 report"
                         r" [0-9a-f]{16} already recorded\)")
    kept = _until_accepted(stack, path, garbage)
    assert kept.code == 250 and kept.text.endswith(" kept as unmatched"), kept

    with stack.connect() as conn:
        rows = conn.execute("SELECT sha256, object_key, reason FROM unmatched_reports"
                            " WHERE envelope_to = %s ORDER BY received_at", (path,)).fetchall()
    assert len(rows) == 2, rows
    (dsn_sha, dsn_key, dsn_reason), (garbage_sha, garbage_key, _) = rows
    assert f"message {ghost} not found" in dsn_reason
    delivered = _object(stack, dsn_key)
    assert delivered is not None and hashlib.sha256(delivered).digest() == bytes(dsn_sha)
    assert f"gone-{token}@remote.example".encode() in delivered
    assert (bytes(garbage_sha), garbage_key) == (hashlib.sha256(garbage).digest(),
                                                 report_key(hashlib.sha256(garbage).digest()))
    assert _object(stack, garbage_key) == garbage


# ------------------------------------------- PostgreSQL down, a batch waiting


def _waiting_on_advisory_lock(stack: Stack) -> bool:
    with stack.connect() as conn:
        row = conn.execute("SELECT count(*) FROM pg_stat_activity WHERE"
                           " wait_event_type = 'Lock' AND wait_event = 'advisory'").fetchone()
    return bool(row and row[0])


def test_a_batch_waiting_when_postgres_goes_down_is_tempfailed_at_once(stack: Stack) -> None:
    _, domain = stack.new_org("basic")
    tag = uuid.uuid4().hex[:8]
    rcpts = [f"down{i}-{tag}@sink.test" for i in range(4)]
    mid, path = relayed_message(stack, domain, rcpts)
    reports = [failure_report(mid, r) for r in rcpts]
    received = stack.env["POSTKEEP_STORAGE_METRICS"], 'postkeep_storage_reports_total{kind="dsn"}'
    log = LogWatch(log_path(stack, "storage"))
    hold = stack.connect()
    with ThreadPoolExecutor(4) as pool:
        # The first report's batch waits on its advisory lock (record_report
        # takes one per report hash); the other three queue as the next batch.
        hold.execute("BEGIN")
        hold.execute("SELECT pg_advisory_xact_lock(hashtextextended(%s, 7))",
                     (hashlib.sha256(reports[0]).hexdigest(),))
        replies = [pool.submit(deliver, stack, path, reports[0])]
        _wait(lambda: _waiting_on_advisory_lock(stack), "the first batch waits on its lock")
        before = metric(*received)
        replies += [pool.submit(deliver, stack, path, r) for r in reports[1:]]
        _wait(lambda: metric(*received) >= before + 3, "the three reports are queued")
        with stopped(stack, "postgres"):
            answers = [f.result(timeout=120) for f in replies]
    hold.close()
    assert [(a.code, a.text) for a in answers] == [
        (451, "4.3.0 postkeep-storage: postgres unavailable; try again later")] * 4
    log.wait_for(r"batch of 3 reports failed \(BackendError: postgres: [^)]*\); writing each"
                 r" on its own")
    log.wait_for(r"postgres: [^\n]*; the batch's 2 other report\(s\) tempfail without trying")
    # Postfix retries them once PostgreSQL is back: all recorded.
    for r in reports:
        again = _until_accepted(stack, path, r)
        assert again.code == 250 and again.text.endswith(" recorded"), again
    assert statuses(stack, mid) == dict.fromkeys(rcpts, "bounced")


# ------------------------------------------------------ a forward that fails


@dataclass
class Relay:
    """A forward relay on loopback answering RCPT as told: 'accept', or a reply."""

    answer: str = "accept"
    attempts: list[str] = field(default_factory=list)
    received: list[tuple[str, list[str], bytes]] = field(default_factory=list)

    async def handle_RCPT(self, server: Any, session: Any, envelope: Any, address: str,
                          options: list[str]) -> str:
        self.attempts.append(address)
        if self.answer != "accept":
            return self.answer
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 Ok"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.received.append((envelope.mail_from, list(envelope.rcpt_tos),
                              envelope.original_content))
        return "250 2.0.0 Ok: queued"


@contextmanager
def relay_on(port: int) -> Iterator[Relay]:
    relay = Relay()
    with smtp_server(relay, port, "relay.test", "fake-relay", join_seconds=10):
        yield relay


def _forwarded(stack: Stack, result: str) -> float:
    return metric(stack.env["POSTKEEP_STORAGE_METRICS"],
                  f'postkeep_storage_forwarded_total{{result="{result}"}}')


def test_a_failure_notice_is_never_dropped_when_the_forward_relay_fails(stack: Stack) -> None:
    port = free_port()
    with daemon_settings(stack, "storage", {"forward_relay": f"127.0.0.1:{port}"}):
        org, domain = stack.new_org("basic")
        with stack.connect() as conn:
            conn.execute("UPDATE organisations SET forward_failures = true WHERE id = %s",
                         (org,))
        _, quiet = stack.new_org("basic")  # does not forward: the relay is none of its business
        tag = uuid.uuid4().hex[:8]
        mid, path = relayed_message(stack, domain, [f"fw-{tag}@sink.test"])
        report = failure_report(mid, f"fw-{tag}@sink.test")
        qmid, qpath = relayed_message(stack, quiet, [f"q-{tag}@sink.test"])
        log = LogWatch(log_path(stack, "storage"))

        # Nothing listens at the relay: recorded, but 451 so that Postfix retries.
        failed = deliver(stack, path, report)
        assert (failed.code, failed.text) == (
            451, "4.3.0 postkeep-storage: forward_relay unavailable; try again later"), failed
        assert statuses(stack, mid) == {f"fw-{tag}@sink.test": "bounced"}
        log.wait_for(rf"forward failed pk_id={mid.hex} queue_id=\S+"
                     rf" to=<app@{re.escape(domain)}> reason=.*"
                     r"Connection refused")
        quiet_reply = deliver(stack, qpath, failure_report(qmid, f"q-{tag}@sink.test"))
        assert quiet_reply.code == 250 and quiet_reply.text.endswith(" recorded"), quiet_reply

        with relay_on(port) as relay:
            relay.answer = "451 4.3.2 try again later"
            again = deliver(stack, path, report)
            assert again.code == 451 and "forward_relay unavailable" in again.text, again
            assert relay.attempts == [f"app@{domain}"] and relay.received == []

            # The relay takes it: the retry forwards it; the outcome is not recorded twice.
            relay.answer = "accept"
            sent_before = _forwarded(stack, "sent")
            done = deliver(stack, path, report)
            assert done.code == 250 and done.text.endswith(" already recorded"), done
            assert relay.received == [("<>", [f"app@{domain}"], report)]  # null sender
            assert _forwarded(stack, "sent") == sent_before + 1

            # Refused for good (5xx): recorded, answered 250, logged and counted.
            relay.answer = "550 5.1.1 no such user"
            refused_before = _forwarded(stack, "refused")
            mid2, path2 = relayed_message(stack, domain, [f"fw2-{tag}@sink.test"])
            refused = deliver(stack, path2, failure_report(mid2, f"fw2-{tag}@sink.test"))
            assert refused.code == 250 and refused.text.endswith(" recorded"), refused
            log.wait_for(rf"forward refused pk_id={mid2.hex} queue_id=\S+"
                         rf" to=<app@{re.escape(domain)}>"
                         r" reply='550 5\.1\.1 no such user'; not retried")
            assert _forwarded(stack, "refused") == refused_before + 1
        with stack.connect() as conn:
            events = conn.execute("SELECT count(*) FROM recipient_events WHERE message_id = %s"
                                  " AND status = 'bounced'", (mid,)).fetchone()
        assert events == (1,)


# ------------------------------------------ lease mode, PostgreSQL stopped


def _policyd_metric(port: int, sample: str) -> float:
    return metric(f"http://127.0.0.1:{port}/metrics", sample)


def _used(stack: Stack, org: TestOrg) -> int:
    with stack.connect() as conn:
        row = conn.execute("SELECT coalesce(sum(used), 0) FROM rate_counters"
                           " WHERE org_id = %s AND kind = 'messages'", (org.id,)).fetchone()
    assert row is not None
    return int(row[0])


def test_lease_mode_spends_its_block_then_degrades_while_postgres_is_down(
        stack: Stack, config: Config, db: psycopg.Connection,
        make_org: Callable[..., TestOrg], tmp_path: Path) -> None:
    org = make_org("enterprise")
    # 20 an hour: blocks of 2 (lease_fraction 0.1); 10 per process while degraded
    # (policyd.degraded_processes = 2).
    db.execute("UPDATE organisations SET messages_per_hour = 20 WHERE id = %s", (org.id,))
    source = config_with(config.source, tmp_path / "lease.toml", "policyd",
                         lease_tiers=["enterprise"], lease_fraction=0.1,
                         lease_idle_seconds=3600)
    degraded = 'postkeep_policyd_degraded_decisions_total{mode="share"}'
    leases = "postkeep_policyd_lease_requests_total"
    sender = f"app@{org.domain}"
    with policyds(source, 1) as [(port, mport)]:
        client = PolicyClient(port)

        def ask() -> str:
            return client.ask(request("DATA", sender, uuid.uuid4().hex))

        assert ask() == "DUNNO"
        assert _used(stack, org) == 2  # a block leased, one unit of it spent
        with stopped(stack, "postgres"):
            before = _policyd_metric(mport, degraded)
            # the rest of the block needs no PostgreSQL, and is no degraded decision
            assert ask() == "DUNNO"
            assert _policyd_metric(mport, degraded) == before
            during = [ask() for _ in range(12)]
            assert during[:10] == ["DUNNO"] * 10, during
            assert all(a.startswith("DEFER_IF_PERMIT 4.7.1 ") and "host share" in a
                       for a in during[10:]), during
            assert _policyd_metric(mport, degraded) == before + 12
        # Back by itself: it leases again, and what it admits is counted there.
        leased = _policyd_metric(mport, leases)
        after = []
        deadline = time.monotonic() + 30
        while _policyd_metric(mport, leases) == leased:
            assert time.monotonic() < deadline, f"policyd never leased again: {after}"
            after.append(ask())
            time.sleep(0.2)
        after.append(ask())
        admitted = after.count("DUNNO")
        assert admitted >= 1 and after[-1] == "DUNNO", after
        client.close()
    # Stopped: unspent units given back; the shared counter holds exactly what
    # leases admitted (the degraded decisions were counted in memory only).
    assert _used(stack, org) == 2 + admitted


# ------------------------------------------- dictionary training, S3 failing


class _StopsS3BeforePut:
    """The object store, but MinIO stops for real just before the dictionary is stored."""

    def __init__(self, stack: Stack, objects: S3ObjectStore) -> None:
        self.stack = stack
        self.objects = objects

    def get(self, key: str) -> Iterator[bytes]:
        return self.objects.get(key)

    def put(self, key: str, data: BinaryIO, length: int) -> None:
        self.stack.stack_ctl("stop", "minio")
        self.objects.put(key, data, length)

    def delete(self, key: str) -> None:
        self.objects.delete(key)

    def can_batch(self) -> bool:
        return False

    def put_many(self, items: list[tuple[str, bytes]]) -> None:
        raise AssertionError("not used by training")


def test_dictionary_training_with_s3_failing_keeps_the_current_version(
        stack: Stack, db: psycopg.Connection, objects: S3ObjectStore,
        make_org: Callable[..., TestOrg], store_message: StoreMessage) -> None:
    org = make_org("pro")
    for i in range(40):
        data = campaign.message(i, org.domain)
        head, sep, body = data.partition(b"\r\n\r\n")
        store_message(org, parts=(head + sep, body), content_days=30, metadata_days=90)
    first = dictionaries.train_for_org(db, objects, org.id, datetime.now(UTC))
    assert first.row.version == 1

    def versions() -> list[tuple[int, str]]:
        return [(r.version, r.state) for r in dictionaries.list_dictionaries(db, org.id)]

    with stopped(stack, "minio"):  # the samples cannot be read
        result = _cli(stack, "dict", "train", "--org", org.name)
    assert result.returncode == 3, result  # backend unavailable
    assert result.stdout == "" and result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith("postkeep: s3: "), result.stderr
    assert "sample messages" not in result.stderr, result.stderr
    assert versions() == [(1, "current")]

    try:  # read, then MinIO stops before the dictionary is stored
        with pytest.raises(BackendError) as err:
            dictionaries.train_for_org(db, _StopsS3BeforePut(stack, objects), org.id,
                                       datetime.now(UTC))
    finally:
        stack.stack_ctl("start", "minio")
    assert err.value.backend == "s3" and f"dictionaries/{org.id}/2.zdict" in err.value.reason
    assert versions() == [(1, "current")]
    assert [o.object_name for o in objects.client.list_objects(
        objects.bucket, prefix=f"dictionaries/{org.id}/", recursive=True)] == \
        [f"dictionaries/{org.id}/1.zdict"]
