"""Erasure on request (GDPR): one address's mail content and its traces in metadata.

`erase_address` removes the content of every message of an organisation to
or from the address (the object is deleted and the row marked
`content_erased_at`, so readers derive "content erased") and redacts the
address in metadata: the envelope sender and From: become `[erased]`, the
recipient becomes `[erased]-<12 hex>` (part of the primary key; the same
within one message's status and history, from a salt that is not kept),
and the address is cut out of subjects and DSN diagnostics, in the current
status and in the report history (`recipient_events`).  Delivery
statuses and sizes stay for statistics.  The audit row records how many
messages and a sha256 of the address, never the address.

The delivery events of the erased messages (event_outbox) are deleted, and
so are the organisation's other events naming the address; in the same
transaction as each batch's change an `erased` event tells the platform
(webhooks, the local stream) which postkeep ids were erased, naming the
address only by its suppression pseudonym (`sha256:...`).  An erasure that
finds no message writes one `erased` event with none.

A legal hold covering any of those messages (the organisation, the address,
or another address on the same messages) refuses the whole erasure, naming
the holds: nothing is erased in part.

Sealed content (storage/content/sealing.py: a packed entry; sealed_objects.py:
a message's own object, large or inbound mail) is erased by deleting each
message's data key row, in the transaction that marks it: instant and exact,
wherever its bytes are (a pack other messages share keeps them as noise
until it expires or is compacted).  On WORM storage (`s3.object_lock =
"compliance"`) that is all erasure does for sealed content: no DELETE is
sent.  Unsealed content there (written before sealing, or without a master
key) is still deleted, the server refuses before its retention date, and
erasure reports how many objects keep their bytes in S3 and until when
(`ErasureReport.objects_locked`, `locked_until`, the audit row); the
retention sweeper deletes them once the lock has passed.

Crash-safe by order: per batch, the objects are deleted first (with any
original a hold's move left behind), then the attachment parts only these
messages used (storage/content/parts.py), and only then are the rows marked
and redacted with the audit row in one transaction: a message is never
recorded erased while S3 still holds any of its content.  A rerun finds the
batches not yet redacted (the address is still there) and repeats them;
deleting an object twice is harmless.  Holds the retention lock, so it never
interleaves with a retention run.
"""

from __future__ import annotations

import hashlib
import os
import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

import psycopg

from postkeep.storage.content import packs, sealing
from postkeep.storage.content.packs import is_pack_key
from postkeep.storage.lifecycle.holds import delete_content
from postkeep.storage.lifecycle.rules import RetentionStore
from postkeep.storage.metadata import events, suppression, webhooks
from postkeep.storage.metadata.audit import audit
from postkeep.storage.metadata.db import BackendError
from postkeep.storage.metadata.legal_holds import Hold, holds_covering, involves_sql, list_holds

REDACTED = "[erased]"
BATCH = 500

Progress = Callable[[str], None]


class ErasureRefused(Exception):
    """Erasure refused because legal holds cover some of the messages."""

    def __init__(self, holds: list[Hold]) -> None:
        names = "; ".join(f"hold {h.id} on {h.scope()} ({h.reason})" for h in holds)
        super().__init__(f"refused: covered by legal hold(s): {names}."
                         " Release them first (`postkeep hold remove ID`) if the erasure"
                         " must go ahead.")
        self.holds = holds


@dataclass(frozen=True)
class ErasureReport:
    messages: int
    objects_deleted: int
    recipient_rows_redacted: int
    address_sha256: str
    # Suppression entries kept under a pseudonym (0023_suppression_erasure.sql).
    suppressions_kept: int = 0
    # Objects Object Lock kept (their bytes stay in S3 until locked_until).
    objects_locked: int = 0
    locked_until: datetime | None = None


def split_locked(failed: list[str], retained: dict[str, datetime | None],
                 now: datetime) -> tuple[list[str], list[str]]:
    """(locked, failed) of the keys S3 did not delete: locked while a
    retention date after NOW explains the refusal; anything else a failure."""
    locked = [k for k in failed if (retained.get(k) or now) > now]
    return locked, [k for k in failed if k not in locked]


def pg_regex_literal(text: str) -> str:
    """TEXT as a PostgreSQL regular expression matching it literally."""
    return re.sub(r"([^A-Za-z0-9])", r"\\\1", text)


def _scope(conn: psycopg.Connection, org_id: uuid.UUID, addr: str) -> list[tuple[
        uuid.UUID, datetime, str]]:
    """(id, metadata_expires_at, object_key) of every message to or from ADDR."""
    rows = conn.execute(
        "SELECT m.id, m.metadata_expires_at, m.object_key FROM messages m"
        f" WHERE m.org_id = %(org)s AND {involves_sql('m', '%(addr)s')} ORDER BY m.id",
        {"org": org_id, "addr": addr},
    ).fetchall()
    return [(r[0], r[1], r[2]) for r in rows]


def messages_in_scope(conn: psycopg.Connection, org_id: uuid.UUID, addr: str) -> int:
    """How many messages erase_address would erase (for `erase --dry-run`)."""
    return len(_scope(conn, org_id, addr))


def erase_address(conn: psycopg.Connection, store: RetentionStore, org_id: uuid.UUID,
                  address: str, now: datetime | None = None,
                  progress: Progress | None = None) -> ErasureReport:
    """Erase ADDRESS (already normalised: lower case, bare) in ORG_ID's mail.

    Raises ErasureRefused if a legal hold covers any of it; BackendError if
    S3 fails to delete (nothing of that batch is marked; rerun).
    """
    from postkeep.storage.content.parts import release_message_parts, sweep_parts
    from postkeep.storage.lifecycle.retention import KeyDeleter, run_lock

    say = progress or (lambda _line: None)
    now = now or datetime.now(UTC)
    digest = hashlib.sha256(address.encode()).hexdigest()
    with run_lock(conn, say):
        scope = _scope(conn, org_id, address)
        # The organisation's holds, the address's own, and those of other
        # addresses on the same messages.
        covering = holds_covering(conn, org_id, [m[0] for m in scope])
        covering += [h for h in list_holds(conn, org_id)
                     if h.address == address and h not in covering]
        if covering:
            raise ErasureRefused(covering)
        total = deleted = redacted = locked_n = 0
        locked_until: datetime | None = None
        pattern = pg_regex_literal(address)
        # The redacted recipient is the same in the current status and in the
        # history of one message (so they still pair up), unguessable without
        # this salt, which is never stored.
        salt = os.urandom(16).hex()
        # One `erased` event per batch committed, all naming this erasure.
        erasure_id = uuid.uuid4()
        batches = max(1, -(-len(scope) // BATCH))
        for i in range(0, len(scope), BATCH):
            batch = scope[i:i + BATCH]
            # A packed message's bytes cannot be deleted alone: its index row
            # goes (below, with the mark) and its pack keeps dead bytes until
            # the pack expires or is compacted (storage/content/packs.py).
            # A pack left with no other message is deleted like an own object.
            ids = [m[0] for m in batch]
            emptied = packs.emptied_by(conn, ids)
            keys = [m[2] for m in batch if not is_pack_key(m[2])] + emptied
            if getattr(store, "object_lock", False):
                # WORM: sealed content is erased by destroying its data keys
                # (below, with the mark), not by a DELETE the server would
                # refuse; its bytes are noise until the lock passes.
                sealed = sealing.sealed_ids(conn, ids)
                keys = [m[2] for m in batch if not is_pack_key(m[2]) and m[0] not in sealed]
                emptied = [k for k in emptied if not packs.all_sealed(conn, k)]
                keys += emptied
            failed = delete_content(store, keys) if keys else []
            locked: list[str] = []
            if failed:
                locked, failed = split_locked(
                    failed, {k: store.retained_until(k) for k in failed}, now)
            if failed:
                raise BackendError("s3", f"erasure: {len(failed)} objects not deleted, e.g."
                                         f" {failed[0]}; nothing of this batch was marked,"
                                         " run the erasure again")
            ids = [m[0] for m in batch]
            exps = [m[1] for m in batch]
            # Attachments stored once per organisation (storage/content/parts.py):
            # what only these messages referenced goes before they are marked.
            # A rerun finds the parts released here as sweepable.
            release_message_parts(conn, ids, now)
            try:
                parts = sweep_parts(conn, KeyDeleter(store), now, org_id=org_id).deleted
            except BackendError as exc:
                raise BackendError("s3", f"erasure: attachment parts not deleted ({exc});"
                                         " nothing of this batch was marked, run the erasure"
                                         " again") from exc
            with conn.transaction():
                # Crypto-shredding: without its data key a sealed message's
                # bytes (in a pack, under Object Lock, in a replica) are noise.
                shredded = sealing.destroy(conn, ids)
                forgotten = packs.forget(conn, ids)
                conn.execute("DELETE FROM packs WHERE object_key = ANY(%s)", (emptied,))
                conn.execute(
                    "UPDATE messages m SET content_erased_at = coalesce(m.content_erased_at,"
                    " %(now)s),"
                    " envelope_from = CASE WHEN lower(m.envelope_from) = %(addr)s"
                    " THEN %(red)s ELSE m.envelope_from END,"
                    " header_from = CASE WHEN lower(m.header_from) = %(addr)s OR"
                    " position('<' || %(addr)s || '>' in lower(m.header_from)) > 0"
                    " THEN %(red)s ELSE m.header_from END,"
                    " subject = regexp_replace(m.subject, %(pat)s, %(red)s, 'gi')"
                    " FROM unnest(%(ids)s::uuid[], %(exps)s::timestamptz[]) AS u(id, exp)"
                    " WHERE m.id = u.id AND m.metadata_expires_at = u.exp AND m.org_id = %(org)s",
                    {"now": now, "addr": address, "red": REDACTED, "pat": pattern,
                     "ids": ids, "exps": exps, "org": org_id},
                )
                # The current status and the delivery report history (outcomes)
                # both name recipients; one pseudonym per message in both.
                for table, touch in (("message_recipients", ", updated_at = now()"),
                                     ("recipient_events", "")):
                    cur = conn.execute(
                        f"UPDATE {table} r SET recipient = CASE WHEN lower(r.recipient)"
                        " = %(addr)s THEN %(red)s || '-' || left(md5(r.message_id::text"
                        " || %(salt)s), 12) ELSE r.recipient END,"
                        f" diagnostic = regexp_replace(r.diagnostic, %(pat)s, %(red)s, 'gi'){touch}"
                        " FROM unnest(%(ids)s::uuid[], %(exps)s::timestamptz[]) AS u(id, exp)"
                        " WHERE r.message_id = u.id AND r.metadata_expires_at = u.exp"
                        " AND r.org_id = %(org)s AND (lower(r.recipient) = %(addr)s"
                        " OR r.diagnostic ~* %(pat)s)",
                        {"addr": address, "red": REDACTED, "pat": pattern, "ids": ids,
                         "exps": exps, "org": org_id, "salt": salt},
                    )
                    if table == "message_recipients":
                        redacted += cur.rowcount
                # The delivery events of these messages name their recipients
                # and subjects (event_outbox, kept storage.event_days for the
                # webhooks): they go with the content, undelivered ones too.
                # Their pending webhook deliveries go too: not dead-lettered
                # later as failures, never replayed.
                webhooks.forget_undelivered(conn, org_id,
                                            events.forget_messages(conn, org_id, ids))
                # ... and the platform is told, by postkeep id only (never
                # the address), in the transaction that erased them.
                events.emit_erased(conn, org_id, address, ids, erasure_id,
                                   i // BATCH + 1, batches,
                                   {"objects_deleted": len(keys) - len(locked),
                                    "objects_locked": len(locked)})
                audit(conn, None, "erased", len(batch), org_id, f"address sha256 {digest}",
                      {"address_sha256": digest, "objects_deleted": len(keys) - len(locked),
                       "pack_entries_dropped": forgotten, "parts_deleted": parts,
                       "data_keys_destroyed": shredded,
                       "objects_locked": len(locked)})
            total += len(batch)
            deleted += len(keys) - len(locked)
            if locked:
                locked_n += len(locked)
                last = max(d for d in (store.retained_until(k) for k in locked) if d)
                locked_until = max(locked_until or last, last)
                say(f"{len(locked)} object(s) under Object Lock: S3 refused the delete; their"
                    f" bytes remain until {last:%Y-%m-%d %H:%M} UTC (metadata erased now)")
            say(f"erased {total}/{len(scope)} messages ({parts} attachment part object(s)"
                " no other message needs deleted)")
        # Still suppressed, no longer named (an erasure is no consent to be mailed).
        literal = re.compile(re.escape(address), re.IGNORECASE)
        with conn.transaction():
            kept = suppression.keep_erased(
                conn, org_id, address,
                lambda text: None if text is None else literal.sub(REDACTED, text))
            # Events naming the address that were about no erased message
            # (a suppression added by hand, another message's subject).
            webhooks.forget_undelivered(conn, org_id,
                                        events.forget_address(conn, org_id, address))
            if not scope:
                audit(conn, None, "erased", 0, org_id, f"address sha256 {digest}",
                      {"address_sha256": digest, "objects_deleted": 0,
                       "suppressions_kept": kept})
                events.emit_erased(conn, org_id, address, [], erasure_id, 1, 1,
                                   {"objects_deleted": 0, "objects_locked": 0,
                                    "suppressions_kept": kept})
    return ErasureReport(total, deleted, redacted, digest, kept, locked_n, locked_until)
