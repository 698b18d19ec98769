"""Sealed content: each message encrypted with its own key (crypto-shredding).

A packed message's entry (storage/content/packs.py) is its compressed
object encrypted with AES-256-GCM under a random 256-bit data key made for
that message alone.  The keys form a chain, each wrapped (AES-256-GCM, a
fresh nonce) by the one above:

    master key   [storage] master_key_file; never in the database, never logged
    org key      org_keys: one per organisation (AAD: its org id)
    data key     message_keys: one per message (AAD: org id + message id),
                 partitioned by the message's content expiry (0026_sealing.sql)

Destroying a key destroys what it seals, wherever the ciphertext is (a pack
other messages still share, a bucket under Object Lock, a replica):
deleting a message_keys row erases that message; dropping a partition
expires a month of content; deleting the org_keys row (organisation removal)
erases the whole organisation.

The sealed format (one entry, in memory: packed entries are small):

    MAGIC (4) | VERSION (1) | content expiry, microseconds since 1970 UTC, big-endian (8)
    | nonce (12) | AES-256-GCM ciphertext of the compressed object | tag (16)

The expiry in the header says which partition holds the key (or
'infinity', where a legal hold moved it).  The AAD is the header plus the
organisation and message ids, so an entry moved to another message or
tenant (or a header edited) does not authenticate: the error says so.

The same chain seals what no single message owns: shared large parts under
keys of their own (storage/content/part_keys.py), dictionaries under the
organisation key (dictionaries.py); the outage spool, written while
PostgreSQL may be down, under per-file keys the master key wraps
(spool.py, `master_wrap`).

One process-wide Keyring, `install`ed from the configuration by each daemon
and CLI command; None: new content is written unsealed and sealed content
cannot be read (the error names storage.master_key_file).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import struct
import threading
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import psycopg
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from postkeep.config import StorageConfig
from postkeep.storage.metadata.db import BackendError

MAGIC = b"\x89PKS"  # like the container's: never a zstd frame's first bytes
VERSION = 1
_HEADER = struct.Struct(">4sBq12s")
HEADER_LEN = _HEADER.size  # 25
OVERHEAD = HEADER_LEN + 16  # header + GCM tag
_NEVER = 2**63 - 1  # the header's expiry of content that never expires
_AAD_ORG = b"postkeep-org-key-v1\x00"
_AAD_DATA = b"postkeep-data-key-v1\x00"
_AAD_ENTRY = b"postkeep-entry-v1\x00"


class ContentErased(BackendError):
    """The message's key is gone: its content was erased, expired or its
    organisation removed.  Its bytes, wherever they are, cannot be read."""

    def __init__(self, message_id: uuid.UUID, why: str = "") -> None:
        super().__init__("sealing", f"message {message_id}: content erased (its data key was"
                         " destroyed: erasure, content expiry or organisation removal)"
                         + (f"; {why}" if why else ""))
        self.message_id = message_id


class SealError(BackendError):
    """Sealed bytes that do not open: altered, truncated, or another message's."""

    def __init__(self, reason: str) -> None:
        super().__init__("sealing", reason)


def is_sealed(head: bytes) -> bool:
    """Whether bytes starting with HEAD are a sealed entry."""
    return head[:4] == MAGIC


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_US = timedelta(microseconds=1)


def _micros(expires: datetime | None) -> int:
    """EXPIRES exactly (PostgreSQL keeps microseconds: the key row's partition key)."""
    if expires is None or expires.year >= 9999:
        return _NEVER
    return (expires - _EPOCH) // _US


def _expiry(micros: int) -> datetime:
    return datetime.max.replace(tzinfo=UTC) if micros == _NEVER else _EPOCH + micros * _US


def _wrap(key: bytes, secret: bytes, aad: bytes) -> bytes:
    nonce = os.urandom(12)
    return nonce + AESGCM(key).encrypt(nonce, secret, aad)


def _unwrap(key: bytes, wrapped: bytes, aad: bytes) -> bytes:
    return AESGCM(key).decrypt(wrapped[:12], wrapped[12:], aad)


@dataclass(frozen=True)
class DataKey:
    """A message's data key, and the same wrapped for message_keys."""

    message_id: uuid.UUID
    org_id: uuid.UUID
    expires_at: datetime  # the message's content expiry: its key's partition
    key: bytes
    wrapped: bytes


class Keyring:
    """The master key and the organisation keys it unwrapped (cached: they
    are read once per process and organisation)."""

    def __init__(self, master: bytes, previous: bytes | None = None) -> None:
        for k in (master, previous or master):
            if len(k) != 32:
                raise ValueError(f"master key of {len(k)} bytes: expected 32")
        self._master = master
        self.master_id = master_id(master)
        # During a rotation (storage.previous_master_key_file): the key being
        # retired, read only to open organisation keys it still wraps.
        self._previous = previous if previous != master else None
        self._orgs: dict[uuid.UUID, bytes] = {}
        self._lock = threading.Lock()

    def __repr__(self) -> str:  # never the key
        return f"Keyring(master_id={self.master_id})"

    def org_key(self, conn: psycopg.Connection, org_id: uuid.UUID, create: bool) -> bytes | None:
        """ORG_ID's content key; made and stored first if CREATE and there is
        none (two writers racing keep the first row).  None: there is none."""
        with self._lock:
            if org_id in self._orgs:
                return self._orgs[org_id]
        aad = _AAD_ORG + org_id.bytes
        if create:
            conn.execute("INSERT INTO org_keys (org_id, wrapped, master_id) VALUES (%s, %s, %s)"
                         " ON CONFLICT DO NOTHING",
                         (org_id, _wrap(self._master, os.urandom(32), aad), self.master_id))
        row = conn.execute("SELECT wrapped, master_id FROM org_keys WHERE org_id = %s",
                           (org_id,)).fetchone()
        if row is None:
            return None
        key = self._open_org_key(bytes(row[0]), aad)
        if key is None:
            also = (f" nor storage.previous_master_key (id {master_id(self._previous)})"
                    if self._previous else "")
            raise SealError(f"organisation {org_id}: its content key does not open with the"
                            f" configured storage.master_key (id {self.master_id}){also};"
                            f" the key was wrapped by id {row[1]}")
        with self._lock:
            self._orgs[org_id] = key
        return key

    def _open_org_key(self, wrapped: bytes, aad: bytes) -> bytes | None:
        """The organisation key in WRAPPED, opened with the master key or,
        during a rotation, the previous one; None if neither opens it."""
        for k in (self._master, self._previous):
            if k is not None:
                with contextlib.suppress(InvalidTag):
                    return _unwrap(k, wrapped, aad)
        return None

    def forget(self, org_id: uuid.UUID) -> None:
        """Drop ORG_ID's cached key (its row was deleted)."""
        with self._lock:
            self._orgs.pop(org_id, None)

    def missing_orgs(self, org_ids: set[uuid.UUID]) -> set[uuid.UUID]:
        """Those of ORG_IDS whose key this process has not read yet."""
        with self._lock:
            return {o for o in org_ids if o not in self._orgs}

    def ensure_orgs(self, conn: psycopg.Connection, org_ids: set[uuid.UUID]) -> None:
        """Read (or make) the keys of ORG_IDS, so new_data_keys needs no database."""
        for org in self.missing_orgs(org_ids):
            self.org_key(conn, org, create=True)

    def new_data_keys(self, wanted: list[tuple[uuid.UUID, uuid.UUID, datetime]]
                      ) -> list[DataKey]:
        """A fresh data key for each (message id, org id, content expiry); their
        organisations' keys read first (ensure_orgs)."""
        out = []
        for mid, org, expires in wanted:
            with self._lock:
                org_key = self._orgs.get(org)
            if org_key is None:
                raise SealError(f"organisation {org}: its content key was not read first")
            key = os.urandom(32)
            out.append(DataKey(mid, org, expires, key,
                               _wrap(org_key, key, _AAD_DATA + org.bytes + mid.bytes)))
        return out

    def data_key(self, conn: psycopg.Connection, message_id: uuid.UUID,
                 expires: datetime) -> tuple[uuid.UUID, bytes]:
        """(org id, data key) of MESSAGE_ID, whose content expiry is EXPIRES
        (or whose key a hold moved).  ContentErased if it is gone."""
        row = conn.execute(
            "SELECT org_id, wrapped FROM message_keys WHERE message_id = %s"
            " AND expires_at IN (%s::timestamptz, 'infinity') LIMIT 1",
            (message_id, _pg_ts(expires))).fetchone()
        if row is None:
            # Slow path, failures only (no partition pruning): a key under
            # another expiry means the header is not this message's.
            if conn.execute("SELECT 1 FROM message_keys WHERE message_id = %s",
                            (message_id,)).fetchone():
                raise SealError(f"message {message_id}: the sealed entry read for it does not"
                                " authenticate (its header names another content expiry:"
                                " altered, or another message's entry)")
            raise ContentErased(message_id)
        org = row[0]
        org_key = self.org_key(conn, org, create=False)
        if org_key is None:
            raise ContentErased(message_id, f"organisation {org} has no content key")
        try:
            return org, _unwrap(org_key, bytes(row[1]), _AAD_DATA + org.bytes + message_id.bytes)
        except InvalidTag:
            raise SealError(f"message {message_id}: its wrapped data key does not open"
                            " (the key row was altered or belongs to another message)") from None


# --- keys wrapped by the master key alone (seal-parts) -------------------------------
# The outage spool seals while PostgreSQL may be down: its per-file data key
# is wrapped by the master key directly (storage/content/spool.py).


def master_wrap(ring: Keyring, secret: bytes, aad: bytes) -> bytes:
    """SECRET wrapped (AES-256-GCM, fresh nonce) by RING's master key for AAD."""
    return _wrap(ring._master, secret, aad)


def master_unwrap(ring: Keyring, wrapped: bytes, aad: bytes) -> bytes:
    """The inverse of master_wrap; SealError if it does not open."""
    try:
        return _unwrap(ring._master, wrapped, aad)
    except (InvalidTag, ValueError):
        raise SealError(f"a key wrapped by the master key does not open with the configured"
                        f" one (id {ring.master_id}): altered, or another key's") from None


def _pg_ts(t: datetime) -> str | datetime:
    return "infinity" if t.year >= 9999 else t


# --- the process's keyring ---------------------------------------------------------

_ring: Keyring | None = None


def master_id(master: bytes) -> str:
    """MASTER's id: a hash prefix, never the key (org_keys.master_id, errors)."""
    return hashlib.sha256(b"postkeep content master key id\x00" + master).hexdigest()[:16]


def install(master: bytes | None, previous: bytes | None = None) -> Keyring | None:
    """Use MASTER (storage.master_key; PREVIOUS: storage.previous_master_key,
    during a rotation) in this process; None: sealing off."""
    global _ring
    _ring = Keyring(master, previous) if master else None
    return _ring


def install_config(cfg: StorageConfig) -> Keyring | None:
    """The keyring of [storage] CFG installed in this process (daemons, CLI)."""
    return install(cfg.master_key_bytes(), cfg.previous_master_key_bytes())


def keyring() -> Keyring | None:
    return _ring


@contextlib.contextmanager
def using(master: bytes | None, previous: bytes | None = None) -> Iterator[Keyring | None]:
    """MASTER's keyring (and PREVIOUS's, as install) for the block, the
    process's again after it (a tool or a test reading from more than one
    installation)."""
    global _ring
    before = _ring
    try:
        yield install(master, previous)
    finally:
        _ring = before


def data_keys(conn: psycopg.Connection, wanted: list[tuple[uuid.UUID, uuid.UUID, datetime]]
              ) -> dict[uuid.UUID, DataKey] | None:
    """New data keys for WANTED (message id, org id, content expiry) by message
    id, or None when sealing is off (no master key)."""
    if _ring is None:
        return None
    _ring.ensure_orgs(conn, {w[1] for w in wanted})
    return {k.message_id: k for k in _ring.new_data_keys(wanted)}


def required() -> Keyring:
    """The keyring, or a clear error: sealed content needs the master key."""
    if _ring is None:
        raise SealError("the content is sealed and no master key is configured"
                        " (storage.master_key_file or $POSTKEEP_STORAGE_MASTER_KEY)")
    return _ring


# --- entries -----------------------------------------------------------------------


def seal(key: DataKey, compressed: bytes) -> bytes:
    """COMPRESSED sealed under KEY (see the module docstring for the format)."""
    header = _HEADER.pack(MAGIC, VERSION, _micros(key.expires_at), os.urandom(12))
    aad = _AAD_ENTRY + header + key.org_id.bytes + key.message_id.bytes
    return header + AESGCM(key.key).encrypt(header[-12:], compressed, aad)


def open_sealed(conn: psycopg.Connection, message_id: uuid.UUID, data: bytes,
                where: str) -> bytes:
    """The compressed object sealed in DATA for MESSAGE_ID (read from WHERE,
    named in errors).  ContentErased if its key is gone; SealError if the
    bytes do not authenticate as this message's."""
    if len(data) < OVERHEAD or not is_sealed(data):
        raise SealError(f"{where}: the sealed entry of message {message_id} is truncated"
                        f" or not sealed ({len(data)} bytes)")
    _magic, version, micros, nonce = _HEADER.unpack_from(data)
    if version != VERSION:
        raise SealError(f"{where}: sealed format version {version} is not supported")
    org, key = required().data_key(conn, message_id, _expiry(micros))
    aad = _AAD_ENTRY + data[:HEADER_LEN] + org.bytes + message_id.bytes
    try:
        return AESGCM(key).decrypt(nonce, data[HEADER_LEN:], aad)
    except InvalidTag:
        raise SealError(f"{where}: the sealed entry of message {message_id} does not"
                        " authenticate (altered, or another message's entry)") from None


# --- key rows ----------------------------------------------------------------------


def record(conn: psycopg.Connection, keys: list[DataKey]) -> None:
    """Insert KEYS' rows (in the caller's transaction, with the messages' rows)."""
    if not keys:
        return
    conn.execute(
        "INSERT INTO message_keys (message_id, org_id, expires_at, wrapped)"
        " SELECT * FROM unnest(%s::uuid[], %s::uuid[], %s::timestamptz[], %s::bytea[])"
        " ON CONFLICT DO NOTHING",
        ([k.message_id for k in keys], [k.org_id for k in keys],
         [k.expires_at for k in keys], [k.wrapped for k in keys]))


def destroy(conn: psycopg.Connection, message_ids: list[uuid.UUID]) -> int:
    """Delete the data keys of MESSAGE_IDS: their content is gone for good."""
    if not message_ids:
        return 0
    return conn.execute("DELETE FROM message_keys WHERE message_id = ANY(%s)",
                        (message_ids,)).rowcount


def sealed_ids(conn: psycopg.Connection, message_ids: list[uuid.UUID]) -> set[uuid.UUID]:
    """Those of MESSAGE_IDS that have a data key (their content is sealed)."""
    if not message_ids:
        return set()
    return {r[0] for r in conn.execute(
        "SELECT message_id FROM message_keys WHERE message_id = ANY(%s)", (message_ids,))}


def hold_keys(conn: psycopg.Connection, cutoff: datetime, covered: Callable[[str], str]) -> int:
    """Move to 'infinity' the keys expiring by CUTOFF whose messages a legal
    hold covers (COVERED(alias): the SQL condition), so expiry keeps them."""
    # Only organisations with an active hold: without one, no join at all.
    return conn.execute(
        "UPDATE message_keys k SET expires_at = 'infinity' FROM messages m"
        " WHERE k.expires_at <= %(cut)s AND k.org_id IN (SELECT h.org_id FROM legal_holds h"
        " WHERE h.released_at IS NULL) AND m.id = k.message_id AND m.org_id = k.org_id"
        f" AND {covered('m')}", {"cut": cutoff}).rowcount


# --- keys after a hold's release (storage/lifecycle/holds.py reconcile_released) ---


def release_keys(conn: psycopg.Connection, free: str, params: Mapping[str, object]) -> int:
    """Move back from 'infinity' to their message's content expiry the keys of
    the messages FREE selects (SQL on alias m: those no active hold covers any
    more, PARAMS its values).  A key whose expiry has passed goes at the next
    expire(); the header of each entry names that same expiry, so it still
    opens until then."""
    return conn.execute(
        "UPDATE message_keys k SET expires_at = m.content_expires_at FROM messages m"
        " WHERE k.expires_at = 'infinity' AND m.id = k.message_id AND m.org_id = k.org_id"
        f" AND m.content_expires_at < 'infinity' AND {free}", params).rowcount


def expire(conn: psycopg.Connection, cutoff: datetime) -> tuple[int, int]:
    """(partitions dropped, rows deleted): the keys of content expired by CUTOFF."""
    row = conn.execute("SELECT dropped, deleted FROM expire_keys(%s)", (cutoff,)).fetchone()
    return (int(row[0]), int(row[1])) if row else (0, 0)


# --- master-key rotation (storage/content/rotation.py) ------------------------------


def rewrap_org_key(org_id: uuid.UUID, wrapped: bytes, master_id: str, olds: list[bytes],
                   new: bytes) -> bytes | None:
    """ORG_ID's content key (WRAPPED by MASTER_ID, an org_keys row) wrapped by NEW instead
    of the first of OLDS that opens it; None if NEW already opens it (rotated
    before).  SealError if none of them opens it."""
    aad = _AAD_ORG + org_id.bytes
    with contextlib.suppress(InvalidTag):
        _unwrap(new, wrapped, aad)
        return None
    for old in olds:
        with contextlib.suppress(InvalidTag):
            return _wrap(new, _unwrap(old, wrapped, aad), aad)
    given = ", ".join(Keyring(k).master_id for k in olds)
    raise SealError(f"organisation {org_id}: its content key (wrapped by master key id"
                    f" {master_id}) opens with neither the new master key (id"
                    f" {Keyring(new).master_id})" + (f" nor the old one(s) (id {given})"
                                                     if given else "")
                    + "; give the key that wrapped it with --old-key-file")
