"""DKIM keys per domain and selector: generation, encryption at rest, rotation.

SQL for `dkim_keys` (migration 0002) lives here.  Private keys are stored as
PKCS#8 DER sealed with AES-256-GCM under a master key that comes from the
environment or a private file (`[dkim] master_key` / `master_key_file`),
never from the database.  The associated data binds each ciphertext to its
domain, selector and algorithm, so a row copied onto another selector or
domain fails to decrypt instead of signing for the wrong name.

Rotation is data, not a procedure.  At any time T a key is in one state:

- staged:  `active_from` NULL or after T; its DNS record is published so it
  has propagated when it becomes active.
- active:  for its (domain, algorithm), the key with the newest `active_from`
  <= T among those not retired.  One per algorithm, so a domain with an RSA
  and an Ed25519 key is dual-signed.
- grace:   `active_from` <= T, not retired, but superseded by a newer key of
  the same algorithm: no longer signs, its DNS record must stay so that mail
  signed before the switch still verifies.
- retired: `retire_after` <= T: neither signs nor is published.

`activate` makes a selector active at a time and sets every key it
supersedes to retire after that time plus a grace period.  State changes
with time alone, so readers pick the active set in Python at the moment of
signing (`select_active`) from a `KeyRing` loaded once; `change_marker` is a
one-row read the milter polls to reload the ring when keys change.

Nothing here logs, and no exception text carries key material.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Literal

import psycopg
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from postkeep.config import ConfigError, DkimConfig
from postkeep.signing_keys import ALGORITHMS, Algorithm, PrivateKey, algorithm_of
from postkeep.storage.metadata.db import BackendError, Database

State = Literal["staged", "active", "grace", "retired"]
MASTER_KEY_ENV = "POSTKEEP_DKIM_MASTER_KEY"
RSA_BITS = 2048
DNS_STRING_MAX = 255  # one <character-string> in a TXT record

_AAD_PREFIX = b"postkeep-dkim-key-v1\x00"


class DkimKeyError(Exception):
    """A key operation refused; the text names the domain/selector and why."""


# --- the master key ------------------------------------------------------------


@dataclass(frozen=True)
class MasterKey:
    """The AES-256 key that seals private keys; `key_id` names it without revealing it."""

    key: bytes = field(repr=False)
    key_id: str

    @classmethod
    def from_bytes(cls, key: bytes) -> MasterKey:
        if len(key) != 32:
            raise ValueError(f"master key of {len(key)} bytes: expected 32")
        digest = hashlib.sha256(b"postkeep dkim master key id\x00" + key).hexdigest()
        return cls(key, digest[:16])


def load_master_key(cfg: DkimConfig) -> MasterKey:
    """The master key from [dkim] (TOML, $POSTKEEP_DKIM_MASTER_KEY or master_key_file).

    ConfigError names where it came from, never its value.  The file's mode is
    already checked by the configuration loader (0600 or 0400 only).
    """
    if cfg.master_key_file:
        source = f"dkim.master_key_file = {cfg.master_key_file!r}"
    else:
        source = f"dkim.master_key (or ${MASTER_KEY_ENV})"
    if not cfg.master_key:
        raise ConfigError(
            f"dkim.master_key: not set; set ${MASTER_KEY_ENV} or dkim.master_key_file"
            " to base64 of 32 random bytes (head -c32 /dev/urandom | base64)"
        )
    try:
        raw = base64.b64decode(cfg.master_key.strip(), validate=True)
    except binascii.Error:
        raise ConfigError(f"{source}: not valid base64; expected base64 of 32 bytes") from None
    if len(raw) != 32:
        raise ConfigError(f"{source}: decodes to {len(raw)} bytes; expected base64 of 32 bytes")
    return MasterKey.from_bytes(raw)


def _aad(domain: str, selector: str, algorithm: str) -> bytes:
    return _AAD_PREFIX + b"\x00".join(s.encode("utf-8") for s in (domain, selector, algorithm))


@dataclass(frozen=True)
class SealedKey:
    """A private key as stored: AES-256-GCM ciphertext, its nonce, the master key's id."""

    ciphertext: bytes = field(repr=False)
    nonce: bytes
    master_key_id: str


def seal_private_key(
    master: MasterKey, key: PrivateKey, domain: str, selector: str
) -> SealedKey:
    """Encrypt KEY (PKCS#8 DER) for storage under DOMAIN/SELECTOR."""
    der = key.private_bytes(
        serialization.Encoding.DER,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    nonce = os.urandom(12)
    aad = _aad(domain, selector, algorithm_of(key))
    return SealedKey(AESGCM(master.key).encrypt(nonce, der, aad), nonce, master.key_id)


def open_private_key(
    master: MasterKey, sealed: SealedKey, domain: str, selector: str, algorithm: str
) -> PrivateKey:
    """Decrypt a stored key; DkimKeyError if the master key or the row does not match."""
    name = f"{selector}._domainkey.{domain}"
    if sealed.master_key_id != master.key_id:
        raise DkimKeyError(
            f"key {name} is sealed under master key id {sealed.master_key_id}; the configured"
            f" master key has id {master.key_id}"
        )
    try:
        der = AESGCM(master.key).decrypt(
            sealed.nonce, sealed.ciphertext, _aad(domain, selector, algorithm)
        )
    except InvalidTag:
        raise DkimKeyError(
            f"key {name} does not decrypt: the row was altered or moved to another"
            " domain/selector/algorithm"
        ) from None
    key = serialization.load_der_private_key(der, password=None)
    if not isinstance(key, rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey):
        raise DkimKeyError(f"key {name}: unexpected key type {type(key).__name__}")
    if algorithm_of(key) != algorithm:
        raise DkimKeyError(f"key {name}: stored as {algorithm} but is {algorithm_of(key)}")
    return key


# --- keys and their DNS records (pure) -------------------------------------------


def generate_private_key(algorithm: Algorithm = "rsa-sha256", bits: int = RSA_BITS) -> PrivateKey:
    """A fresh key: RSA (2048 bits by default, e = 65537) or Ed25519."""
    if algorithm == "rsa-sha256":
        return rsa.generate_private_key(public_exponent=65537, key_size=bits)
    if algorithm == "ed25519-sha256":
        return ed25519.Ed25519PrivateKey.generate()
    raise DkimKeyError(f"algorithm {algorithm!r}: expected one of {', '.join(ALGORITHMS)}")


def public_key_bytes(key: PrivateKey) -> bytes:
    """What the DNS p= tag carries, decoded: SPKI DER for RSA, 32 raw bytes for Ed25519."""
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
    return key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def dns_txt_value(algorithm: str, public_key: bytes) -> str:
    """The TXT record's text: `v=DKIM1; k=rsa; p=...` or `v=DKIM1; k=ed25519; p=...`."""
    k = "ed25519" if algorithm == "ed25519-sha256" else "rsa"
    return f"v=DKIM1; k={k}; p={base64.b64encode(public_key).decode('ascii')}"


def dns_txt_strings(value: str) -> list[str]:
    """VALUE cut into character-strings of at most 255 bytes (RFC 1035), in order."""
    return [value[i : i + DNS_STRING_MAX] for i in range(0, len(value), DNS_STRING_MAX)] or [""]


def dns_name(domain: str, selector: str) -> str:
    """The owner name of a key's record: SELECTOR._domainkey.DOMAIN."""
    return f"{selector}._domainkey.{domain}"


def zone_record(domain: str, selector: str, value: str) -> str:
    """One zone-file line publishing VALUE, split into 255-byte strings."""
    strings = " ".join(f'"{s}"' for s in dns_txt_strings(value))
    return f"{dns_name(domain, selector)}. IN TXT ( {strings} )"


# --- rows and states (pure) --------------------------------------------------------


@dataclass(frozen=True)
class DkimKey:
    """A dkim_keys row, without its private key."""

    id: int
    org_id: uuid.UUID
    domain: str
    selector: str
    algorithm: Algorithm
    public_key: bytes = field(repr=False)
    created_at: datetime
    active_from: datetime | None
    retire_after: datetime | None
    updated_at: datetime

    @property
    def txt_value(self) -> str:
        return dns_txt_value(self.algorithm, self.public_key)

    @property
    def zone_record(self) -> str:
        return zone_record(self.domain, self.selector, self.txt_value)


def select_active(keys: Iterable[DkimKey], at: datetime) -> dict[tuple[str, str], DkimKey]:
    """The active key per (domain, algorithm) at AT: newest active_from <= AT, not retired."""
    best: dict[tuple[str, str], DkimKey] = {}
    for k in keys:
        if k.active_from is None or k.active_from > at:
            continue
        if k.retire_after is not None and k.retire_after <= at:
            continue
        cur = best.get((k.domain, k.algorithm))
        if cur is None or (k.active_from, k.id) > (cur.active_from, cur.id):
            best[(k.domain, k.algorithm)] = k
    return best


def key_states(keys: Iterable[DkimKey], at: datetime) -> list[tuple[DkimKey, State]]:
    """Every key with its state at AT (see the module docstring)."""
    keys = list(keys)
    active_ids = {k.id for k in select_active(keys, at).values()}
    out: list[tuple[DkimKey, State]] = []
    for k in keys:
        state: State
        if k.retire_after is not None and k.retire_after <= at:
            state = "retired"
        elif k.active_from is None or k.active_from > at:
            state = "staged"
        elif k.id in active_ids:
            state = "active"
        else:
            state = "grace"
        out.append((k, state))
    return out


def published(keys: Iterable[DkimKey], at: datetime) -> list[DkimKey]:
    """Keys whose DNS record must be published at AT: staged, active and grace."""
    return [k for k, state in key_states(keys, at) if state != "retired"]


# --- SQL ---------------------------------------------------------------------------

_COLUMNS = (
    "id, org_id, domain, selector, algorithm, public_key, created_at, active_from,"
    " retire_after, updated_at"
)


def _row(row: tuple[object, ...]) -> DkimKey:
    kid, org_id, domain, selector, algorithm, pub, created, active, retire, updated = row
    assert isinstance(kid, int) and isinstance(org_id, uuid.UUID)
    assert isinstance(domain, str) and isinstance(selector, str)
    assert algorithm in ALGORITHMS and isinstance(pub, bytes)
    assert isinstance(created, datetime) and isinstance(updated, datetime)
    assert active is None or isinstance(active, datetime)
    assert retire is None or isinstance(retire, datetime)
    return DkimKey(kid, org_id, domain, selector, algorithm, pub,
                   created, active, retire, updated)


def store_key(
    conn: psycopg.Connection,
    master: MasterKey,
    domain: str,
    selector: str,
    key: PrivateKey,
    *,
    active_from: datetime | None = None,
) -> DkimKey:
    """Store KEY for DOMAIN/SELECTOR (staged unless ACTIVE_FROM is given).

    DkimKeyError if the domain belongs to no organisation or the selector exists.
    Giving ACTIVE_FROM stores the key only; use `activate` to also retire the
    key it supersedes.
    """
    domain, selector = domain.lower(), selector.lower()
    owner = conn.execute("SELECT org_id FROM domains WHERE domain = %s", (domain,)).fetchone()
    if owner is None:
        raise DkimKeyError(f"unknown domain {domain!r} (add it with `postkeep domain add`)")
    sealed = seal_private_key(master, key, domain, selector)
    row = conn.execute(
        "INSERT INTO dkim_keys (org_id, domain, selector, algorithm, private_key_enc, nonce,"
        " master_key_id, public_key, active_from)"
        " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)"
        f" ON CONFLICT (domain, selector) DO NOTHING RETURNING {_COLUMNS}",
        (owner[0], domain, selector, algorithm_of(key), sealed.ciphertext, sealed.nonce,
         sealed.master_key_id, public_key_bytes(key), active_from),
    ).fetchone()
    if row is None:
        raise DkimKeyError(f"selector {selector!r} already exists for {domain}")
    return _row(row)


def create_key(
    conn: psycopg.Connection,
    master: MasterKey,
    domain: str,
    selector: str,
    algorithm: Algorithm = "rsa-sha256",
    *,
    active_from: datetime | None = None,
) -> DkimKey:
    """Generate a key of ALGORITHM and store it (see `store_key`)."""
    return store_key(
        conn, master, domain, selector, generate_private_key(algorithm), active_from=active_from
    )


def list_keys(conn: psycopg.Connection, domain: str | None = None) -> list[DkimKey]:
    """Keys of DOMAIN (or all), by domain, algorithm, then activation."""
    where, params = ("WHERE domain = %s", (domain.lower(),)) if domain else ("", ())
    rows = conn.execute(
        f"SELECT {_COLUMNS} FROM dkim_keys {where}"
        " ORDER BY domain, algorithm, active_from NULLS LAST, id",
        params,
    ).fetchall()
    return [_row(r) for r in rows]


def get_key(conn: psycopg.Connection, domain: str, selector: str) -> DkimKey | None:
    row = conn.execute(
        f"SELECT {_COLUMNS} FROM dkim_keys WHERE domain = %s AND selector = %s",
        (domain.lower(), selector.lower()),
    ).fetchone()
    return None if row is None else _row(row)


@dataclass(frozen=True)
class Activation:
    """What `activate` did: the key now active from `key.active_from`, and the
    keys it supersedes with their new `retire_after`."""

    key: DkimKey
    superseded: list[DkimKey]


def activate(
    conn: psycopg.Connection, domain: str, selector: str, at: datetime, grace: timedelta
) -> Activation:
    """Make DOMAIN/SELECTOR active from AT; keys of its algorithm active by then retire
    after AT + GRACE (an earlier retire_after is kept).  One transaction."""
    if grace < timedelta(0):
        raise DkimKeyError(f"grace {grace}: must not be negative")
    with conn.transaction():
        target = conn.execute(
            "SELECT id, algorithm FROM dkim_keys WHERE domain = %s AND selector = %s FOR UPDATE",
            (domain.lower(), selector.lower()),
        ).fetchone()
        if target is None:
            raise DkimKeyError(f"no key with selector {selector!r} for domain {domain!r}")
        kid, algorithm = target
        row = conn.execute(
            f"UPDATE dkim_keys SET active_from = %s, retire_after = NULL WHERE id = %s"
            f" RETURNING {_COLUMNS}",
            (at, kid),
        ).fetchone()
        assert row is not None
        old = conn.execute(
            "UPDATE dkim_keys SET retire_after = %s"
            " WHERE domain = %s AND algorithm = %s AND id <> %s"
            " AND active_from IS NOT NULL AND active_from <= %s"
            " AND (retire_after IS NULL OR retire_after > %s)"
            f" RETURNING {_COLUMNS}",
            (at + grace, domain.lower(), algorithm, kid, at, at + grace),
        ).fetchall()
    return Activation(_row(row), [_row(r) for r in old])


def retire(conn: psycopg.Connection, domain: str, selector: str, at: datetime) -> DkimKey:
    """Stop using and publishing DOMAIN/SELECTOR from AT."""
    row = conn.execute(
        f"UPDATE dkim_keys SET retire_after = %s WHERE domain = %s AND selector = %s"
        f" AND active_from IS NOT NULL AND active_from < %s RETURNING {_COLUMNS}",
        (at, domain.lower(), selector.lower(), at),
    ).fetchone()
    if row is None:
        key = get_key(conn, domain, selector)
        if key is None:
            raise DkimKeyError(f"no key with selector {selector!r} for domain {domain!r}")
        raise DkimKeyError(
            f"key {dns_name(key.domain, key.selector)} is not active before {at.isoformat()}:"
            " only a key that has been active can retire (a staged key can simply be left"
            " unpublished)"
        )
    return _row(row)


def change_marker(conn: psycopg.Connection) -> int:
    """A number that moves whenever any dkim_keys row is inserted, updated or deleted."""
    row = conn.execute("SELECT version FROM dkim_key_changes").fetchone()
    return int(row[0]) if row else 0


def missing_key_policy(conn: psycopg.Connection, org_id: uuid.UUID) -> str:
    """'tempfail' or 'unsigned': what to do with an organisation's mail with no active key."""
    row = conn.execute(
        "SELECT dkim_missing_key FROM organisations WHERE id = %s", (org_id,)
    ).fetchone()
    return str(row[0]) if row else "tempfail"


def set_missing_key_policy(conn: psycopg.Connection, org_id: uuid.UUID, policy: str) -> None:
    if policy not in ("tempfail", "unsigned"):
        raise DkimKeyError(f"missing-key policy {policy!r}: expected 'tempfail' or 'unsigned'")
    conn.execute(
        "UPDATE organisations SET dkim_missing_key = %s WHERE id = %s", (policy, org_id)
    )


# --- the key ring the milter signs from ---------------------------------------------


@dataclass(frozen=True)
class SigningKey:
    """A decrypted key ready for `postkeep.milter.dkim.sign`."""

    domain: str
    selector: str
    algorithm: Algorithm
    private_key: PrivateKey = field(repr=False)


class KeyRing:
    """Every key not yet retired when loaded, decrypted on first use.

    Load it with `load_keyring`; call `signing_keys(domain, now)` per message
    (pure, no database) and reload when `change_marker` differs from
    `version`.  Thread-safe: private keys are decrypted once under a lock.
    """

    def __init__(
        self,
        master: MasterKey,
        version: int,
        keys: list[DkimKey],
        sealed: dict[int, SealedKey],
    ) -> None:
        self.version = version
        self._master = master
        self._by_domain: dict[str, list[DkimKey]] = {}
        for k in keys:
            self._by_domain.setdefault(k.domain, []).append(k)
        self._sealed = sealed
        self._opened: dict[int, PrivateKey] = {}
        self._lock = threading.Lock()

    def domains(self) -> list[str]:
        return sorted(self._by_domain)

    def active_keys(self, at: datetime) -> list[DkimKey]:
        """Every key that signs at AT, one per (domain, algorithm)."""
        return [k for keys in self._by_domain.values() for k in select_active(keys, at).values()]

    def signing_keys(self, domain: str, at: datetime) -> list[SigningKey]:
        """The keys to sign DOMAIN's mail with at AT, one per algorithm (rsa first);
        empty if none is active.  DkimKeyError if a key does not decrypt."""
        candidates = self._by_domain.get(domain.lower(), [])
        active = sorted(
            select_active(candidates, at).values(), key=lambda k: k.algorithm != "rsa-sha256"
        )
        return [
            SigningKey(k.domain, k.selector, k.algorithm, self._private(k)) for k in active
        ]

    def _private(self, k: DkimKey) -> PrivateKey:
        key = self._opened.get(k.id)
        if key is None:
            with self._lock:
                key = self._opened.get(k.id)
                if key is None:
                    key = open_private_key(
                        self._master, self._sealed[k.id], k.domain, k.selector, k.algorithm
                    )
                    self._opened[k.id] = key
        return key


def load_keyring(conn: psycopg.Connection, master: MasterKey, at: datetime) -> KeyRing:
    """Every key not retired at AT (staged ones too: they may become active later)."""
    # Read the marker first: a change committed after this read moves it again,
    # so the next poll reloads; the reverse order could miss one.
    version = change_marker(conn)
    rows = conn.execute(
        f"SELECT {_COLUMNS}, private_key_enc, nonce, master_key_id FROM dkim_keys"
        " WHERE retire_after IS NULL OR retire_after > %s",
        (at,),
    ).fetchall()
    return _ring(master, version, rows)


def _ring(master: MasterKey, version: int, rows: list[tuple[object, ...]]) -> KeyRing:
    """A KeyRing over rows of _COLUMNS followed by private_key_enc, nonce, master_key_id."""
    keys, sealed = [], {}
    for r in rows:
        k = _row(r[:10])
        keys.append(k)
        enc, nonce, key_id = r[10:]
        assert isinstance(enc, bytes) and isinstance(nonce, bytes)
        sealed[k.id] = SealedKey(enc, nonce, str(key_id))
    return KeyRing(master, version, keys, sealed)


def active_keys(
    conn: psycopg.Connection, master: MasterKey, domain: str, at: datetime
) -> list[SigningKey]:
    """DOMAIN's signing keys at AT straight from the database (one-off use; the
    milter keeps a `KeyRing` instead of querying per message)."""
    rows = conn.execute(
        f"SELECT {_COLUMNS}, private_key_enc, nonce, master_key_id FROM dkim_keys"
        " WHERE domain = %s AND active_from <= %s AND (retire_after IS NULL OR retire_after > %s)",
        (domain.lower(), at, at),
    ).fetchall()
    return _ring(master, 0, rows).signing_keys(domain, at)


class KeyRingSource:
    """A KeyRing kept fresh for a long-running daemon, safe to share between threads.

    `current(now)` returns the ring, first reloading it when `change_marker`
    has moved; the marker is read at most once per POLL_SECONDS.
    `invalidate()` (e.g. on SIGHUP) forces the check on the next call.  If
    PostgreSQL is unreachable the last ring keeps serving; without one the
    BackendError propagates.
    """

    def __init__(
        self,
        db: Database,
        master: MasterKey,
        poll_seconds: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._db = db
        self._master = master
        self._poll = poll_seconds
        self._clock = clock
        self._ring: KeyRing | None = None
        self._checked = float("-inf")
        self._lock = threading.Lock()

    def invalidate(self) -> None:
        self._checked = float("-inf")

    def current(self, now: datetime, *, force: bool = False) -> KeyRing:
        """The ring, reloaded first if the marker moved (checked at most once per
        poll period, or now with FORCE, which also raises BackendError rather
        than serving the last ring)."""
        ring = self._ring
        if not force and ring is not None and self._clock() - self._checked < self._poll:
            return ring
        with self._lock:
            ring = self._ring
            if not force and ring is not None and self._clock() - self._checked < self._poll:
                return ring  # another thread refreshed it meanwhile
            try:
                with self._db.connection() as conn:
                    if ring is None or change_marker(conn) != ring.version:
                        ring = load_keyring(conn, self._master, now)
            except BackendError:
                if ring is None or force:
                    raise
            self._ring = ring
            self._checked = self._clock()
            return ring
