"""The event outbox (issue 18, migration 0017): reading events and waiting for them.

Events are written by triggers in the same transaction as the change they
report (docs/events.schema.json).  Readers fetch by id, per organisation;
LISTEN on `postkeep_events` wakes a reader when a transaction with events
commits (payload 'org_id:id'), so it need not poll.  A notification is a
hint: a reader always fetches from its last id, so a missed one (a reader
reconnecting) delays nothing past the next wake-up or its own timeout.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg
from psycopg import sql

CHANNEL = "postkeep_events"
SCHEMA = "postkeep.event.v1"
EVENT_TYPES = ("accepted", "relayed", "delivered", "deferred", "bounced", "expired",
               "complained", "replied", "suppressed", "erased")


@dataclass(frozen=True)
class Event:
    """One event_outbox row."""

    id: int
    org_id: uuid.UUID
    message_id: uuid.UUID | None  # postkeep id
    recipient: str | None
    event_type: str
    payload: dict[str, Any]  # exactly as delivered
    created_at: datetime


@dataclass(frozen=True)
class Notice:
    """One NOTIFY: organisation ORG_ID has a new event with id ID."""

    org_id: uuid.UUID
    id: int


def fetch_events(conn: psycopg.Connection, org_id: uuid.UUID, after_id: int = 0,
                 limit: int = 100) -> list[Event]:
    """ORG_ID's events with an id above AFTER_ID, in id order, at most LIMIT.

    Ids are given out in insert order but commit order may differ: a reader
    that must not skip one still in flight re-reads from its last id (the
    webhook worker does); a row never appears below an id already seen
    after its own transaction commits, except for such a concurrent writer.
    """
    rows = conn.execute(
        "SELECT id, org_id, message_id, recipient, event_type, payload, created_at"
        " FROM event_outbox WHERE org_id = %s AND id > %s ORDER BY id LIMIT %s",
        (org_id, after_id, limit),
    ).fetchall()
    return [Event(*row) for row in rows]


def emit_erased(conn: psycopg.Connection, org_id: uuid.UUID, address: str,
                postkeep_ids: list[uuid.UUID], erasure_id: uuid.UUID, batch: int, batches: int,
                extra: dict[str, Any]) -> int:
    """Write the `erased` event of one erasure step in the caller's transaction; its id.

    It never names the address: `recipient` is the pseudonym the suppression
    list keeps it under (suppression_erased_key(), 'sha256:' + hex), which a
    platform that knows the address can compute to match it; the messages
    are named by postkeep id only.  One erasure writes one event per batch
    of messages it commits (sharing ERASURE_ID), or one with no messages if
    there were none.
    """
    body = {"erasure_id": str(erasure_id), "messages": len(postkeep_ids),
            "postkeep_ids": [str(i) for i in postkeep_ids], "batch": batch,
            "batches": batches, **extra}
    row = conn.execute(
        "SELECT event_emit('erased', %(org)s, NULL, k.key, event_payload('erased', %(org)s,"
        " NULL, NULL, k.key, 'erased', NULL, NULL, NULL, NULL, clock_timestamp(),"
        " %(body)s::jsonb))"
        " FROM (SELECT suppression_erased_key(%(org)s, %(addr)s) AS key) k",
        {"org": org_id, "addr": address, "body": json.dumps(body)}).fetchone()
    assert row is not None
    return int(row[0])


def forget_messages(conn: psycopg.Connection, org_id: uuid.UUID,
                    message_ids: list[uuid.UUID]) -> list[int]:
    """Delete ORG_ID's events about MESSAGE_IDS (postkeep ids), in the caller's
    transaction; their outbox ids."""
    return [int(r[0]) for r in conn.execute(
        "DELETE FROM event_outbox WHERE org_id = %s AND message_id = ANY(%s) RETURNING id",
        (org_id, message_ids)).fetchall()]


def forget_address(conn: psycopg.Connection, org_id: uuid.UUID, address: str) -> list[int]:
    """Delete ORG_ID's events that name ADDRESS anywhere (recipient or payload), in the
    caller's transaction; their outbox ids.

    Erasure deletes the events of the messages it erases by message id; this
    catches the rest: a `suppressed` event of an address added by hand (no
    message), a `replied` event naming the reply's sender, another message's
    subject quoting the address.  Reads every event of the organisation the
    outbox still keeps (storage.event_days): erasures are rare.
    """
    return [int(r[0]) for r in conn.execute(
        "DELETE FROM event_outbox WHERE org_id = %s"
        " AND (lower(recipient) = lower(%s) OR strpos(lower(payload::text), lower(%s)) > 0)"
        " RETURNING id", (org_id, address, address)).fetchall()]


def maintain_event_partitions(conn: psycopg.Connection, keep_days: int | None) -> int:
    """Create the next days' outbox partitions, drop those past KEEP_DAYS."""
    row = conn.execute("SELECT maintain_event_partitions(%s)", (keep_days,)).fetchone()
    return int(row[0]) if row else 0


def parse_notice(payload: str) -> Notice | None:
    """'org_id:id' as the outbox trigger sends it; None if malformed."""
    org, _, ident = payload.partition(":")
    try:
        return Notice(uuid.UUID(org), int(ident))
    except ValueError:
        return None


def listen(conn: psycopg.Connection) -> None:
    """LISTEN on the events channel (CONN must be autocommit: notices arrive between
    transactions)."""
    conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(CHANNEL)))


def notices(conn: psycopg.Connection, timeout: float) -> Iterator[Notice]:
    """The notices arriving on CONN (after listen()) within TIMEOUT seconds."""
    for n in conn.notifies(timeout=timeout):
        if n.channel == CHANNEL:
            parsed = parse_notice(n.payload)
            if parsed is not None:
                yield parsed
