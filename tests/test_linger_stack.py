"""Adaptive group-commit linger through real Postfix (milter/linger.py), with
the stack's default [milter] commit_linger_ms and commit_siblings: concurrent
sessions share packs (fewer PUTs than messages), a lone message is not held
for company.  Asserted on the milter's counters and MinIO's objects, never on
time."""

from __future__ import annotations

import uuid
from collections.abc import Callable

import psycopg
import pytest
from conftest import TestOrg
from support import smtp
from support.sidecar import metric
from support.stack import Stack
from test_packs_stack import PACKS_METRIC, _burst, _rows

from postkeep.config import MilterConfig
from postkeep.storage.content import packs
from postkeep.storage.content.objects import S3ObjectStore

pytestmark = pytest.mark.stack

WAITED = 'postkeep_milter_commit_linger_total{decision="waited"}'
SKIPPED = 'postkeep_milter_commit_linger_total{decision="skipped"}'
SESSIONS = 8  # more than the default commit_siblings + 1


def _metric(stack: Stack, sample: str) -> float:
    return metric(stack.env["POSTKEEP_MILTER_METRICS"], sample)


def test_concurrent_sessions_share_packs_fewer_puts_than_messages(
        stack: Stack, db: psycopg.Connection, objects: S3ObjectStore,
        make_org: Callable[..., TestOrg]) -> None:
    assert MilterConfig().commit_siblings + 1 < SESSIONS
    org = make_org("pro")
    puts, waited = _metric(stack, PACKS_METRIC), _metric(stack, WAITED)
    sent = _burst(stack, org.domain, SESSIONS)
    rows = _rows(db, [q for q, _, _ in sent])
    assert len(rows) == SESSIONS
    pack_keys = {key for _, key in rows.values()}
    assert all(packs.is_pack_key(k) for k in pack_keys), pack_keys
    # The milter's PUTs and MinIO's objects for this organisation: the packs the
    # rows name, fewer than the messages.
    prefix = next(iter(pack_keys)).split(f"{org.id}/")[0] + f"{org.id}/"
    listed = {o.object_name for o in objects.client.list_objects(
        objects.bucket, prefix=prefix, recursive=True)}
    assert listed == pack_keys
    assert _metric(stack, PACKS_METRIC) - puts == len(pack_keys) < SESSIONS
    # ... because a batch waited for its siblings (at linger 0 none would).
    assert _metric(stack, WAITED) - waited >= 1


def test_a_lone_message_is_not_held_by_the_linger(
        stack: Stack, db: psycopg.Connection, make_org: Callable[..., TestOrg]) -> None:
    org = make_org("pro")
    waited, skipped = _metric(stack, WAITED), _metric(stack, SKIPPED)
    token = uuid.uuid4().hex
    reply = smtp.send(*stack.smtp, f"s@{org.domain}", ["r@example.net"],
                      (f"From: s@{org.domain}\r\nTo: r@example.net\r\nSubject: alone\r\n"
                       f"X-Test-Token: {token}\r\n\r\nalone {token}\r\n").encode())
    assert reply.queue_id is not None
    assert len(_rows(db, [reply.queue_id])) == 1
    # Its batch was formed with no sibling in flight: it went at once.
    assert _metric(stack, WAITED) - waited == 0
    assert _metric(stack, SKIPPED) - skipped >= 1
