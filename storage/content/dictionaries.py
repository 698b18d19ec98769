"""Per-organisation zstd dictionaries: training, versions, loading, sweeping.

Small templated messages compress poorly alone (zstd has nothing to refer
back to) and several-fold better with a dictionary trained on the same
organisation's recent mail.  Each organisation has versions 1, 2, ... in
`zstd_dictionaries` (one 'current') and one object per version at
`dictionaries/{org_id}/{version}.zdict`.  A stored object names the version
it needs (storage/content/container.py), so restoring never depends on which version
is current.

Lifetime: training a new version retires the previous one; a retired version
is deleted (`sweep_dictionaries`) only once `needed_until` has passed, and
the milter raises `needed_until` to at least the content expiry of every
message it compresses with a version before that message is committed
(`DictionaryUse`).  Dictionaries are never shared across organisations.

Sealed dictionaries.  A dictionary is trained from an organisation's mail and
holds its text (phrases, addresses, templates).  With a master key configured
the object is sealed (AES-256-GCM) directly under the organisation's content
key (storage/content/sealing.py):

    MAGIC (4) | VERSION (1) | nonce (12) | ciphertext of the dictionary | tag (16)

the AAD being the header, the organisation and the version: a dictionary
copied under another organisation or version does not open.  Offboarding the
organisation (its org_keys row deleted) leaves its dictionaries unreadable
wherever their objects still are, as it leaves its messages.  A dictionary
object written unsealed (before the master key was configured) is read as
it is: a zstd dictionary starts with its own magic, never this one.
"""

from __future__ import annotations

import io
import logging
import os
import struct
import threading
import time
import uuid
import weakref
from collections import OrderedDict
from collections.abc import Callable, Collection
from dataclasses import dataclass
from datetime import datetime, timedelta

import psycopg
import zstandard
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from postkeep.storage.content import sealing
from postkeep.storage.content.container import DictionaryRef
from postkeep.storage.content.objects import ObjectStore, read_all
from postkeep.storage.content.parts import Deleter
from postkeep.storage.metadata.db import BackendError, Database

log = logging.getLogger("postkeep.storage")

DEFAULT_DICT_BYTES = 112 * 1024
# Messages larger than this are neither training samples nor dictionary-compressed
# by default (milter.dictionary_max_bytes); a dictionary helps small ones only.
DEFAULT_SAMPLE_MAX_BYTES = 64 * 1024
MIN_SAMPLES = 20
# This many sample messages in a row that cannot be read is object storage
# failing, not a few lost objects: training stops with that error.
UNREADABLE_IN_A_ROW = 5
# A retired dictionary stays at least this long, whatever needed_until says:
# milters may still hold it in their cache for a refresh period.
RETIRED_GRACE = timedelta(days=1)


class DictionaryError(Exception):
    """Training refused (too few samples, unknown organisation...), with the reason."""


@dataclass(frozen=True)
class DictionaryRow:
    org_id: uuid.UUID
    version: int
    dict_id: int
    object_key: str
    size: int
    samples: int
    sample_bytes: int
    state: str
    needed_until: datetime
    created_at: datetime
    retired_at: datetime | None


_COLUMNS = ("org_id, version, dict_id, object_key, size, samples, sample_bytes, state,"
            " needed_until, created_at, retired_at")


def list_dictionaries(conn: psycopg.Connection, org_id: uuid.UUID | None = None
                      ) -> list[DictionaryRow]:
    """Every dictionary version (of ORG_ID), newest first."""
    where = " WHERE org_id = %s" if org_id is not None else ""
    rows = conn.execute(f"SELECT {_COLUMNS} FROM zstd_dictionaries{where}"
                        " ORDER BY org_id, version DESC",
                        (org_id,) if org_id is not None else ()).fetchall()
    return [DictionaryRow(*r) for r in rows]


def current(conn: psycopg.Connection, org_id: uuid.UUID) -> DictionaryRow | None:
    row = conn.execute(f"SELECT {_COLUMNS} FROM zstd_dictionaries"
                       " WHERE org_id = %s AND state = 'current'", (org_id,)).fetchone()
    return DictionaryRow(*row) if row else None


# --- training -----------------------------------------------------------------


@dataclass(frozen=True)
class TrainResult:
    row: DictionaryRow
    plain_bytes: int  # the held-out samples compressed without a dictionary
    dict_bytes: int   # the same with the new dictionary
    raw_bytes: int    # the held-out samples uncompressed


def recent_samples(conn: psycopg.Connection, objects: ObjectStore, org_id: uuid.UUID,
                   now: datetime, *, limit: int = 2000,
                   max_bytes: int = DEFAULT_SAMPLE_MAX_BYTES) -> list[bytes]:
    """Up to LIMIT of ORG_ID's newest messages (at most MAX_BYTES each, content
    still available), restored from object storage.

    One unreadable message is skipped (logged); UNREADABLE_IN_A_ROW in a row
    is object storage failing, a BackendError: training would otherwise go
    on through every message and then blame too few samples.
    """
    from postkeep.storage.content import restore
    from postkeep.storage.content.packs import Location

    rows = conn.execute(
        "SELECT m.object_key, p.pack_offset, p.length, p.format, m.id FROM messages m"
        " LEFT JOIN message_packs p ON p.message_id = m.id"
        " WHERE m.org_id = %s AND m.size <= %s AND m.content_expires_at > %s"
        " AND m.content_erased_at IS NULL ORDER BY m.created_at DESC LIMIT %s",
        (org_id, max_bytes, now, limit)).fetchall()
    samples = []
    unreadable: list[tuple[str, BackendError]] = []  # the current run of failures
    for key, offset, length, fmt, mid in rows:
        where = Location(key, offset, length, fmt) if offset is not None else None
        try:
            sample = b"".join(restore.restore(objects, key, where=where, conn=conn,
                                              message_id=mid))
        except BackendError as exc:
            unreadable.append((key, exc))
            if len(unreadable) >= UNREADABLE_IN_A_ROW:
                raise BackendError("s3", f"{len(unreadable)} messages in a row could not be"
                                   f" read; the last: {exc.reason}") from exc
            continue
        _skipped(unreadable)
        unreadable = []
        samples.append(sample)
    _skipped(unreadable)
    return samples


def _skipped(unreadable: list[tuple[str, BackendError]]) -> None:
    for key, exc in unreadable:
        log.warning("dictionary training: skipping %s: %s", key, exc)


def train(samples: list[bytes], dict_bytes: int = DEFAULT_DICT_BYTES, level: int = 3
          ) -> zstandard.ZstdCompressionDict:
    """A zstd dictionary trained on SAMPLES (DictionaryError if too few)."""
    if len(samples) < MIN_SAMPLES:
        raise DictionaryError(f"{len(samples)} sample messages; at least {MIN_SAMPLES} needed")
    # zstd wants the samples to total well over the dictionary size.
    size = min(dict_bytes, max(1024, sum(map(len, samples)) // 10))
    try:
        return zstandard.train_dictionary(size, list[bytes | bytearray | memoryview](samples),
                                          level=level)
    except zstandard.ZstdError as exc:
        raise DictionaryError(f"zstd could not train on {len(samples)} samples: {exc}") from exc


def _measure(d: zstandard.ZstdCompressionDict, held_out: list[bytes], level: int
             ) -> tuple[int, int, int]:
    plain = zstandard.ZstdCompressor(level=level)
    with_dict = zstandard.ZstdCompressor(level=level, dict_data=d)
    return (sum(len(plain.compress(s)) for s in held_out),
            sum(len(with_dict.compress(s)) for s in held_out),
            sum(map(len, held_out)))


def train_for_org(conn: psycopg.Connection, objects: ObjectStore, org_id: uuid.UUID,
                  now: datetime, *, limit: int = 2000, dict_bytes: int = DEFAULT_DICT_BYTES,
                  max_bytes: int = DEFAULT_SAMPLE_MAX_BYTES, level: int = 3) -> TrainResult:
    """Train on ORG_ID's recent mail, store it as the next version and make it current.

    One sample in ten is held out to measure what the dictionary gains.  The
    object is written before the row, so a row never names a missing object.
    """
    samples = recent_samples(conn, objects, org_id, now, limit=limit, max_bytes=max_bytes)
    held_out = samples[::10]
    training = [s for i, s in enumerate(samples) if i % 10] or samples
    d = train(training, dict_bytes, level)
    data = d.as_bytes()
    with conn.transaction():
        # One trainer per organisation at a time; versions never collide.
        conn.execute("SELECT pg_advisory_xact_lock(hashtext('postkeep.dict'), hashtext(%s))",
                     (str(org_id),))
        row = conn.execute("SELECT coalesce(max(version), 0) + 1 FROM zstd_dictionaries"
                           " WHERE org_id = %s", (org_id,)).fetchone()
        version = int(row[0]) if row else 1
        ref = DictionaryRef(str(org_id), version)
        stored = seal_dictionary(conn, ref, data)
        objects.put(ref.key, io.BytesIO(stored), len(stored))
        conn.execute("UPDATE zstd_dictionaries SET state = 'retired', retired_at = %s"
                     " WHERE org_id = %s AND state = 'current'", (now, org_id))
        conn.execute(
            "INSERT INTO zstd_dictionaries (org_id, version, dict_id, object_key, size,"
            " samples, sample_bytes, state, created_at) VALUES (%s, %s, %s, %s, %s, %s, %s,"
            " 'current', %s)",
            (org_id, version, d.dict_id(), ref.key, len(data), len(training),
             sum(map(len, training)), now))
    made = current(conn, org_id)
    assert made is not None
    plain, dicted, raw = _measure(d, held_out, level)
    log.info("dictionary trained org=%s version=%d samples=%d size=%d held-out %d -> %d"
             " (plain) / %d (dictionary)", org_id, version, len(training), len(data), raw,
             plain, dicted)
    return TrainResult(made, plain, dicted, raw)


def train_due(conn: psycopg.Connection, objects: ObjectStore, now: datetime, *,
              every: timedelta = timedelta(days=7), min_messages: int = 200,
              only: Collection[uuid.UUID] | None = None) -> list[TrainResult]:
    """For a scheduler (the sidecar): train every organisation (of ONLY, if
    given) whose current dictionary is older than EVERY (or that has none)
    and that sent at least MIN_MESSAGES small messages since.  Failures are
    logged, not raised."""
    orgs = conn.execute(
        "SELECT o.id FROM organisations o"
        " LEFT JOIN zstd_dictionaries d ON d.org_id = o.id AND d.state = 'current'"
        " WHERE (d.created_at IS NULL OR d.created_at < %s)"
        " AND (%s::uuid[] IS NULL OR o.id = ANY(%s::uuid[]))",
        (now - every, list(only) if only is not None else None,
         list(only) if only is not None else None)).fetchall()
    done = []
    for (org_id,) in orgs:
        row = conn.execute(
            "SELECT count(*) FROM messages WHERE org_id = %s AND created_at > %s AND size <= %s",
            (org_id, now - every, DEFAULT_SAMPLE_MAX_BYTES)).fetchone()
        if not row or row[0] < min_messages:
            continue
        try:
            done.append(train_for_org(conn, objects, org_id, now))
        except (DictionaryError, BackendError) as exc:
            log.warning("dictionary training for org=%s failed: %s", org_id, exc)
    return done


# --- the milter's side ------------------------------------------------------------


@dataclass(frozen=True)
class LoadedDictionary:
    """A dictionary ready to compress with (precomputed for one level)."""

    ref: DictionaryRef
    data: zstandard.ZstdCompressionDict


def load_compression_dict(objects: ObjectStore, ref: DictionaryRef, level: int,
                          db: Database | None = None) -> LoadedDictionary:
    raw = read_all(objects, ref.key)
    if is_sealed_dictionary(raw):
        if db is None:
            raise BackendError("s3", f"{ref} is sealed: it is read with its organisation's key")
        raw = db.run(lambda conn: open_dictionary(conn, ref, raw))
    d = zstandard.ZstdCompressionDict(raw)
    d.precompute_compress(level=level)
    return LoadedDictionary(ref, d)


class DictionaryCache:
    """org_id -> its current dictionary, refreshed every REFRESH seconds.

    A refresh is one indexed SELECT; the object is fetched only when the
    version changed.  A backend failure keeps what was loaded (or none) for
    a while: messages are then compressed without, never refused for it.
    """

    def __init__(self, db: Database, objects: ObjectStore, *, refresh: float = 300.0,
                 level: int = 3, clock: Callable[[], float] = time.monotonic) -> None:
        self._db = db
        self._objects = objects
        self._refresh = refresh
        self._level = level
        self._clock = clock
        self._entries: dict[uuid.UUID, tuple[LoadedDictionary | None, float]] = {}
        self._loading: set[uuid.UUID] = set()
        self._lock = threading.Lock()

    def get(self, org_id: uuid.UUID) -> LoadedDictionary | None:
        now = self._clock()
        entry = self._entries.get(org_id)
        if entry is not None and entry[1] > now:
            return entry[0]
        with self._lock:  # one refresher per organisation; others use what is there
            if org_id in self._loading:
                return entry[0] if entry else None
            self._loading.add(org_id)
        try:
            loaded = self._load(org_id, entry[0] if entry else None)
            self._entries[org_id] = (loaded, now + self._refresh)
            return loaded
        except BackendError as exc:
            log.warning("dictionary for org=%s not refreshed: %s", org_id, exc)
            kept = entry[0] if entry else None
            self._entries[org_id] = (kept, now + min(self._refresh, 30.0))
            return kept
        finally:
            with self._lock:
                self._loading.discard(org_id)

    def _load(self, org_id: uuid.UUID, have: LoadedDictionary | None) -> LoadedDictionary | None:
        row = self._db.run(lambda conn: conn.execute(
            "SELECT version FROM zstd_dictionaries WHERE org_id = %s AND state = 'current'",
            (org_id,)).fetchone())
        if row is None:
            return None
        ref = DictionaryRef(str(org_id), int(row[0]))
        if have is not None and have.ref == ref:
            return have
        loaded = load_compression_dict(self._objects, ref, self._level, self._db)
        log.info("dictionary loaded org=%s version=%d", org_id, ref.version)
        return loaded


class DictionaryUse:
    """Raises a version's needed_until before messages using it are committed.

    Written as (content expiry + SLACK) and remembered, so a dictionary in
    steady use costs one UPDATE per SLACK, not one per message.  If the
    version is gone (swept), BackendError: the message must be tempfailed,
    since its content was compressed with it.
    """

    def __init__(self, slack: timedelta = timedelta(days=1)) -> None:
        self._slack = slack
        self._known: dict[DictionaryRef, datetime] = {}

    def ensure(self, db: Database, ref: DictionaryRef, until: datetime) -> None:
        known = self._known.get(ref)
        if known is not None and known >= until:
            return
        row = db.run(lambda conn: conn.execute(
            "UPDATE zstd_dictionaries SET needed_until = greatest(needed_until, %s)"
            " WHERE org_id = %s AND version = %s AND state IN ('current', 'retired')"
            " RETURNING needed_until",
            (until + self._slack, ref.org_id, ref.version)).fetchone())
        if row is None:
            raise BackendError("postgres", f"{ref} is no longer available; retry")
        self._known[ref] = row[0]


# --- restoring and sweeping -------------------------------------------------------


class _DictCache:
    """A few decompression dictionaries per object store (restoring many
    messages of one organisation fetches its dictionary once)."""

    def __init__(self, size: int = 16) -> None:
        self._stores: weakref.WeakKeyDictionary[
            object, OrderedDict[str, zstandard.ZstdCompressionDict]] = weakref.WeakKeyDictionary()
        self._size = size
        self._lock = threading.Lock()

    def get(self, store: object, key: str) -> zstandard.ZstdCompressionDict | None:
        with self._lock:
            items = self._stores.get(store)
            d = items.get(key) if items is not None else None
            if d is not None and items is not None:
                items.move_to_end(key)
            return d

    def put(self, store: object, key: str, d: zstandard.ZstdCompressionDict) -> None:
        with self._lock:
            items = self._stores.setdefault(store, OrderedDict())
            items[key] = d
            while len(items) > self._size:
                items.popitem(last=False)


_RESTORE_CACHE = _DictCache()


def for_restore(objects: ObjectStore, ref: DictionaryRef, needed_by: str,
                conn: psycopg.Connection | None = None) -> zstandard.ZstdCompressionDict:
    """The dictionary REF to decompress NEEDED_BY; BackendError naming it if
    missing.  A sealed one is opened with its organisation's key over CONN."""
    d = _RESTORE_CACHE.get(objects, ref.key)
    if d is not None:
        return d
    try:
        raw = read_all(objects, ref.key)
    except BackendError as exc:
        raise BackendError("s3", f"{needed_by} needs zstd {ref}, which cannot be read:"
                           f" {exc.reason}") from exc
    if is_sealed_dictionary(raw):
        if conn is None:
            raise BackendError("s3", f"{needed_by} needs zstd {ref}, which is sealed: it is"
                               " read with its organisation's key (restore_message)")
        raw = open_dictionary(conn, ref, raw)
    d = zstandard.ZstdCompressionDict(raw)
    _RESTORE_CACHE.put(objects, ref.key, d)
    return d


def sweepable(conn: psycopg.Connection, now: datetime) -> list[tuple[uuid.UUID, int, str]]:
    """(org_id, version, object_key) that sweep_dictionaries would delete at NOW."""
    return [(r[0], r[1], r[2]) for r in conn.execute(
        "SELECT org_id, version, object_key FROM zstd_dictionaries WHERE state = 'deleting'"
        " OR (state = 'retired' AND needed_until < %s AND retired_at < %s)"
        " ORDER BY org_id, version", (now, now - RETIRED_GRACE))]


def sweep_dictionaries(conn: psycopg.Connection, objects: Deleter, now: datetime) -> int:
    """Delete retired versions no stored message can need any more; return how many.

    Marked 'deleting' first (the milter's DictionaryUse then refuses them),
    then the object, then the row; a crash in between is finished next run.
    """
    conn.execute(
        "UPDATE zstd_dictionaries SET state = 'deleting' WHERE state = 'retired'"
        " AND needed_until < %s AND retired_at < %s", (now, now - RETIRED_GRACE))
    rows = conn.execute("SELECT org_id, version, object_key FROM zstd_dictionaries"
                        " WHERE state = 'deleting'").fetchall()
    for org_id, version, key in rows:
        objects.delete(key)
        conn.execute("DELETE FROM zstd_dictionaries WHERE org_id = %s AND version = %s"
                     " AND state = 'deleting'", (org_id, version))
        log.info("dictionary deleted org=%s version=%d", org_id, version)
    return len(rows)


# --- sealed dictionaries ------------------------------------------------------------

SEALED_MAGIC = b"\x89PKD"
SEALED_VERSION = 1
_SEALED_HEADER = struct.Struct(">4sB12s")
_AAD_DICT = b"postkeep-dictionary-v1\x00"


def is_sealed_dictionary(head: bytes) -> bool:
    """Whether a dictionary object starting with HEAD is sealed."""
    return head[:4] == SEALED_MAGIC


def _dict_aad(header: bytes, ref: DictionaryRef) -> bytes:
    return _AAD_DICT + header + uuid.UUID(ref.org_id).bytes + ref.version.to_bytes(4, "big")


def seal_dictionary(conn: psycopg.Connection, ref: DictionaryRef, data: bytes) -> bytes:
    """DATA (REF's dictionary) sealed under its organisation's key, or as it is
    when sealing is off (no master key)."""
    ring = sealing.keyring()
    if ring is None:
        return data
    org_key = ring.org_key(conn, uuid.UUID(ref.org_id), create=True)
    assert org_key is not None
    header = _SEALED_HEADER.pack(SEALED_MAGIC, SEALED_VERSION, os.urandom(12))
    return header + AESGCM(org_key).encrypt(header[-12:], data, _dict_aad(header, ref))


def open_dictionary(conn: psycopg.Connection, ref: DictionaryRef, raw: bytes) -> bytes:
    """REF's dictionary from its sealed object RAW; ContentErased-like SealError
    if its organisation's key is gone, SealError if the bytes do not open."""
    if len(raw) < _SEALED_HEADER.size + 16:
        raise sealing.SealError(f"{ref}: sealed dictionary truncated ({len(raw)} bytes)")
    _magic, version, nonce = _SEALED_HEADER.unpack_from(raw)
    if version != SEALED_VERSION:
        raise sealing.SealError(f"{ref}: sealed dictionary version {version} is not supported")
    org_key = sealing.required().org_key(conn, uuid.UUID(ref.org_id), create=False)
    if org_key is None:
        raise sealing.SealError(f"{ref}: content erased (organisation {ref.org_id} has no"
                                " content key: removed)")
    header = raw[:_SEALED_HEADER.size]
    try:
        return AESGCM(org_key).decrypt(nonce, raw[_SEALED_HEADER.size:], _dict_aad(header, ref))
    except InvalidTag:
        raise sealing.SealError(f"{ref}: the sealed dictionary does not authenticate (altered,"
                                " or another organisation's or version's)") from None
