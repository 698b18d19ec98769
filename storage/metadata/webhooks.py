"""Webhook endpoints and their deliveries in PostgreSQL (migration 0018).

Secrets are sealed with AES-256-GCM under a key derived from the DKIM master
key (HKDF-style: SHA-256 of a label and the master key, so the two uses never
share a key), with the endpoint id as associated data: a row copied to
another endpoint does not open.  The clear secret exists only in the
process that signs (postkeep-storage) and once on the terminal of whoever
ran `postkeep webhook add` / `rotate-secret`.

Delivery rows are made by `fan_out` from event_outbox (0017) and sent by
the worker in event id order per endpoint (`pending_head`).
"""

from __future__ import annotations

import hashlib
import json
import secrets as secrets_mod
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import psycopg
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from postkeep.storage.metadata.dkim_keys import MasterKey

EVENT_TYPES = ("accepted", "relayed", "delivered", "deferred", "bounced", "expired",
               "complained", "replied", "suppressed", "erased")
_AAD_PREFIX = b"postkeep-webhook-secret-v1\x00"
# Outbox rows turned into delivery rows per endpoint and pass.
FAN_OUT_BATCH = 1000


class WebhookError(Exception):
    """A webhook operation refused; the text names the endpoint or value and why."""


def _sealing_key(master: MasterKey) -> bytes:
    return hashlib.sha256(b"postkeep webhook secret key\x00" + master.key).digest()


def seal(master: MasterKey, endpoint_id: uuid.UUID, secret: str) -> tuple[bytes, bytes]:
    """(ciphertext, nonce) of SECRET for ENDPOINT_ID."""
    nonce = secrets_mod.token_bytes(12)
    sealed = AESGCM(_sealing_key(master)).encrypt(nonce, secret.encode(),
                                                  _AAD_PREFIX + endpoint_id.bytes)
    return sealed, nonce


def unseal(master: MasterKey, endpoint_id: uuid.UUID, sealed: bytes, nonce: bytes,
           key_id: str) -> str:
    if key_id != master.key_id:
        raise WebhookError(f"endpoint {endpoint_id}: its secret is sealed under master key id"
                           f" {key_id}; the configured dkim.master_key has id {master.key_id}")
    try:
        return AESGCM(_sealing_key(master)).decrypt(
            nonce, sealed, _AAD_PREFIX + endpoint_id.bytes).decode()
    except InvalidTag:
        raise WebhookError(f"endpoint {endpoint_id}: its sealed secret does not open with the"
                           " configured dkim.master_key") from None


@dataclass(frozen=True)
class Endpoint:
    id: uuid.UUID
    org_id: uuid.UUID
    url: str
    event_types: tuple[str, ...] | None  # None: every type
    created_at: datetime
    previous_expires_at: datetime | None
    # Sealed material, opened by `secrets_of`.
    master_key_id: str = field(repr=False)
    sealed: tuple[bytes, bytes] = field(repr=False)
    previous: tuple[bytes, bytes] | None = field(repr=False)


_ENDPOINT_COLS = ("id, org_id, url, event_types, created_at, previous_expires_at,"
                  " master_key_id, secret_sealed, secret_nonce, previous_sealed, previous_nonce")


def _endpoint(row: Sequence[Any]) -> Endpoint:
    return Endpoint(row[0], row[1], row[2], tuple(row[3]) if row[3] is not None else None,
                    row[4], row[5], row[6], (bytes(row[7]), bytes(row[8])),
                    (bytes(row[9]), bytes(row[10])) if row[9] is not None else None)


def secrets_of(master: MasterKey, ep: Endpoint, now: datetime) -> list[str]:
    """The secrets to sign with: the current one, and the previous one while its
    overlap lasts."""
    out = [unseal(master, ep.id, *ep.sealed, ep.master_key_id)]
    if ep.previous is not None and ep.previous_expires_at and ep.previous_expires_at > now:
        out.append(unseal(master, ep.id, *ep.previous, ep.master_key_id))
    return out


def check_event_types(types: Sequence[str]) -> tuple[str, ...] | None:
    """The filter as stored (None: all); ValueError naming an unknown type."""
    out: list[str] = []
    for t in types:
        for name in (x.strip() for x in t.split(",")):
            if not name:
                continue
            if name not in EVENT_TYPES:
                raise ValueError(f"--events {name!r}: unknown event type; known:"
                                 f" {', '.join(EVENT_TYPES)}")
            if name not in out:
                out.append(name)
    return tuple(out) or None


def add_endpoint(conn: psycopg.Connection, master: MasterKey, org_id: uuid.UUID, url: str,
                 event_types: tuple[str, ...] | None, secret: str) -> Endpoint:
    """A new endpoint; it receives the events written from now on."""
    eid = uuid.uuid4()
    sealed, nonce = seal(master, eid, secret)
    with conn.transaction():
        row = conn.execute(
            "INSERT INTO webhook_endpoints (id, org_id, url, event_types, master_key_id,"
            " secret_sealed, secret_nonce, fanned_to)"
            " VALUES (%s, %s, %s, %s, %s, %s, %s,"
            "  (SELECT coalesce(max(id), 0) FROM event_outbox WHERE org_id = %s))"
            f" RETURNING {_ENDPOINT_COLS}",
            (eid, org_id, url, list(event_types) if event_types else None, master.key_id,
             sealed, nonce, org_id)).fetchone()
        conn.execute("SELECT pg_notify('postkeep_webhooks', %s)", (str(eid),))
    assert row is not None
    return _endpoint(row)


def list_endpoints(conn: psycopg.Connection, org_id: uuid.UUID | None = None) -> list[Endpoint]:
    return [_endpoint(r) for r in conn.execute(
        f"SELECT {_ENDPOINT_COLS} FROM webhook_endpoints"
        " WHERE %(org)s::uuid IS NULL OR org_id = %(org)s ORDER BY created_at, id",
        {"org": org_id}).fetchall()]


def get_endpoint(conn: psycopg.Connection, endpoint_id: uuid.UUID) -> Endpoint | None:
    row = conn.execute(f"SELECT {_ENDPOINT_COLS} FROM webhook_endpoints WHERE id = %s",
                       (endpoint_id,)).fetchone()
    return _endpoint(row) if row else None


def remove_endpoint(conn: psycopg.Connection, endpoint_id: uuid.UUID) -> bool:
    """Delete the endpoint and its delivery rows; False if there was none."""
    with conn.transaction():
        gone = conn.execute("DELETE FROM webhook_endpoints WHERE id = %s",
                            (endpoint_id,)).rowcount
        conn.execute("SELECT pg_notify('postkeep_webhooks', %s)", (str(endpoint_id),))
    return gone > 0


def rotate_secret(conn: psycopg.Connection, master: MasterKey, endpoint_id: uuid.UUID,
                  secret: str, overlap_seconds: float) -> datetime:
    """Make SECRET current; the old one stays valid OVERLAP_SECONDS (when it expires)."""
    ep = get_endpoint(conn, endpoint_id)
    if ep is None:
        raise WebhookError(f"no webhook endpoint {endpoint_id}")
    old = unseal(master, ep.id, *ep.sealed, ep.master_key_id)
    sealed, nonce = seal(master, ep.id, secret)
    psealed, pnonce = seal(master, ep.id, old)
    row = conn.execute(
        "UPDATE webhook_endpoints SET secret_sealed = %s, secret_nonce = %s,"
        " previous_sealed = %s, previous_nonce = %s, master_key_id = %s,"
        " previous_expires_at = now() + make_interval(secs => %s)"
        " WHERE id = %s RETURNING previous_expires_at",
        (sealed, nonce, psealed, pnonce, master.key_id, overlap_seconds, ep.id)).fetchone()
    assert row is not None
    return row[0]  # type: ignore[no-any-return]


# --- fan-out: outbox rows -> delivery rows ----------------------------------------


_FAN_OUT_INSERT = (
    "INSERT INTO webhook_deliveries (endpoint_id, event_id, org_id, message_id,"
    " event_type, event_created_at)"
    " SELECT %(ep)s, o.id, o.org_id, o.message_id, o.event_type, o.created_at"
    " FROM event_outbox o"
    " WHERE o.org_id = %(org)s AND o.id > %(from)s AND o.id <= %(to)s"
    "   AND (%(types)s::text[] IS NULL OR o.event_type = ANY(%(types)s::text[]))"
    " ORDER BY o.id LIMIT %(n)s"
    " ON CONFLICT (endpoint_id, event_id) DO NOTHING")


def fan_out(conn: psycopg.Connection, endpoint_id: uuid.UUID) -> int:
    """Give every new event of the endpoint's organisation a delivery row; how many.

    Identity values are taken at INSERT and committed later, so a visible id
    does not mean every smaller one is.  Each pass makes rows for what is
    visible above the highest event the endpoint already has a row for (so a
    pass costs the events new since the last one, not the whole window).
    `fanned_to` only moves to a horizon once every transaction that was
    running when the horizon was taken has ended, and two seconds have
    passed (nextval() can run just before its transaction takes an xid):
    nothing at or below it can appear any more, so that pass first scans
    everything from the old `fanned_to` to the horizon once, which catches
    an event that committed after later ones had been fanned out (ON
    CONFLICT: rows already made are left alone).  A long transaction
    elsewhere only widens that window, it never delays delivery.
    """
    with conn.transaction():
        ep = conn.execute(
            "SELECT org_id, event_types, fanned_to, horizon_id,"
            " horizon_xmax IS NOT NULL AND horizon_xmax <= pg_snapshot_xmin(pg_current_snapshot())"
            "  AND horizon_at < now() - interval '2 seconds'"
            " FROM webhook_endpoints WHERE id = %s FOR UPDATE", (endpoint_id,)).fetchone()
        if ep is None:
            return 0
        org_id, types, fanned_to, horizon_id, horizon_done = ep
        args = {"ep": endpoint_id, "org": org_id, "types": types}
        made = 0
        if horizon_done:
            # The catch-up: no LIMIT, the window is bounded by the horizon.
            made += conn.execute(_FAN_OUT_INSERT.replace(" LIMIT %(n)s", ""),
                                 {**args, "from": fanned_to, "to": horizon_id}).rowcount
            fanned_to = max(fanned_to, horizon_id)
        row = conn.execute("SELECT max(event_id) FROM webhook_deliveries WHERE endpoint_id = %s",
                           (endpoint_id,)).fetchone()
        seen = max(fanned_to, row[0] if row and row[0] is not None else 0)
        made += conn.execute(_FAN_OUT_INSERT, {**args, "from": seen, "to": 2**63 - 1,
                                               "n": FAN_OUT_BATCH}).rowcount
        if horizon_done or horizon_id is None:
            # A new candidate: the highest id seen now (within a batch of
            # fanned_to), final once every transaction running now has ended.
            top = conn.execute(
                "SELECT max(id) FROM (SELECT o.id FROM event_outbox o"
                " WHERE o.org_id = %s AND o.id > %s ORDER BY o.id LIMIT %s) s",
                (org_id, fanned_to, FAN_OUT_BATCH)).fetchone()
            conn.execute(
                "UPDATE webhook_endpoints SET fanned_to = %s, horizon_id = %s,"
                " horizon_xmax = CASE WHEN %s::bigint IS NULL THEN NULL"
                "  ELSE pg_snapshot_xmax(pg_current_snapshot()) END, horizon_at = now()"
                " WHERE id = %s",
                (fanned_to, top[0] if top else None, top[0] if top else None, endpoint_id))
    return max(made, 0)


# --- the worker's queue ------------------------------------------------------------


@dataclass(frozen=True)
class Pending:
    """The endpoint's next delivery: its event and where it stands."""

    event_id: int
    event_type: str
    message_id: uuid.UUID | None
    event_created_at: datetime
    attempts: int
    next_attempt_at: datetime
    payload: dict[str, Any] | None  # None: the event left the outbox (expired)
    now: datetime


def pending_heads(conn: psycopg.Connection, endpoint_id: uuid.UUID,
                  limit: int = 100) -> list[Pending]:
    """The first LIMIT pending deliveries in event id order (the head of line first)."""
    rows = conn.execute(
        "SELECT d.event_id, d.event_type, d.message_id, d.event_created_at, d.attempts,"
        " d.next_attempt_at, o.payload, now()"
        " FROM webhook_deliveries d"
        " LEFT JOIN event_outbox o ON o.id = d.event_id AND o.created_at = d.event_created_at"
        " WHERE d.endpoint_id = %s AND d.state = 'pending'"
        " ORDER BY d.event_id LIMIT %s", (endpoint_id, limit)).fetchall()
    return [Pending(r[0], r[1], r[2], r[3], r[4], r[5],
                    r[6] if isinstance(r[6], dict) or r[6] is None else json.loads(r[6]), r[7])
            for r in rows]


def record_successes(conn: psycopg.Connection, endpoint_id: uuid.UUID,
                     done: Sequence[tuple[int, int, datetime]]) -> list[tuple[str, float]]:
    """Mark DONE (event id, HTTP status, when its 2xx came) delivered, in one
    statement; (event type, lag from the event's creation in seconds) of each that
    was still pending (a replay or removal may have raced us)."""
    if not done:
        return []
    rows = conn.execute(
        "UPDATE webhook_deliveries d SET state = 'delivered', attempts = d.attempts + 1,"
        " last_attempt_at = u.at, last_status = u.status, last_error = NULL,"
        " delivered_at = u.at"
        " FROM unnest(%s::bigint[], %s::integer[], %s::timestamptz[]) AS u(ev, status, at)"
        " WHERE d.endpoint_id = %s AND d.event_id = u.ev AND d.state = 'pending'"
        " RETURNING d.event_type, extract(epoch FROM u.at - d.event_created_at)::float8",
        ([d[0] for d in done], [d[1] for d in done], [d[2] for d in done],
         endpoint_id)).fetchall()
    return [(str(r[0]), float(r[1])) for r in rows]


def record_failure(conn: psycopg.Connection, endpoint_id: uuid.UUID, event_id: int,
                   status: int | None, error: str | None, retry_in: float,
                   give_up_after: float) -> str:
    """Count a failed attempt: 'pending' (retry in RETRY_IN seconds) or 'dead' once
    the event is older than GIVE_UP_AFTER seconds (or the next try would be)."""
    row = conn.execute(
        "UPDATE webhook_deliveries SET attempts = attempts + 1, last_attempt_at = now(),"
        " last_status = %(status)s, last_error = %(error)s,"
        " next_attempt_at = clock_timestamp() + make_interval(secs => %(retry)s),"
        " state = CASE WHEN clock_timestamp() + make_interval(secs => %(retry)s)"
        "   > event_created_at + make_interval(secs => %(give_up)s) THEN 'dead'"
        "   ELSE 'pending' END"
        " WHERE endpoint_id = %(ep)s AND event_id = %(ev)s AND state = 'pending'"
        " RETURNING state",
        {"status": status, "error": error, "retry": retry_in, "give_up": give_up_after,
         "ep": endpoint_id, "ev": event_id}).fetchone()
    return str(row[0]) if row else "gone"


def dead_letter(conn: psycopg.Connection, endpoint_id: uuid.UUID, event_id: int,
                why: str) -> None:
    conn.execute("UPDATE webhook_deliveries SET state = 'dead', last_error = %s"
                 " WHERE endpoint_id = %s AND event_id = %s AND state = 'pending'",
                 (why, endpoint_id, event_id))


@dataclass(frozen=True)
class QueueStats:
    endpoint_id: uuid.UUID
    pending: int
    dead: int
    oldest_pending_seconds: float


def queue_stats(conn: psycopg.Connection) -> list[QueueStats]:
    """Per endpoint: pending and dead-lettered rows, the oldest pending event's age."""
    return [QueueStats(r[0], int(r[1]), int(r[2]), float(r[3] or 0.0)) for r in conn.execute(
        "SELECT e.id, count(*) FILTER (WHERE d.state = 'pending'),"
        " count(*) FILTER (WHERE d.state = 'dead'),"
        " extract(epoch FROM now() - min(d.event_created_at)"
        "   FILTER (WHERE d.state = 'pending'))::float8"
        " FROM webhook_endpoints e LEFT JOIN webhook_deliveries d ON d.endpoint_id = e.id"
        "  AND d.state <> 'delivered'"
        " GROUP BY e.id").fetchall()]


def forget_undelivered(conn: psycopg.Connection, org_id: uuid.UUID,
                       event_ids: Sequence[int]) -> int:
    """Drop ORG_ID's pending and dead-lettered deliveries of EVENT_IDS (events erasure
    deleted from the outbox), so they are neither counted as failures nor replayed;
    delivered rows stay (they name no address).  How many."""
    if not event_ids:
        return 0
    return conn.execute(
        "DELETE FROM webhook_deliveries WHERE endpoint_id IN"
        " (SELECT id FROM webhook_endpoints WHERE org_id = %s)"
        " AND event_id = ANY(%s) AND state <> 'delivered'",
        (org_id, list(event_ids))).rowcount


def purge_delivered(conn: psycopg.Connection, keep_days: int) -> int:
    return conn.execute(
        "DELETE FROM webhook_deliveries WHERE state = 'delivered'"
        " AND delivered_at < now() - make_interval(days => %s)", (keep_days,)).rowcount


# --- the operator's view -----------------------------------------------------------


@dataclass(frozen=True)
class Delivery:
    endpoint_id: uuid.UUID
    event_id: int
    event_type: str
    message_id: uuid.UUID | None
    state: str
    attempts: int
    next_attempt_at: datetime
    last_attempt_at: datetime | None
    last_status: int | None
    last_error: str | None
    event_created_at: datetime
    delivered_at: datetime | None


def deliveries(conn: psycopg.Connection, endpoint_id: uuid.UUID, state: str | None,
               limit: int) -> list[Delivery]:
    return [Delivery(*r) for r in conn.execute(
        "SELECT endpoint_id, event_id, event_type, message_id, state, attempts,"
        " next_attempt_at, last_attempt_at, last_status, last_error, event_created_at,"
        " delivered_at FROM webhook_deliveries"
        " WHERE endpoint_id = %s AND (%s::text IS NULL OR state = %s)"
        " ORDER BY event_id DESC LIMIT %s", (endpoint_id, state, state, limit)).fetchall()]


def replay(conn: psycopg.Connection, endpoint_id: uuid.UUID, *, dead_only: bool,
           from_id: int | None, to_id: int | None) -> int:
    """Queue deliveries again (dead-lettered ones, or every one in an id range):
    pending, attempts from zero, due now.  How many."""
    with conn.transaction():
        n = conn.execute(
            "UPDATE webhook_deliveries SET state = 'pending', attempts = 0,"
            " next_attempt_at = now(), delivered_at = NULL"
            " WHERE endpoint_id = %(ep)s AND state <> 'pending'"
            "   AND (NOT %(dead)s OR state = 'dead')"
            "   AND (%(lo)s::bigint IS NULL OR event_id >= %(lo)s)"
            "   AND (%(hi)s::bigint IS NULL OR event_id <= %(hi)s)",
            {"ep": endpoint_id, "dead": dead_only, "lo": from_id, "hi": to_id}).rowcount
        conn.execute("SELECT pg_notify('postkeep_webhooks', %s)", (str(endpoint_id),))
    return n
