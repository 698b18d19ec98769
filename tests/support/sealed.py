"""Sealed packs written as the milter writes them, without Postfix: for the
Object Lock tests, whose bucket the stack's milter does not write to."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import uuid
from datetime import UTC, datetime

import psycopg
import zstandard

from postkeep.storage.content import packs, sealing
from postkeep.storage.content.objects import S3ObjectStore, message_key, put_content
from postkeep.storage.metadata import messages


def sealed_pack(db: psycopg.Connection, store: S3ObjectStore, org_id: uuid.UUID, domain: str,
                rcpts: list[str], word: str) -> list[tuple[messages.CapturedMessage, bytes]]:
    """One message to each of RCPTS (its body WORD and its id) in ONE sealed
    pack, put to STORE as milter/committer.py puts it (under Object Lock
    retained until its expiry) and recorded: each message's row (naming the
    pack) and its bytes."""
    created = datetime.now(UTC)
    out, entries = [], []
    for to in rcpts:
        mid = uuid.uuid4()
        raw = f"From: s@{domain}\r\nTo: {to}\r\nSubject: worm\r\n\r\n{word} {mid}\r\n".encode()
        blob = zstandard.ZstdCompressor().compress(raw)
        content_at, metadata_at = messages.expiry_dates(created, 7, 30)
        key = message_key(str(org_id), str(mid), created, content_days=7)
        m = messages.CapturedMessage(
            id=mid, org_id=org_id, domain=domain, queue_id=uuid.uuid4().hex[:10].upper(),
            envelope_from=f"s@{domain}", recipients=(to,), size=len(raw),
            sha256=hashlib.sha256(raw).digest(), object_key=key, compressed_size=len(blob),
            created_at=created, content_expires_at=content_at, metadata_expires_at=metadata_at,
            message_id_header=f"<{mid}@{domain}>", header_from=f"s@{domain}",
            subject="worm")
        entries.append(packs.Entry(mid, org_id, key, content_at, blob))
        out.append((m, raw))
    keys = sealing.data_keys(db, [(e.message_id, e.org_id, e.content_expires_at)
                                  for e in entries])
    assert keys is not None, "the stack seals content (storage.master_key_file)"
    [pack] = packs.build(entries, keys=keys)
    body = pack.body.getvalue()
    put_content(store, pack.key, io.BytesIO(body), len(body), pack.expires_at)
    with db.transaction():
        for m, _ in out:
            messages.record_capture(db, dataclasses.replace(m, object_key=pack.key))
        packs.record(db, [pack])
    return [(dataclasses.replace(m, object_key=pack.key), raw) for m, raw in out]
