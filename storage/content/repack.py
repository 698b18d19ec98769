"""`postkeep storage repack` and `compact`: rewriting content into packs.

repack: messages stored the old way (one object each) are read, grouped the
way the milter groups a batch (storage/content/packs.py: organisation,
directory, content-expiry day), written as packs, their rows pointed at the
packs, and their old objects deleted.  Not repacked: held objects
(messages/hold/, they stay where a hold put them), inbound mail (unmatched
reports name its object), erased or expired content, objects above
SMALL_BYTES (the milter keeps those alone too).  With a master key
configured the entries are sealed as the milter seals new content
(storage/content/sealing.py); a sealed held copy stays sealed under its key,
and a sealed single object (storage/content/sealed_objects.py: small ones
under the "objects" layout) is sealed again as an entry under its own key.

compact: a pack whose live entries (those with an index row) are less than
THRESHOLD of its bytes is rewritten with only those entries (or deleted if
none is left): this is where the bytes of erased messages finally go.

Both are idempotent and resumable: each batch is "put the new pack, then in
one transaction insert its rows, repoint the messages and list the replaced
objects in pack_leftovers, then delete those objects and their leftover
rows".  A crash leaves either nothing done (an unnamed pack, which the orphan
sweep deletes) or leftovers, which the next run deletes first.
"""

from __future__ import annotations

import io
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

import psycopg

from postkeep.ids import uuid7
from postkeep.storage.content import packs, sealed_objects, sealing
from postkeep.storage.content.objects import ObjectStore, put_content, read_all
from postkeep.storage.metadata.db import BackendError

SMALL_BYTES = 256 * 1024  # as the milter's group commit (small_object_bytes)
DeleteMany = Callable[[list[str]], list[str]]
Progress = Callable[[str], None]


@dataclass
class RepackResult:
    """What a repack or compact pass did (or would do, dry run)."""

    messages: int = 0
    packs_written: int = 0
    objects_deleted: int = 0
    bytes_read: int = 0
    packs_compacted: int = 0
    dead_bytes_freed: int = 0
    failed: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, object]:
        return {"messages": self.messages, "packs_written": self.packs_written,
                "objects_deleted": self.objects_deleted, "bytes_read": self.bytes_read,
                "packs_compacted": self.packs_compacted,
                "dead_bytes_freed": self.dead_bytes_freed, "failed": self.failed[:20]}


def delete_leftovers(conn: psycopg.Connection, delete_many: DeleteMany) -> int:
    """Delete the objects an earlier pass replaced but did not delete; how many."""
    keys = [r[0] for r in conn.execute("SELECT object_key FROM pack_leftovers")]
    if not keys:
        return 0
    bad = set(delete_many(keys))
    done = [k for k in keys if k not in bad]
    conn.execute("DELETE FROM pack_leftovers WHERE object_key = ANY(%s)", (done,))
    if bad:
        raise BackendError("s3", f"{len(bad)} replaced objects not deleted, e.g."
                                 f" {sorted(bad)[0]}; run again")
    return len(done)


_CANDIDATES = (
    "SELECT m.id, m.org_id, m.object_key, m.content_expires_at, m.metadata_expires_at,"
    " m.compressed_size, m.created_at FROM messages m"
    " WHERE m.content_erased_at IS NULL AND m.content_expires_at > %(now)s"
    " AND m.direction <> 'inbound' AND m.compressed_size <= %(small)s"
    " AND m.object_key LIKE 'messages/%%' AND m.object_key NOT LIKE 'messages/hold/%%'"
    " AND m.object_key NOT LIKE '%%.pack' AND (%(org)s::uuid IS NULL OR m.org_id = %(org)s)"
    " AND (m.org_id, m.created_at, m.id) > (%(after_org)s, %(after_c)s, %(after_id)s)"
    " ORDER BY m.org_id, m.created_at, m.id LIMIT %(n)s")


def repack(conn: psycopg.Connection, objects: ObjectStore, delete_many: DeleteMany, *,
           org_id: uuid.UUID | None = None, now: datetime | None = None,
           batch: int = 500, dry_run: bool = False,
           progress: Progress | None = None) -> RepackResult:
    """Move messages stored one object each into packs (see the module docstring)."""
    say = progress or (lambda _line: None)
    now = now or datetime.now(UTC)
    result = RepackResult()
    if not dry_run:
        result.objects_deleted += delete_leftovers(conn, delete_many)
    after: tuple[uuid.UUID, datetime, uuid.UUID] = (
        uuid.UUID(int=0), datetime.min.replace(tzinfo=UTC), uuid.UUID(int=0))
    while True:
        rows = conn.execute(_CANDIDATES, {
            "now": now, "small": SMALL_BYTES, "org": org_id, "after_org": after[0],
            "after_c": after[1], "after_id": after[2], "n": batch}).fetchall()
        if not rows:
            break
        after = (rows[-1][1], rows[-1][6], rows[-1][0])
        if dry_run:
            result.messages += len(rows)
            result.bytes_read += sum(int(r[5]) for r in rows)
            continue
        entries: list[packs.Entry] = []
        old: dict[uuid.UUID, tuple[str, datetime]] = {}
        for mid, org, key, cexp, mexp, _size, _created in rows:
            try:
                data = read_all(objects, key)
                result.bytes_read += len(data)
                if sealed_objects.is_sealed_object(data):
                    data = _reseal(conn, mid, cexp, data, key)
            except BackendError as exc:
                result.failed.append(f"{key}: {exc.reason}")
                continue
            entries.append(packs.Entry(mid, org, key, cexp, data, sealing.is_sealed(data)))
            old[mid] = (key, mexp)
        # Sealed as the milter seals new content, when a master key is configured.
        keys = sealing.data_keys(conn, [(e.message_id, e.org_id, e.content_expires_at)
                                        for e in entries if not e.sealed])
        for pack in packs.build(entries, keys=keys):
            moved = _commit_pack(conn, objects, pack, {m: old[m] for m in pack.members})
            result.messages += len(moved)
            result.packs_written += 1
        result.objects_deleted += delete_leftovers(conn, delete_many)
        say(f"repack: {result.messages} messages in {result.packs_written} packs,"
            f" {result.objects_deleted} old objects deleted")
    return result


def _reseal(conn: psycopg.Connection, message_id: uuid.UUID, expires: datetime,
            data: bytes, key: str) -> bytes:
    """A sealed single object (storage/content/sealed_objects.py) as a sealed
    pack entry under the same data key (its key row stays as it is)."""
    compressed = b"".join(sealed_objects.open_object(conn, message_id, iter([data]), key))
    org, secret = sealing.required().data_key(conn, message_id, expires)
    return sealing.seal(sealing.DataKey(message_id, org, expires, secret, b""), compressed)


def _commit_pack(conn: psycopg.Connection, objects: ObjectStore, pack: packs.Pack,
                 old: dict[uuid.UUID, tuple[str, datetime]]) -> list[uuid.UUID]:
    """Put PACK, then index it and repoint the messages still at their OLD keys
    (one transaction, replaced objects listed as leftovers); the ids moved."""
    body = pack.body.getvalue()
    put_content(objects, pack.key, io.BytesIO(body), len(body), pack.expires_at)
    ids = list(old)
    with conn.transaction():
        moved = [r[0] for r in conn.execute(
            "UPDATE messages m SET object_key = %s FROM unnest(%s::uuid[], %s::text[],"
            " %s::timestamptz[]) AS u(id, key, mexp) WHERE m.id = u.id"
            " AND m.metadata_expires_at = u.mexp AND m.object_key = u.key"
            " AND m.content_erased_at IS NULL RETURNING m.id",
            (pack.key, ids, [old[i][0] for i in ids], [old[i][1] for i in ids])).fetchall()]
        keep = set(moved)
        live = _only(pack, {m: loc for m, loc in pack.members.items() if m in keep})
        packs.record(conn, [live])
        conn.execute(
            "INSERT INTO pack_leftovers (object_key, org_id) SELECT k, %s FROM unnest(%s::text[])"
            " AS k ON CONFLICT DO NOTHING", (pack.org_id, [old[m][0] for m in moved]))
    return moved


def _only(pack: packs.Pack, members: dict[uuid.UUID, packs.Location]
                        ) -> packs.Pack:
    """PACK with only MEMBERS (its body unchanged: the others become dead bytes)."""
    return packs.Pack(pack.key, pack.org_id, pack.expires_at, pack.body, members,
                      [k for k in pack.keys if k.message_id in members])


def compact(conn: psycopg.Connection, objects: ObjectStore, delete_many: DeleteMany, *,
            threshold: float = 0.5, org_id: uuid.UUID | None = None, dry_run: bool = False,
            progress: Progress | None = None) -> RepackResult:
    """Rewrite packs whose live share of bytes is below THRESHOLD (see above)."""
    say = progress or (lambda _line: None)
    result = RepackResult()
    if not dry_run:
        result.objects_deleted += delete_leftovers(conn, delete_many)
    rows = conn.execute(
        "SELECT k.object_key, k.org_id, k.expires_at, k.length,"
        " coalesce(sum(mp.length), 0) FROM packs k"
        " LEFT JOIN message_packs mp ON mp.pack_key = k.object_key"
        " WHERE (%(org)s::uuid IS NULL OR k.org_id = %(org)s)"
        " GROUP BY k.object_key HAVING coalesce(sum(mp.length), 0) < %(t)s * k.length"
        " ORDER BY k.object_key", {"org": org_id, "t": threshold}).fetchall()
    for key, org, expires, length, live in rows:
        result.packs_compacted += 1
        result.dead_bytes_freed += int(length) - int(live)
        if dry_run:
            continue
        members = conn.execute(
            "SELECT message_id, pack_offset, length, format FROM message_packs"
            " WHERE pack_key = %s ORDER BY pack_offset", (key,)).fetchall()
        new: packs.Pack | None = None
        if members:
            new = packs.Pack(packs.pack_key(key, expires, uuid7()), org, expires,
                             io.BytesIO(), {})
            for mid, offset, size, fmt in members:
                # Entries are copied as they are (sealed ones stay sealed).
                data = b"".join(objects.get_range(key, offset, size))
                if len(data) != size:
                    raise BackendError("s3", f"{key}: entry of {mid} is short")
                new.members[mid] = packs.Location(new.key, new.length, size, fmt)
                new.body.write(data)
            body = new.body.getvalue()
            put_content(objects, new.key, io.BytesIO(body), len(body), expires)
            result.packs_written += 1
        with conn.transaction():
            if new is not None:
                conn.execute("INSERT INTO packs (object_key, org_id, expires_at, length,"
                             " messages) VALUES (%s, %s, %s, %s, %s)",
                             (new.key, org, expires, new.length, len(new.members)))
                ids = list(new.members)
                conn.execute(
                    "UPDATE message_packs mp SET pack_key = %s, pack_offset = u.off"
                    " FROM unnest(%s::uuid[], %s::bigint[]) AS u(id, off)"
                    " WHERE mp.message_id = u.id AND mp.pack_key = %s",
                    (new.key, ids, [new.members[i].offset for i in ids], key))
                conn.execute("UPDATE messages SET object_key = %s WHERE object_key = %s"
                             " AND id = ANY(%s)", (new.key, key, ids))
                result.messages += len(ids)
            conn.execute("DELETE FROM packs WHERE object_key = %s", (key,))
            conn.execute("INSERT INTO pack_leftovers (object_key, org_id) VALUES (%s, %s)"
                         " ON CONFLICT DO NOTHING", (key, org))
        result.objects_deleted += delete_leftovers(conn, delete_many)
        say(f"compact: {result.packs_compacted} packs rewritten,"
            f" {result.dead_bytes_freed} dead bytes freed")
    return result
