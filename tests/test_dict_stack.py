"""Per-organisation zstd dictionaries against real PostgreSQL, MinIO and Postfix.

`postkeep dict train` learns from an organisation's stored mail; the milter
then compresses that organisation's small messages with it, and restoring
fetches the exact version the object names, also after newer versions were
trained.  A retired version is kept while stored mail needs it; an object
whose dictionary is gone fails with an error naming the dictionary.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import psycopg
import pytest
import zstandard
from click.testing import Result
from conftest import StoreMessage, TestOrg
from support import campaign, smtp
from support.dedup import capture_and_commit
from support.stack import Stack, strip_received

from postkeep.milter.committer import GroupCommitter
from postkeep.storage.content import container, dictionaries
from postkeep.storage.content.dictionaries import DictionaryCache
from postkeep.storage.metadata.db import BackendError, Database

pytestmark = pytest.mark.stack


def _seed(org: TestOrg, store_message: StoreMessage, n: int = 80, start: int = 0) -> None:
    """N of the organisation's campaign messages stored as captured mail (samples)."""
    for i in range(start, start + n):
        data = campaign.message(i, org.domain)
        head, sep, body = data.partition(b"\r\n\r\n")
        store_message(org, parts=(head + sep, body), content_days=30, metadata_days=90)


def test_train_then_milter_compresses_with_it_through_postfix(
        stack: Stack, run: Callable[..., Result], make_org: Callable[..., TestOrg],
        store_message: StoreMessage) -> None:
    org = make_org("pro")  # never seen by the milter yet: no cached "no dictionary"
    _seed(org, store_message)
    trained = run("dict", "train", "--org", org.name)
    assert trained.exit_code == 0, trained.stderr
    assert "dictionary version 1" in trained.stdout and "now current" in trained.stdout

    token = uuid.uuid4().hex
    data = campaign.message(9001, org.domain, token=token)
    reply = smtp.send(*stack.smtp, f"news@{org.domain}", ["rcpt@sink.test"], data)
    assert reply.queue_id, reply.text
    delivered = strip_received(stack.sink_copy(token))
    with stack.connect() as conn:
        row = conn.execute("SELECT id, object_key, compressed_size FROM messages"
                           " WHERE queue_id = %s", (reply.queue_id,)).fetchone()
    assert row is not None
    mid, key, stored_size = row
    obj = stack.stored(key)
    manifest, _ = container.read_header([obj])
    assert manifest is not None and manifest.dictionary == container.DictionaryRef(str(org.id), 1)
    assert stack.restored(key) == delivered
    raw = run("messages", "raw", str(mid))
    assert raw.exit_code == 0, raw.stderr
    assert raw.stdout_bytes == delivered
    plain = len(zstandard.ZstdCompressor(level=3).compress(delivered))
    assert stored_size * 2 < plain, (stored_size, plain)  # several-fold with the dictionary
    listed = run("dict", "list", "--org", org.name)
    assert listed.exit_code == 0 and org.name in listed.stdout and "current" in listed.stdout


def test_training_needs_enough_mail(run: Callable[..., Result],
                                    make_org: Callable[..., TestOrg],
                                    store_message: StoreMessage) -> None:
    org = make_org("pro")
    _seed(org, store_message, n=5)
    result = run("dict", "train", "--org", org.name)
    assert result.exit_code == 1
    assert f"postkeep: {org.name}: " in result.stderr and "at least 20 needed" in result.stderr


def _version_row(conn: psycopg.Connection, org_id: uuid.UUID, version: int
                 ) -> dictionaries.DictionaryRow:
    return next(r for r in dictionaries.list_dictionaries(conn, org_id) if r.version == version)


def test_versions_restore_and_old_ones_stay_while_needed(
        stack: Stack, run: Callable[..., Result], make_org: Callable[..., TestOrg],
        store_message: StoreMessage, db: psycopg.Connection,
        committer: tuple[GroupCommitter, Database]) -> None:
    commit, pool = committer
    org = make_org("pro")
    objects = stack.objects()
    cache = DictionaryCache(pool, objects, refresh=0.0)
    now = datetime.now(UTC)
    _seed(org, store_message)
    dictionaries.train_for_org(db, objects, org.id, now)
    v1 = cache.get(org.id)
    assert v1 is not None and v1.ref.version == 1
    m1 = capture_and_commit(commit, org.id, org.domain, campaign.message(1, org.domain),
                            created=now, content_days=30, dictionary=v1)

    _seed(org, store_message, start=500)
    dictionaries.train_for_org(db, objects, org.id, now)
    v2 = cache.get(org.id)  # refresh 0: the milter's cache sees the new version at once
    assert v2 is not None and v2.ref.version == 2
    m2 = capture_and_commit(commit, org.id, org.domain, campaign.message(2, org.domain),
                            created=now, content_days=30, dictionary=v2)

    assert stack.restored(m1.object_key) == campaign.message(1, org.domain)
    assert stack.restored(m2.object_key) == campaign.message(2, org.domain)
    old = _version_row(db, org.id, 1)
    assert old.state == "retired" and old.needed_until >= m1.content_expires_at

    # Still needed: a sweep (even two days on) keeps version 1.
    dictionaries.sweep_dictionaries(db, objects, now + timedelta(days=2))
    assert _version_row(db, org.id, 1).state == "retired"
    assert stack.restored(m1.object_key) == campaign.message(1, org.domain)

    # Past every message's content expiry it goes; version 2 (current) never does.
    assert dictionaries.sweep_dictionaries(db, objects, now + timedelta(days=40)) >= 1
    assert [r.version for r in dictionaries.list_dictionaries(db, org.id)] == [2]
    with pytest.raises(BackendError) as err:
        stack.restored(m1.object_key)
    assert f"dictionary v1 of organisation {org.id}" in str(err.value)
    assert f"dictionaries/{org.id}/1.zdict" in str(err.value)
    raw = run("messages", "raw", str(m1.id))
    assert raw.exit_code == 1
    assert f"dictionary v1 of organisation {org.id}" in raw.stderr

    # A milter whose cache still holds version 1 (loaded, never used) cannot
    # commit new mail compressed with it any more: tempfailed, not stored.
    other = GroupCommitter(pool, objects, workers=1, linger=0)
    try:
        with pytest.raises(BackendError, match="no longer available"):
            capture_and_commit(other, org.id, org.domain, campaign.message(3, org.domain),
                               created=now, content_days=30, dictionary=v1)
    finally:
        other.close()
    with db.cursor() as cur:
        cur.execute("SELECT count(*) FROM messages WHERE org_id = %s", (org.id,))
        assert cur.fetchone() == (160 + 2,)


def test_dictionaries_are_never_shared_across_organisations(
        stack: Stack, make_org: Callable[..., TestOrg], store_message: StoreMessage,
        db: psycopg.Connection, committer: tuple[GroupCommitter, Database]) -> None:
    _, pool = committer
    org_a, org_b = make_org("pro"), make_org("pro")
    _seed(org_a, store_message, n=40)
    dictionaries.train_for_org(db, stack.objects(), org_a.id, datetime.now(UTC))
    cache = DictionaryCache(pool, stack.objects(), refresh=0.0)
    got = cache.get(org_a.id)
    assert got is not None and got.ref.org_id == str(org_a.id)
    assert cache.get(org_b.id) is None


def test_train_due_trains_only_organisations_with_enough_new_mail(
        stack: Stack, make_org: Callable[..., TestOrg], store_message: StoreMessage,
        db: psycopg.Connection) -> None:
    busy, quiet = make_org("pro"), make_org("pro")
    _seed(busy, store_message, n=60)
    _seed(quiet, store_message, n=10)
    now = datetime.now(UTC)
    scope = (busy.id, quiet.id)  # other tests' organisations are not this test's business
    trained = dictionaries.train_due(db, stack.objects(), now, min_messages=50, only=scope)
    orgs = {r.row.org_id for r in trained}
    assert busy.id in orgs and quiet.id not in orgs
    # Just trained: not due again until `every` has passed.
    again = dictionaries.train_due(db, stack.objects(), now, min_messages=50, only=scope)
    assert busy.id not in {r.row.org_id for r in again}
