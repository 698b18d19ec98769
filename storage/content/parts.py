"""Large MIME parts stored once per organisation, and swept when unneeded.

The milter cuts large leaf parts out of a message (milter/mime_split.py);
each is stored as its own object `parts/{org_id}/{sha256}/{upload id}.zst`
(plain zstd frames of the part's bytes exactly as they appeared in the
message) and the message object references it (storage/content/container.py).  The
sha256 addresses the content within one organisation only: the lookup is by
(org_id, sha256), so one organisation never reuses, reads or learns about
another's part.

Which object to reuse is decided by the `parts` row whose state is 'live'
(at most one per organisation and sha256).  Before a message referencing a
part is committed, the part's `needed_until` is raised to at least that
message's content expiry (`PartStore.resolve`), and the transaction that
inserts the message's rows first holds the part rows FOR SHARE and checks
they are still live (`hold_parts`); `sweep_parts` deletes only objects whose
`needed_until` has passed and that no attachments row of an unexpired
message still names, skipping rows someone holds.  So a part is never
deleted under a message that references it: either the message's rows (and
attachments row) commit first and the sweep sees them, or the sweep marks
the part first and the message is tempfailed and retried, uploading a fresh
copy under a new upload id (never the key being deleted).

`attachments` holds one row per split part of each message (filename, MIME
type, size, sha256, object key), written in the same transaction as the
message's rows.

Sealed parts: with a master key configured each new part object is sealed
under a key of its own (storage/content/part_keys.py), its row in
`part_keys` inserted in the transaction that inserts the part's row (a
duplicate upload that lost the race keeps none).  When the last reference
goes (`release_message_parts` on erasure: `shred_unreferenced`), the part is
marked 'deleting' and its key destroyed at once, before any S3 delete; the
sweep destroys the key of every part it deletes, first.
"""

from __future__ import annotations

import logging
import tempfile
import threading
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Protocol

import psycopg
import zstandard

from postkeep.ids import uuid7
from postkeep.storage.content import part_keys
from postkeep.storage.content.objects import ObjectStore
from postkeep.storage.metadata.db import BackendError, Database
from postkeep.storage.metadata.legal_holds import covered_sql

log = logging.getLogger("postkeep.storage")


def part_key(org_id: uuid.UUID | str, sha256: bytes) -> str:
    """parts/{org_id}/{sha256 hex}/{upload id}.zst (a fresh upload id each call)."""
    return f"parts/{org_id}/{sha256.hex()}/{uuid7()}.zst"


@dataclass
class SplitPart:
    """One leaf part cut out of a message: its bytes and what describes them."""

    at: int          # offset in the skeleton where the part goes back
    data: memoryview  # the part's bytes as in the message (valid until content.close())
    sha256: bytes
    filename: str | None
    content_type: str | None
    size: int = -1  # len(data), kept after data is released

    def __post_init__(self) -> None:
        self.size = len(self.data)


@dataclass(frozen=True)
class ResolvedPart:
    key: str
    uploaded: int  # compressed bytes written now (0: an existing object was reused)


@dataclass(frozen=True)
class AttachmentRow:
    message_id: uuid.UUID
    org_id: uuid.UUID
    part_index: int
    filename: str | None
    content_type: str | None
    size: int
    sha256: bytes
    object_key: str
    content_expires_at: datetime
    metadata_expires_at: datetime
    created_at: datetime


def compress_part(data: memoryview, level: int = 3, spill_bytes: int = 1 << 20,
                  spool_dir: str | None = None) -> tempfile.SpooledTemporaryFile[bytes]:
    """DATA as zstd frames in a spooled file (memory bounded), rewound."""
    out = tempfile.SpooledTemporaryFile(max_size=spill_bytes, dir=spool_dir)  # noqa: SIM115
    cobj = zstandard.ZstdCompressor(level=level).compressobj()
    step = 1 << 20
    for i in range(0, len(data), step):
        out.write(cobj.compress(data[i : i + step]))
    out.write(cobj.flush())
    out.seek(0)
    return out


class PartStore:
    """Finds or uploads the object for each split part (thread-safe).

    Remembers (org, sha256) -> (key, needed_until written), so a part sent
    to thousands of recipients costs one upload and then, for a day of
    content expiry at a time (SLACK), no database round trip at all.
    """

    def __init__(self, db: Database, objects: ObjectStore, *, level: int = 3,
                 spill_bytes: int = 1 << 20, spool_dir: str | None = None,
                 slack: timedelta = timedelta(days=1), upload_lock: threading.Lock | None = None,
                 max_known: int = 100_000) -> None:
        self._db = db
        self._objects = objects
        self._level = level
        self._spill = spill_bytes
        self._spool = spool_dir
        self._slack = slack
        self._upload_lock = upload_lock or threading.Lock()
        self._known: dict[tuple[uuid.UUID, bytes], tuple[str, datetime]] = {}
        self._max_known = max_known

    def resolve(self, org_id: uuid.UUID, part: SplitPart, needed_until: datetime
                ) -> ResolvedPart:
        """The object key holding PART for ORG_ID, safe from sweeping until NEEDED_UNTIL.

        BackendError if PostgreSQL or S3 fails: the message is then tempfailed.
        """
        ident = (org_id, part.sha256)
        known = self._known.get(ident)
        if known is not None and known[1] >= needed_until:
            return ResolvedPart(known[0], 0)
        until = needed_until + self._slack
        row = self._db.run(lambda conn: conn.execute(
            "UPDATE parts SET needed_until = greatest(needed_until, %s)"
            " WHERE org_id = %s AND sha256 = %s AND state = 'live'"
            " RETURNING object_key, needed_until", (until, org_id, part.sha256)).fetchone())
        if row is not None:
            self._remember(ident, row[0], row[1])
            return ResolvedPart(row[0], 0)
        key = part_key(org_id, part.sha256)
        pk = part_keys.new_key(self._db, org_id, key)  # None: sealing off
        blob = compress_part(part.data, self._level, self._spill, self._spool)
        try:
            if pk is not None:
                blob = _sealed_copy(pk, blob, self._spill, self._spool)
            stored = blob.seek(0, 2)
            blob.seek(0)
            with self._upload_lock:
                self._objects.put(key, blob, stored)  # type: ignore[arg-type]
        finally:
            blob.close()

        def insert(conn: psycopg.Connection) -> tuple[str, datetime]:
            with conn.transaction():
                got = conn.execute(
                    "INSERT INTO parts (object_key, org_id, sha256, size, stored_size,"
                    " needed_until) VALUES (%s, %s, %s, %s, %s, %s)"
                    " ON CONFLICT (org_id, sha256) WHERE state = 'live' DO UPDATE"
                    " SET needed_until = greatest(parts.needed_until, EXCLUDED.needed_until)"
                    " RETURNING object_key, needed_until",
                    (key, org_id, part.sha256, part.size, stored, until)).fetchone()
                assert got is not None
                if pk is not None and got[0] == key:  # with its row, or not at all
                    part_keys.record(conn, pk)
                return got[0], got[1]

        row = self._db.run(insert)
        if row[0] != key:  # another message uploaded the same part meanwhile: use that
            try:
                self._objects.delete(key)
            except BackendError as exc:
                log.warning("duplicate part object %s left behind: %s", key, exc)
            self._remember(ident, row[0], row[1])
            return ResolvedPart(row[0], 0)
        self._remember(ident, key, row[1])
        return ResolvedPart(key, stored)

    def _remember(self, ident: tuple[uuid.UUID, bytes], key: str, until: datetime) -> None:
        if len(self._known) >= self._max_known:
            self._known.clear()
        self._known[ident] = (key, until)

    def forget_keys(self, keys: set[str]) -> None:
        """Drop what is remembered about these objects (found deleted)."""
        for ident, (key, _) in list(self._known.items()):
            if key in keys:
                self._known.pop(ident, None)

    def forget(self) -> None:
        """Drop what is remembered (tests; after an operator removed parts by hand)."""
        self._known.clear()


def _sealed_copy(pk: part_keys.PartKey, blob: tempfile.SpooledTemporaryFile[bytes],
                 spill_bytes: int, spool_dir: str | None
                 ) -> tempfile.SpooledTemporaryFile[bytes]:
    """BLOB (compressed, rewound) sealed under PK into a new spooled file; BLOB closed."""
    out = tempfile.SpooledTemporaryFile(max_size=spill_bytes, dir=spool_dir)  # noqa: SIM115
    try:
        for chunk in part_keys.seal(pk, iter(lambda: blob.read(1 << 20), b"")):
            out.write(chunk)
    except BaseException:
        out.close()
        raise
    finally:
        blob.close()
    out.seek(0)
    return out


def hold_parts(conn: psycopg.Connection, keys: set[str]) -> set[str]:
    """Lock the live rows of KEYS against sweeping until the transaction ends;
    return the keys that are no longer live (swept meanwhile)."""
    rows = conn.execute("SELECT object_key FROM parts WHERE object_key = ANY(%s)"
                        " AND state = 'live' FOR SHARE", (sorted(keys),)).fetchall()
    return keys - {r[0] for r in rows}


_INSERT_ATTACHMENTS = """
INSERT INTO attachments (message_id, org_id, part_index, filename, content_type, size, sha256,
    object_key, content_expires_at, metadata_expires_at, created_at)
SELECT * FROM unnest(%s::uuid[], %s::uuid[], %s::int[], %s::text[], %s::text[], %s::bigint[],
    %s::bytea[], %s::text[], %s::timestamptz[], %s::timestamptz[], %s::timestamptz[])
ON CONFLICT DO NOTHING
"""


def record_attachments(conn: psycopg.Connection, rows: Sequence[AttachmentRow]) -> None:
    """Insert attachment rows in one statement (idempotent)."""
    if not rows:
        return
    conn.execute(_INSERT_ATTACHMENTS, (
        [r.message_id for r in rows], [r.org_id for r in rows], [r.part_index for r in rows],
        [r.filename for r in rows], [r.content_type for r in rows], [r.size for r in rows],
        [r.sha256 for r in rows], [r.object_key for r in rows],
        [r.content_expires_at for r in rows], [r.metadata_expires_at for r in rows],
        [r.created_at for r in rows]))


def attachments_of(conn: psycopg.Connection, message_id: uuid.UUID) -> list[AttachmentRow]:
    """The split parts of one message, in order."""
    rows = conn.execute(
        "SELECT message_id, org_id, part_index, filename, content_type, size, sha256,"
        " object_key, content_expires_at, metadata_expires_at, created_at"
        " FROM attachments WHERE message_id = %s ORDER BY part_index", (message_id,)).fetchall()
    return [AttachmentRow(r[0], r[1], r[2], r[3], r[4], r[5], bytes(r[6]), r[7], r[8], r[9],
                          r[10]) for r in rows]


def release_message_parts(conn: psycopg.Connection, message_ids: Sequence[uuid.UUID],
                          now: datetime) -> int:
    """For erasure: drop the attachments rows of MESSAGE_IDS and make parts no
    other unexpired message references sweepable now; return how many.

    The next `sweep_parts` deletes their objects.  Safe against concurrent
    capture: a message committed meanwhile holds its attachments row, which
    the sweep checks.
    """
    with conn.transaction():
        gone = conn.execute(
            "DELETE FROM attachments WHERE message_id = ANY(%s) RETURNING org_id, sha256",
            (list(message_ids),)).fetchall()
        pairs = sorted({(r[0], bytes(r[1])) for r in gone})
        if not pairs:
            return 0
        rows = conn.execute(
            "UPDATE parts p SET needed_until = least(p.needed_until, %s)"
            " FROM unnest(%s::uuid[], %s::bytea[]) AS g(org_id, sha256)"
            " WHERE p.org_id = g.org_id AND p.sha256 = g.sha256 AND p.state = 'live'"
            " AND NOT EXISTS (SELECT 1 FROM attachments a WHERE a.org_id = p.org_id"
            "  AND a.sha256 = p.sha256 AND a.content_expires_at > %s)"
            " RETURNING p.object_key",
            (now - timedelta(microseconds=1), [p[0] for p in pairs], [p[1] for p in pairs],
             now)).fetchall()
        shred_unreferenced(conn, pairs, now)
    return len(rows)


def _unreferenced_sql(alias: str) -> str:
    """No attachments row of an unexpired or held message names ALIAS's object
    (what makes a part sweepable, its needed_until aside)."""
    return (f"NOT EXISTS (SELECT 1 FROM attachments a WHERE a.org_id = {alias}.org_id"
            f" AND a.sha256 = {alias}.sha256 AND a.object_key = {alias}.object_key"
            " AND (a.content_expires_at > %(now)s OR EXISTS (SELECT 1 FROM messages m"
            " WHERE m.id = a.message_id AND m.org_id = a.org_id"
            " AND m.metadata_expires_at = a.metadata_expires_at AND "
            + covered_sql("m") + ")))")


def shred_unreferenced(conn: psycopg.Connection, pairs: Sequence[tuple[uuid.UUID, bytes]],
                       now: datetime) -> list[str]:
    """Crypto-shred the parts of PAIRS (org id, sha256) that nothing references
    any more: each is marked 'deleting' (no new message can take it: hold_parts
    refuses it, the message is retried with a fresh upload) and its part key is
    destroyed at once (storage/content/part_keys.py); the next sweep deletes
    its object.  A part a committing message holds (FOR SHARE) is skipped: it
    is being referenced.  Returns the object keys shredded."""
    if not pairs:
        return []
    with conn.transaction():
        keys = [r[0] for r in conn.execute(
            "UPDATE parts p SET state = 'deleting' WHERE p.object_key IN ("
            " SELECT q.object_key FROM parts q"
            " JOIN unnest(%(orgs)s::uuid[], %(shas)s::bytea[]) AS g(org_id, sha256)"
            " ON q.org_id = g.org_id AND q.sha256 = g.sha256"
            " WHERE q.state = 'live' AND " + _unreferenced_sql("q")
            + " FOR UPDATE OF q SKIP LOCKED) AND p.state = 'live' RETURNING p.object_key",
            {"orgs": [p[0] for p in pairs], "shas": [p[1] for p in pairs], "now": now})]
        destroyed = part_keys.destroy(conn, keys)
    if keys:
        log.info("parts released: %d marked for deletion, %d part keys destroyed",
                 len(keys), destroyed)
    return keys


class Deleter(Protocol):
    """All a sweep needs of object storage (ObjectStore has it)."""

    def delete(self, key: str) -> None: ...


@dataclass(frozen=True)
class SweepResult:
    deleted: int
    bytes_freed: int


def sweep_parts(db: psycopg.Connection, objects: Deleter, now: datetime,
                *, batch: int = 500, org_id: uuid.UUID | None = None) -> SweepResult:
    """Delete part objects no unexpired message references; safe to run concurrently.

    A part goes when its needed_until has passed and no attachments row with
    content_expires_at after NOW names its object.  Each batch is marked
    'deleting' first (committed), then its objects are deleted, then its rows:
    a crash leaves 'deleting' rows, finished by the next run.  A part that a
    message under an active legal hold references is kept whatever its
    expiry (storage/lifecycle/holds.py).  A message that
    arrives meanwhile uploads a fresh copy (see PartStore.resolve).  Called by
    `postkeep retention run`.  ORG_ID limits the sweep to one organisation.
    """
    org = " AND org_id = %(org)s" if org_id is not None else ""
    deleted = freed = 0
    # Leftovers of an interrupted run first, then new candidates, batch by batch.
    while True:
        params = {"now": now, "batch": batch, "org": org_id}
        rows = db.execute(
            "SELECT object_key, stored_size FROM parts WHERE state = 'deleting'" + org
            + " LIMIT %(batch)s", params).fetchall()
        if not rows:
            rows = db.execute(
                "UPDATE parts p SET state = 'deleting' WHERE p.object_key IN ("
                " SELECT q.object_key FROM parts q WHERE q.state = 'live'"
                " AND q.needed_until < %(now)s" + org.replace("org_id", "q.org_id")
                + " AND NOT EXISTS (SELECT 1 FROM attachments a"
                "  WHERE a.org_id = q.org_id AND a.sha256 = q.sha256"
                "  AND a.object_key = q.object_key AND (a.content_expires_at > %(now)s"
                "  OR EXISTS (SELECT 1 FROM messages m WHERE m.id = a.message_id"
                "   AND m.org_id = a.org_id AND m.metadata_expires_at = a.metadata_expires_at"
                "   AND " + covered_sql("m") + ")))"
                " ORDER BY q.needed_until LIMIT %(batch)s FOR UPDATE SKIP LOCKED)"
                " AND p.state = 'live' AND p.needed_until < %(now)s"
                " RETURNING p.object_key, p.stored_size", params).fetchall()
        if not rows:
            return SweepResult(deleted, freed)
        # Crypto-shredding first: unreadable even if the delete below fails
        # (Object Lock) or the object survives elsewhere (a replica).
        part_keys.destroy(db, [r[0] for r in rows])
        for key, stored in rows:
            objects.delete(key)
            freed += stored
        db.execute("DELETE FROM parts WHERE object_key = ANY(%s) AND state = 'deleting'",
                   ([r[0] for r in rows],))
        deleted += len(rows)
        log.info("parts swept: %d objects, %d bytes", len(rows), sum(r[1] for r in rows))
