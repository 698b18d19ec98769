"""Sealed shared parts: each part object under its own key (crypto-shredding).

A large part is stored once per organisation and referenced by every
message that carries it (storage/content/parts.py), so no message's data
key can seal it: its bytes outlive any one message.  When a master key is
configured, each part object is a sealed stream (storage/content/
sealed_stream.py) of its zstd frames under a random 256-bit part key made
for that object alone, wrapped by the organisation's content key
(storage/content/sealing.py) and kept in `part_keys` (0031_part_keys.sql):

    master key -> org key (org_keys) -> part key (part_keys) -> part object

The wrap's AAD is the organisation and the object key, and so is the
stream's binding: a key row or an object moved to another part or tenant
does not open.  The row is destroyed (`destroy`) when the part's last
reference goes, before the object is deleted: erasing the last message
using it (parts.release_message_parts) or sweeping an expired part
(parts.sweep_parts); removing the organisation removes the rows with its
org_keys row.  From then on the part's bytes, wherever they still are (a
bucket under Object Lock, a replica, a backup of the bucket), are noise.
What this does not promise: copies of part_keys in database backups live as
long as those backups (README, *Sealed content and crypto-shredding*).

Part objects written without a master key, or before it was configured,
stay plain zstd and are read as before: restore looks at the first bytes.
"""

from __future__ import annotations

import itertools
import os
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import psycopg
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from postkeep.storage.content import sealed_stream, sealing
from postkeep.storage.metadata.db import BackendError, Database

_AAD_KEY = b"postkeep-part-key-v1\x00"
_BINDING = b"postkeep-part-v1\x00"


class PartErased(sealing.SealError):
    """The part's key is gone: its last reference was erased or expired, or its
    organisation removed.  Its bytes cannot be read."""


@dataclass(frozen=True)
class PartKey:
    """A new part object's key, and the same wrapped for part_keys."""

    org_id: uuid.UUID
    object_key: str
    key: bytes
    wrapped: bytes

    def __repr__(self) -> str:  # never the key
        return f"PartKey({self.object_key})"


def _aad(org_id: uuid.UUID, object_key: str) -> bytes:
    return _AAD_KEY + org_id.bytes + object_key.encode()


def _binding(org_id: uuid.UUID, object_key: str) -> bytes:
    return _BINDING + org_id.bytes + object_key.encode()


def new_key(db: Database, org_id: uuid.UUID, object_key: str) -> PartKey | None:
    """A fresh key for the part object OBJECT_KEY of ORG_ID, or None when
    sealing is off (no master key).  Reads (or makes) the organisation's key
    once per process: BackendError if PostgreSQL is down then."""
    ring = sealing.keyring()
    if ring is None:
        return None
    org_key = db.run(lambda conn: ring.org_key(conn, org_id, create=True))  # cached after once
    assert org_key is not None
    key = os.urandom(32)
    nonce = os.urandom(12)
    wrapped = nonce + AESGCM(org_key).encrypt(nonce, key, _aad(org_id, object_key))
    return PartKey(org_id, object_key, key, wrapped)


def seal(pk: PartKey, chunks: Iterable[bytes]) -> Iterator[bytes]:
    """The part object's bytes (zstd frames in CHUNKS) sealed under PK."""
    return sealed_stream.seal(pk.key, _binding(pk.org_id, pk.object_key), chunks)


def record(conn: psycopg.Connection, pk: PartKey) -> None:
    """Insert PK's row (in the transaction that inserts the part's row)."""
    conn.execute("INSERT INTO part_keys (org_id, object_key, wrapped) VALUES (%s, %s, %s)"
                 " ON CONFLICT DO NOTHING", (pk.org_id, pk.object_key, pk.wrapped))


def destroy(conn: psycopg.Connection, object_keys: list[str]) -> int:
    """Delete the keys of OBJECT_KEYS: those parts are unreadable from now on."""
    if not object_keys:
        return 0
    return conn.execute("DELETE FROM part_keys WHERE object_key = ANY(%s)",
                        (object_keys,)).rowcount


def exists(conn: psycopg.Connection, object_key: str) -> bool:
    """Whether OBJECT_KEY has a part key (its object is sealed and readable)."""
    return conn.execute("SELECT 1 FROM part_keys WHERE object_key = %s",
                        (object_key,)).fetchone() is not None


def _key(conn: psycopg.Connection, object_key: str) -> tuple[uuid.UUID, bytes]:
    """(org id, part key) of OBJECT_KEY; PartErased if it is gone."""
    row = conn.execute("SELECT org_id, wrapped FROM part_keys WHERE object_key = %s",
                       (object_key,)).fetchone()
    if row is None:
        raise PartErased(f"part {object_key}: content erased (its part key was destroyed:"
                         " its last message erased or expired, or its organisation removed)")
    org = row[0]
    org_key = sealing.required().org_key(conn, org, create=False)
    if org_key is None:
        raise PartErased(f"part {object_key}: content erased (organisation {org} has no"
                         " content key)")
    wrapped = bytes(row[1])
    try:
        return org, AESGCM(org_key).decrypt(wrapped[:12], wrapped[12:], _aad(org, object_key))
    except InvalidTag:
        raise sealing.SealError(f"part {object_key}: its wrapped key does not open (the key"
                                " row was altered or belongs to another part)") from None


def open_part(conn: psycopg.Connection | None, object_key: str, chunks: Iterator[bytes]
              ) -> Iterator[bytes]:
    """A part object's zstd frames from its CHUNKS: as they are if plain, opened
    with its part key (read over CONN) if sealed."""
    first = b""
    for first in chunks:
        if first:
            break
    if not sealed_stream.is_sealed(first):
        return itertools.chain([first], chunks)
    if conn is None:
        raise BackendError("s3", f"part {object_key} is sealed: it is read with its key"
                                 " (restore_message)")
    org, key = _key(conn, object_key)
    return sealed_stream.open_stream(key, _binding(org, object_key),
                                     itertools.chain([first], chunks), object_key)
