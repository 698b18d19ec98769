"""Sealed content under legal holds and master-key rotation, through real
Postfix, PostgreSQL and MinIO (issue 19; storage/content/sealing.py,
storage/lifecycle/holds.py, storage/content/rotation.py).

- A hold moves a covered message's data key to 'infinity' so content expiry
  keeps it; once no active hold covers the message any more, the retention
  run puts the key back to the message's content expiry and, that being
  past, destroys it: restore then says the content is erased.
- Under Object Lock one legal-hold flag covers a whole pack: releasing one
  hold leaves it while another active hold covers another message of the
  pack.
- `postkeep storage rotate-master-key` rewraps every organisation key; the
  content then opens with the new key only; a new key file other users can
  read, or of the wrong length, is refused.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import re
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg
import pytest
import zstandard
from conftest import Invoke, StackEnv, TestOrg
from support import smtp
from support.sealed import sealed_pack
from support.stack import Stack, strip_received

from postkeep import config as config_mod
from postkeep.storage.content import packs, sealing
from postkeep.storage.content.objects import S3ObjectStore, message_key, put_content
from postkeep.storage.content.restore import restore, restore_message
from postkeep.storage.lifecycle import holds, rules
from postkeep.storage.lifecycle.retention import run_retention
from postkeep.storage.metadata import legal_holds, messages

pytestmark = pytest.mark.stack



def _capture(stack: Stack, db: psycopg.Connection, domain: str, to: str) -> tuple[uuid.UUID,
                                                                                   bytes]:
    """One message through Postfix, sealed in its pack: (id, bytes delivered)."""
    token = uuid.uuid4().hex
    data = (f"From: s@{domain}\r\nTo: {to}\r\nSubject: held {token}\r\n"
            f"X-Test-Token: {token}\r\n\r\n" + f"held line {token}\r\n" * 20).encode()
    reply = smtp.send(*stack.smtp, f"s@{domain}", [to], data)
    assert reply.queue_id, reply.text
    delivered = strip_received(stack.sink_copy(token))
    row = db.execute("SELECT id FROM messages WHERE queue_id = %s",
                     (reply.queue_id,)).fetchone()
    assert row is not None, f"no row for {reply.queue_id}"
    return row[0], delivered


def _key_expiry(db: psycopg.Connection, mid: uuid.UUID) -> list[str]:
    """MID's data key rows: 'held' (at 'infinity', where a hold moves it) or
    'own' (at the message's content expiry); [] once destroyed."""
    return [r[0] for r in db.execute(
        "SELECT CASE WHEN k.expires_at = 'infinity' THEN 'held'"
        " WHEN k.expires_at = m.content_expires_at THEN 'own' ELSE k.expires_at::text END"
        " FROM message_keys k LEFT JOIN messages m ON m.id = k.message_id"
        " WHERE k.message_id = %s", (mid,))]


def _expire_now(db: psycopg.Connection, mid: uuid.UUID) -> datetime:
    """MID's content as if it had expired five minutes ago (its key row, in
    the partition of its expiry, moves with it): returns that expiry."""
    past = datetime.now(UTC) - timedelta(minutes=5)
    with db.transaction():
        db.execute("UPDATE messages SET content_expires_at = %s WHERE id = %s", (past, mid))
        db.execute("UPDATE message_keys SET expires_at = %s WHERE message_id = %s", (past, mid))
    return past


class SavedPack:
    """A copy of a message's pack and its index entry, put back on demand:
    what a backup or replica of the bucket keeps after the pack is swept."""

    def __init__(self, db: psycopg.Connection, objects: S3ObjectStore, mid: uuid.UUID) -> None:
        where = packs.location(db, mid)
        assert where is not None and where.format == packs.FORMAT_SEALED
        self.where, self.objects, self.mid = where, objects, mid
        self.body = b"".join(objects.get(where.pack_key))

    def restore(self, db: psycopg.Connection) -> bytes:
        self.objects.put(self.where.pack_key, io.BytesIO(self.body), len(self.body))
        return b"".join(restore(self.objects, self.where.pack_key, where=self.where, conn=db,
                                message_id=self.mid))


def _retention(db: psycopg.Connection, objects: S3ObjectStore) -> None:
    run_retention(db, rules.S3Retention(objects.client, objects.bucket))


@pytest.fixture
def releasing(db: psycopg.Connection) -> Iterator[list[legal_holds.Hold]]:
    """Holds a test adds; any it leaves active are released at its end."""
    added: list[legal_holds.Hold] = []
    yield added
    for hold in added:
        if (got := legal_holds.get_hold(db, hold.id)) and got.released_at is None:
            legal_holds.release_hold(db, hold.id)


def test_a_released_hold_gives_the_key_back_to_expiry_and_the_run_destroys_it(
        stack: Stack, db: psycopg.Connection, objects: S3ObjectStore,
        make_org: Callable[..., TestOrg], releasing: list[legal_holds.Hold]) -> None:
    org = make_org("pro")
    mid, delivered = _capture(stack, db, org.domain, "held@example.net")
    saved = SavedPack(db, objects, mid)
    hold = legal_holds.add_hold(db, org.id, "held@example.net", "case 19 release")
    releasing.append(hold)
    _expire_now(db, mid)
    _retention(db, objects)
    # Held past its expiry: the key survives the run, the content restores.
    assert _key_expiry(db, mid) == ["held"]
    assert saved.restore(db) == delivered

    legal_holds.release_hold(db, hold.id)
    _retention(db, objects)
    assert _key_expiry(db, mid) == []  # back to its passed expiry, destroyed
    with pytest.raises(sealing.ContentErased, match=f"message {mid}: content erased"):
        saved.restore(db)
    audit = db.execute("SELECT detail FROM retention_audit WHERE action = 'hold_reconciled'"
                       " AND target = %s", (f"hold {hold.id}",)).fetchone()
    assert audit is not None and audit[0]["data_keys_back"] == 1
    objects.delete(saved.where.pack_key)


def test_a_key_left_at_infinity_by_a_hold_released_before_the_fix_expires_at_the_next_run(
        stack: Stack, db: psycopg.Connection, objects: S3ObjectStore,
        make_org: Callable[..., TestOrg]) -> None:
    """What the code before release_keys left behind: a hold released and
    reconciled, its message's key still at 'infinity', no hold active in
    the organisation.  The next retention run gives it back to its expiry
    (passed here) and destroys it."""
    org = make_org("pro")
    mid, _ = _capture(stack, db, org.domain, "legacy@example.net")
    _expire_now(db, mid)
    db.execute("UPDATE message_keys SET expires_at = 'infinity' WHERE message_id = %s", (mid,))
    assert _key_expiry(db, mid) == ["held"]
    _retention(db, objects)
    assert _key_expiry(db, mid) == []


def test_a_message_under_two_holds_keeps_its_key_until_both_are_released(
        stack: Stack, db: psycopg.Connection, objects: S3ObjectStore,
        make_org: Callable[..., TestOrg], releasing: list[legal_holds.Hold]) -> None:
    org = make_org("pro")
    mid, delivered = _capture(stack, db, org.domain, "twice@example.net")
    unheld, _ = _capture(stack, db, org.domain, "other@example.net")
    saved = SavedPack(db, objects, mid)
    by_address = legal_holds.add_hold(db, org.id, "twice@example.net", "case 19 a")
    whole_org = legal_holds.add_hold(db, org.id, None, "case 19 b")
    releasing += [by_address, whole_org]
    _expire_now(db, mid)
    _retention(db, objects)
    assert _key_expiry(db, mid) == ["held"]

    legal_holds.release_hold(db, by_address.id)
    _retention(db, objects)
    # The organisation-wide hold still covers it: still held, still readable.
    assert _key_expiry(db, mid) == ["held"]
    assert saved.restore(db) == delivered
    # The other message (not expired) kept its own expiry throughout.
    assert _key_expiry(db, unheld) == ["own"]

    legal_holds.release_hold(db, whole_org.id)
    _retention(db, objects)
    assert _key_expiry(db, mid) == []
    with pytest.raises(sealing.ContentErased):
        saved.restore(db)
    assert _key_expiry(db, unheld) == ["own"]  # never expired, never held: untouched
    objects.delete(saved.where.pack_key)


# --- Object Lock: one flag per pack ---------------------------------------------------


def _flagged(store: S3ObjectStore, key: str) -> bool:
    return bool(store.client.is_object_legal_hold_enabled(store.bucket, key))


def test_a_pack_keeps_its_legal_hold_flag_while_any_hold_covers_a_member(
        db: psycopg.Connection, locked: S3ObjectStore, make_org: Callable[..., TestOrg],
        releasing: list[legal_holds.Hold]) -> None:
    org = make_org("pro")
    written = sealed_pack(db, locked, org.id, org.domain, ["a@example.net", "b@example.net"],
                          "held")
    pack_key, (m1, _m2) = written[0][0].object_key, [m.id for m, _ in written]
    store = rules.S3Retention(locked.client, locked.bucket, object_lock=True)
    hold_a = legal_holds.add_hold(db, org.id, "a@example.net", "case 19 a")
    hold_b = legal_holds.add_hold(db, org.id, "b@example.net", "case 19 b")
    releasing += [hold_a, hold_b]
    since = datetime.now(UTC) - timedelta(days=1)
    for hold in (hold_a, hold_b):  # what the retention run's hold step does
        assert holds.protect(db, store, hold, since).moved == 1
    assert _flagged(locked, pack_key)

    now = datetime.now(UTC)
    legal_holds.release_hold(db, hold_a.id)
    got_a = legal_holds.get_hold(db, hold_a.id)
    assert got_a is not None
    holds.reconcile_released(db, store, got_a, now)
    # Hold B still covers the pack's other message: the flag stays, and the
    # server still refuses to delete the pack's version.
    assert _flagged(locked, pack_key)
    assert store.delete_many([pack_key]) == [pack_key]

    legal_holds.release_hold(db, hold_b.id)
    got_b = legal_holds.get_hold(db, hold_b.id)
    assert got_b is not None
    holds.reconcile_released(db, store, got_b, now)
    assert not _flagged(locked, pack_key)
    # Both messages still restore (a hold never touched the bytes).
    row = db.execute("SELECT object_key FROM messages WHERE id = %s", (m1,)).fetchone()
    assert row is not None and b"held " + str(m1).encode() in b"".join(
        restore_message(db, locked, m1, row[0]))


def test_an_object_under_two_holds_keeps_its_flag_until_both_are_released(
        db: psycopg.Connection, locked: S3ObjectStore, make_org: Callable[..., TestOrg],
        releasing: list[legal_holds.Hold]) -> None:
    """The same for a message in its own object (the layout before packs)."""
    org = make_org("pro")
    created = datetime.now(UTC)
    mid = uuid.uuid4()
    raw = f"From: s@{org.domain}\r\nTo: c@example.net\r\n\r\nalone {mid}\r\n".encode()
    blob = zstandard.ZstdCompressor().compress(raw)
    content_at, metadata_at = messages.expiry_dates(created, 7, 30)
    key = message_key(str(org.id), str(mid), created, content_days=7)
    put_content(locked, key, io.BytesIO(blob), len(blob), content_at)
    messages.record_capture(db, messages.CapturedMessage(
        id=mid, org_id=org.id, domain=org.domain, queue_id=uuid.uuid4().hex[:10].upper(),
        envelope_from=f"s@{org.domain}", recipients=("c@example.net",), size=len(raw),
        sha256=hashlib.sha256(raw).digest(), object_key=key, compressed_size=len(blob),
        created_at=created, content_expires_at=content_at, metadata_expires_at=metadata_at,
        message_id_header=f"<{mid}@{org.domain}>", header_from=f"s@{org.domain}",
        subject="alone"))
    store = rules.S3Retention(locked.client, locked.bucket, object_lock=True)
    by_address = legal_holds.add_hold(db, org.id, "c@example.net", "case 19 c")
    whole_org = legal_holds.add_hold(db, org.id, None, "case 19 org")
    releasing += [by_address, whole_org]
    since = datetime.now(UTC) - timedelta(days=1)
    for hold in (by_address, whole_org):
        holds.protect(db, store, hold, since)
    assert _flagged(locked, key)
    for hold, still in ((by_address, True), (whole_org, False)):
        legal_holds.release_hold(db, hold.id)
        got = legal_holds.get_hold(db, hold.id)
        assert got is not None
        holds.reconcile_released(db, store, got, datetime.now(UTC))
        assert _flagged(locked, key) is still, f"after releasing hold {hold.id}"


# --- master-key rotation --------------------------------------------------------------


def _key_file(path: Path, key: bytes, mode: int = 0o600) -> Path:
    path.write_text(base64.b64encode(key).decode() + "\n")
    path.chmod(mode)
    return path


def _config_with_key(stack_env: StackEnv, key_file: Path, into: Path,
                     previous: str | None = None) -> str:
    """The stack's postkeep.toml with storage.master_key_file = KEY_FILE (and
    storage.previous_master_key_file = PREVIOUS)."""
    text = Path(stack_env.config_path).read_text()
    section = re.search(r"(?ms)^\[storage\]\n.*?(?=^\[|\Z)", text)
    assert section is not None, "no [storage] section in the stack's postkeep.toml"
    also = f'\nprevious_master_key_file = "{previous}"' if previous else ""
    body, n = re.subn(r'(?m)^master_key_file = ".*"$', f'master_key_file = "{key_file}"{also}',
                      section.group(0))
    assert n == 1, section.group(0)
    into.write_text(text[:section.start()] + body + text[section.end():])
    into.chmod(0o600)  # it holds secrets, as the stack's does
    return str(into)


def test_rotating_the_master_key_rewraps_org_keys_and_content_opens_with_the_new_key_only(
        stack: Stack, db: psycopg.Connection, objects: S3ObjectStore, config: config_mod.Config,
        stack_env: StackEnv, make_org: Callable[..., TestOrg], run: Invoke,
        tmp_path: Path) -> None:
    org = make_org("pro")
    mid, delivered = _capture(stack, db, org.domain, "r@example.net")
    object_key = db.execute("SELECT object_key FROM messages WHERE id = %s",
                            (mid,)).fetchone()
    assert object_key is not None
    old = config.storage.master_key_bytes()
    assert old is not None, "the stack seals content (storage.master_key_file)"
    new = os.urandom(32)
    new_file = _key_file(tmp_path / "new-master.key", new)
    new_config = _config_with_key(stack_env, new_file, tmp_path / "postkeep.toml")
    # Each in-process command installs its configuration's keyring process-wide:
    # the session's (the stack's key) is put back at the end.
    with sealing.using(old):
        _rotate_and_back(db, objects, config, stack_env, run, mid, object_key[0], delivered,
                         org.id, new, new_file, new_config)
    assert b"".join(restore_message(db, objects, mid, object_key[0])) == delivered


def _rotate_and_back(db: psycopg.Connection, objects: S3ObjectStore, config: config_mod.Config,
                     stack_env: StackEnv, run: Invoke, mid: uuid.UUID, object_key: str,
                     delivered: bytes, org_id: uuid.UUID, new: bytes, new_file: Path,
                     new_config: str) -> None:
    old = config.storage.master_key_bytes()
    new_id = sealing.Keyring(new).master_id
    before = dict(db.execute("SELECT org_id, wrapped FROM org_keys").fetchall())
    data_keys = db.execute("SELECT wrapped FROM message_keys WHERE message_id = %s",
                           (mid,)).fetchall()
    # Configured first as the rotation's README order has it (master key the
    # new one, previous_master_key_file the old): what the old key wraps
    # still opens, before any row is rewrapped.
    with sealing.using(new, previous=old):
        assert b"".join(restore_message(db, objects, mid, object_key)) == delivered
    try:
        out = run("storage", "rotate-master-key", "--new-key-file", str(new_file), "--json")
        assert out.exit_code == 0, out.stderr
        done = json.loads(out.stdout)
        assert done["new_master_id"] == new_id and done["rewrapped"] >= len(before)
        assert any("storage.master_key_file" in s and str(new_file) in s
                   for s in done["next_steps"])
        assert any("restart" in s for s in done["next_steps"])
        after = dict(db.execute("SELECT org_id, wrapped FROM org_keys").fetchall())
        assert after[org_id] != before[org_id]
        assert db.execute("SELECT count(*) FROM org_keys WHERE master_id <> %s",
                          (new_id,)).fetchone() == (0,)
        # Data keys are untouched (organisation keys wrap them).
        assert db.execute("SELECT wrapped FROM message_keys WHERE message_id = %s",
                          (mid,)).fetchall() == data_keys
        # Again: nothing left to do, nothing changed.
        again = run("storage", "rotate-master-key", "--new-key-file", str(new_file), "--json")
        assert again.exit_code == 0, again.stderr
        assert json.loads(again.stdout)["rewrapped"] == 0
        assert dict(db.execute("SELECT org_id, wrapped FROM org_keys").fetchall()) == after

        with sealing.using(new):  # a process started with the new key
            assert b"".join(restore_message(db, objects, mid, object_key)) == delivered
        raw = run("messages", "raw", str(mid), config=new_config)
        assert raw.exit_code == 0, raw.stderr
        assert raw.stdout_bytes == delivered
        with sealing.using(old), pytest.raises(  # one (re)started with the old key
                sealing.SealError, match=r"does not open with the configured storage\.master_key"):
            b"".join(restore_message(db, objects, mid, object_key))

        # A daemon still on the old key makes a new organisation's key meanwhile;
        # the run after the switch, given the old key, rewraps that one alone.
        late, later = uuid.uuid4(), uuid.uuid4()
        with sealing.using(old):
            sealing.data_keys(db, [(uuid.uuid4(), late, datetime.now(UTC))])
        try:
            refused = run("storage", "rotate-master-key", "--new-key-file", str(new_file),
                          config=new_config)  # the configured key is the new one
            assert refused.exit_code == 1, refused.output
            assert f"organisation {late}" in refused.stderr, refused.stderr
            assert "--old-key-file" in refused.stderr and "nothing changed" in refused.stderr
            after_switch = run("storage", "rotate-master-key", "--new-key-file", str(new_file),
                               "--old-key-file", config.storage.master_key_file, "--json",
                               config=new_config)
            assert after_switch.exit_code == 0, after_switch.stderr
            assert json.loads(after_switch.stdout)["rewrapped"] == 1
            with sealing.using(new):
                assert sealing.required().org_key(db, late, create=False) is not None
            # The same with the old key named in the configuration instead
            # (storage.previous_master_key_file): no --old-key-file needed.
            with sealing.using(old):
                sealing.data_keys(db, [(uuid.uuid4(), later, datetime.now(UTC))])
            both = _config_with_key(stack_env, new_file, new_file.with_name("both.toml"),
                                    previous=config.storage.master_key_file)
            via_config = run("storage", "rotate-master-key", "--new-key-file", str(new_file),
                             "--json", config=both)
            assert via_config.exit_code == 0, via_config.stderr
            assert json.loads(via_config.stdout)["rewrapped"] == 1
            assert "remove storage.previous_master_key_file" in json.loads(
                via_config.stdout)["next_steps"][0]
            with sealing.using(new):
                assert sealing.required().org_key(db, later, create=False) is not None
        finally:
            db.execute("DELETE FROM org_keys WHERE org_id = ANY(%s)", ([late, later],))
    finally:
        # Back to the stack's key, for the daemons and the tests after this one.
        back = run("storage", "rotate-master-key", "--new-key-file",
                   config.storage.master_key_file, config=new_config)
        assert back.exit_code == 0, back.stderr


@pytest.mark.parametrize("case", ["mode 0644", "16 bytes"])
def test_rotate_master_key_refuses_a_key_file_others_can_read_or_of_the_wrong_length(
        db: psycopg.Connection, run: Invoke, tmp_path: Path, case: str) -> None:
    path = tmp_path / "new-master.key"
    if case == "mode 0644":  # an attacker-ish file: readable by every local user
        _key_file(path, os.urandom(32), 0o644)
        why = "readable by other users (mode 644)"
    else:
        _key_file(path, os.urandom(16))
        why = "decodes to 16 bytes"
    before = db.execute("SELECT org_id, wrapped, master_id FROM org_keys"
                        " ORDER BY org_id").fetchall()
    out = run("storage", "rotate-master-key", "--new-key-file", str(path))
    assert out.exit_code == 2, out.output
    assert str(path) in out.stderr and why in out.stderr, out.stderr
    assert db.execute("SELECT org_id, wrapped, master_id FROM org_keys"
                      " ORDER BY org_id").fetchall() == before
