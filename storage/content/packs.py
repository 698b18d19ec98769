"""Packs: many messages' content in one object, indexed in PostgreSQL.

One PUT per message costs S3 more in requests than in storage (a 3 KB
message's PUT costs as much as keeping it for years) and costs MinIO CPU per
object.  So the messages one group commit writes (milter/committer.py) go,
per organisation, retention class and content-expiry day, into ONE object:

    messages/<class>/<org_id>/<yyyy>/<mm>/<dd>/p<expiry yyyymmdd>-<pack id>.pack

i.e. the directory the message's own object would have had (class prefix,
so the class's lifecycle rule expires the pack whole: every message in it
was created before the pack, so creation + class days is never before any
member's content_expires_at), with the content expiry day in the name.

A pack is the concatenation of its members' entries; an entry is what
`seal_entry` makes of the message's compressed object (plain zstd frames or
a container): sealed under the message's own data key when a master key is
configured (format 1, storage/content/sealing.py), as it is otherwise
(format 0).  `message_packs` says where each entry is (offset,
length, format): restore is one ranged GET (`location`, restore.restore).

A message without a `message_packs` row is read the old way, from its own
object at `messages.object_key`; a packed message's object_key is its pack.

Lifetime: `packs.expires_at` is the latest content_expires_at of the
members; the retention run deletes expired packs whole (`sweep_packs`) and
the per-message sweep never deletes a pack.  Erasing a packed message
deletes its index row only (`forget`): its bytes stay in the pack until the
pack expires or `compact` rewrites the pack without them.  A legal hold
copies the held message's range out to its own object under messages/hold/
(storage/lifecycle/holds.py) and drops its index row.
"""

from __future__ import annotations

import io
import logging
import uuid
from collections import defaultdict
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass, field
from datetime import datetime

import psycopg

from postkeep.ids import uuid7
from postkeep.storage.content import sealing
from postkeep.storage.content.layout import MESSAGES
from postkeep.storage.metadata.db import BackendError

log = logging.getLogger("postkeep.storage")

SUFFIX = ".pack"
FORMAT_PLAIN = 0  # the entry is the message's compressed object as stored alone
FORMAT_SEALED = 1  # that object sealed under the message's own key (storage/content/sealing.py)


def seal_entry(key: sealing.DataKey | None, compressed: bytes) -> tuple[int, bytes]:
    """(format, bytes): what goes into a pack for one message's compressed object:
    sealed under KEY (the message's data key), or as it is without one."""
    if key is None:
        return FORMAT_PLAIN, compressed
    return FORMAT_SEALED, sealing.seal(key, compressed)


def open_entry(fmt: int, key: str, chunks: Iterator[bytes],
               conn: psycopg.Connection | None = None,
               message_id: uuid.UUID | None = None) -> Iterator[bytes]:
    """The compressed object from an entry's bytes (the inverse of seal_entry).
    A sealed entry needs CONN (its key) and MESSAGE_ID (what it is bound to)."""
    if fmt == FORMAT_PLAIN:
        return chunks
    if fmt != FORMAT_SEALED:
        raise BackendError("s3", f"{key}: pack entry format {fmt} is not supported")
    if conn is None or message_id is None:
        raise BackendError("s3", f"{key}: a sealed entry is read with its message's key"
                                 " (restore_message)")
    return iter([sealing.open_sealed(conn, message_id, b"".join(chunks), key)])


def is_pack_key(key: str) -> bool:
    """True for a pack object's key."""
    return key.startswith(MESSAGES) and key.endswith(SUFFIX)


def pack_key(message_key: str, expires: datetime, pack_id: uuid.UUID) -> str:
    """The key of a pack next to MESSAGE_KEY's directory, named by its expiry day."""
    directory = message_key.rsplit("/", 1)[0]
    return f"{directory}/p{expires:%Y%m%d}-{pack_id}{SUFFIX}"


@dataclass(frozen=True)
class Location:
    """Where a packed message's entry is."""

    pack_key: str
    offset: int
    length: int
    format: int = FORMAT_PLAIN


@dataclass(frozen=True)
class Entry:
    """One message to pack: its id, organisation, own key, expiry and object."""

    message_id: uuid.UUID
    org_id: uuid.UUID
    message_key: str
    content_expires_at: datetime
    data: bytes
    sealed: bool = False  # DATA is already a sealed entry (its key row exists)


@dataclass
class Pack:
    """A pack being written: its key, body and members (message id -> Location)."""

    key: str
    org_id: uuid.UUID
    expires_at: datetime
    body: io.BytesIO
    members: dict[uuid.UUID, Location]
    keys: list[sealing.DataKey] = field(default_factory=list)  # rows to record with it

    @property
    def length(self) -> int:
        return self.body.tell()


def build(entries: list[Entry], new_id: Callable[[], uuid.UUID] = uuid7,
          keys: dict[uuid.UUID, sealing.DataKey] | None = None) -> list[Pack]:
    """ENTRIES grouped into packs: one per organisation, directory (class and
    creation day) and content-expiry day, members in the order given.  An
    entry with a data key in KEYS is sealed under it."""
    keys = keys or {}
    groups: dict[tuple[uuid.UUID, str, str], list[Entry]] = defaultdict(list)
    for e in entries:
        directory = e.message_key.rsplit("/", 1)[0]
        groups[(e.org_id, directory, f"{e.content_expires_at:%Y%m%d}")].append(e)
    packs = []
    for members in groups.values():
        first = members[0]
        expires = max(e.content_expires_at for e in members)
        pack = Pack(pack_key(first.message_key, first.content_expires_at, new_id()),
                    first.org_id, expires, io.BytesIO(), {})
        for e in members:
            if e.sealed:
                fmt, data = FORMAT_SEALED, e.data
            else:
                k = keys.get(e.message_id)
                fmt, data = seal_entry(k, e.data)
                if k is not None:
                    pack.keys.append(k)
            pack.members[e.message_id] = Location(pack.key, pack.length, len(data), fmt)
            pack.body.write(data)
        packs.append(pack)
    return packs


def record(conn: psycopg.Connection, packs: list[Pack]) -> None:
    """Insert the index rows of PACKS (in the caller's transaction)."""
    if not packs:
        return
    conn.execute(
        "INSERT INTO packs (object_key, org_id, expires_at, length, messages)"
        " SELECT * FROM unnest(%s::text[], %s::uuid[], %s::timestamptz[], %s::bigint[],"
        " %s::int[])"
        # A pack recorded member by member (the spool drain's one-by-one retry).
        " ON CONFLICT (object_key) DO UPDATE SET messages = packs.messages + EXCLUDED.messages",
        ([p.key for p in packs], [p.org_id for p in packs], [p.expires_at for p in packs],
         [p.length for p in packs], [len(p.members) for p in packs]))
    rows = [(mid, p.org_id, loc) for p in packs for mid, loc in p.members.items()]
    conn.execute(
        "INSERT INTO message_packs (message_id, org_id, pack_key, pack_offset, length, format)"
        " SELECT * FROM unnest(%s::uuid[], %s::uuid[], %s::text[], %s::bigint[],"
        " %s::bigint[], %s::smallint[])",
        ([r[0] for r in rows], [r[1] for r in rows], [r[2].pack_key for r in rows],
         [r[2].offset for r in rows], [r[2].length for r in rows],
         [r[2].format for r in rows]))
    # The data keys of the members indexed (one refused after its upload has none).
    sealing.record(conn, [k for p in packs for k in p.keys if k.message_id in p.members])


def location(conn: psycopg.Connection, message_id: uuid.UUID) -> Location | None:
    """Where MESSAGE_ID's entry is, or None if it has its own object."""
    row = conn.execute("SELECT pack_key, pack_offset, length, format FROM message_packs"
                       " WHERE message_id = %s", (message_id,)).fetchone()
    return Location(row[0], int(row[1]), int(row[2]), int(row[3])) if row else None


def forget(conn: psycopg.Connection, message_ids: list[uuid.UUID]) -> int:
    """Drop the index rows of MESSAGE_IDS (erasure): their entries become dead
    bytes in their packs, reclaimed when the pack expires or is compacted."""
    return conn.execute("DELETE FROM message_packs WHERE message_id = ANY(%s)",
                        (message_ids,)).rowcount


@dataclass(frozen=True)
class PackSweep:
    deleted: int = 0
    failed: int = 0
    keys: tuple[str, ...] = ()  # the packs deleted


def _alive(conn: psycopg.Connection, keys: list[str], now: datetime) -> set[str]:
    """The KEYS some message still reads from: an indexed member whose content
    stamp has not passed, or that an active legal hold covers (not yet copied
    out).  Members whose row is gone (dropped with its partition) do not count.
    One query over message_packs, then one over messages by id (a single plan
    for the partitioned table, not one per pack)."""
    from postkeep.storage.metadata.legal_holds import covered_sql

    members: dict[uuid.UUID, str] = {r[0]: r[1] for r in conn.execute(
        "SELECT message_id, pack_key FROM message_packs WHERE pack_key = ANY(%s)", (keys,))}
    if not members:
        return set()
    live = conn.execute(
        f"SELECT m.id FROM messages m WHERE m.id = ANY(%(ids)s) AND (m.content_expires_at >"
        f" %(now)s OR {covered_sql('m')})", {"ids": list(members), "now": now}).fetchall()
    return {members[r[0]] for r in live}


def sweep(conn: psycopg.Connection, delete_many: Callable[[list[str]], list[str]],
          now: datetime, candidates: Collection[str] = (), batch: int = 1000,
          only: bool = False, locked: bool = False) -> PackSweep:
    """Delete, whole, every pack no message reads from any more (`_alive`):
    those past their expires_at (the latest member stamp when written), those
    with no member left, and CANDIDATES (packs of messages the message sweep
    found expired: their stamps may have moved since).  The object first (a
    lifecycle rule may have deleted it already: deletes are idempotent), then
    its rows (message_packs go with it).  DELETE_MANY returns the keys it
    failed to delete; those stay for the next run.  ONLY: just the CANDIDATES
    (the message sweep, batch by batch).  LOCKED (Object Lock): a pack left
    with no member (its sealed messages erased by their keys) waits for its
    expiry, before which the server refuses the delete.
    """
    which = ("k.object_key = ANY(%(cands)s)" if only else
             "(k.expires_at <= %(now)s OR k.object_key = ANY(%(cands)s)"
             " OR (NOT %(locked)s AND NOT EXISTS (SELECT 1 FROM message_packs e"
             " WHERE e.pack_key = k.object_key)))")
    gone: list[str] = []
    failed = 0
    after = ""
    while True:
        found = [r[0] for r in conn.execute(
            f"SELECT k.object_key FROM packs k WHERE k.object_key > %(after)s AND {which}"
            " ORDER BY k.object_key LIMIT %(n)s",
            {"now": now, "after": after, "n": batch, "cands": sorted(candidates),
             "locked": locked}).fetchall()]
        if not found:
            return PackSweep(len(gone), failed, tuple(gone))
        after = found[-1]
        alive = _alive(conn, found, now)
        keys = [k for k in found if k not in alive]
        bad = set(delete_many(keys)) if keys else set()
        done = [k for k in keys if k not in bad]
        conn.execute("DELETE FROM packs WHERE object_key = ANY(%s)", (done,))
        gone += done
        failed += len(bad)
        if len(found) < batch:
            return PackSweep(len(gone), failed, tuple(gone))


def emptied_by(conn: psycopg.Connection, message_ids: list[uuid.UUID]) -> list[str]:
    """Packs that MESSAGE_IDS are the only indexed members of (erasing them
    leaves nothing there to read)."""
    return [r[0] for r in conn.execute(
        "SELECT DISTINCT mp.pack_key FROM message_packs mp WHERE mp.message_id = ANY(%(ids)s)"
        " AND NOT EXISTS (SELECT 1 FROM message_packs o WHERE o.pack_key = mp.pack_key"
        " AND o.message_id <> ALL(%(ids)s))", {"ids": message_ids})]


def all_sealed(conn: psycopg.Connection, pack_key: str) -> bool:
    """Whether every indexed entry of PACK_KEY is sealed (destroying their keys
    leaves nothing readable in it)."""
    row = conn.execute("SELECT bool_and(format = %s) FROM message_packs WHERE pack_key = %s",
                       (FORMAT_SEALED, pack_key)).fetchone()
    return bool(row and row[0])

