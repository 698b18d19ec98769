"""Message objects no row names are found and deleted, through real MinIO and PostgreSQL.

An orphan is what a milter killed between its upload and its INSERT leaves
(or a message the commit timeout gave up after its upload): the object under
a message key, no `messages` row with its id, not in the outage spool.
"""

from __future__ import annotations

import io
import json
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import click
import psycopg
import pytest
from click.testing import CliRunner
from conftest import StackEnv, StoreMessage, TestOrg

from postkeep import cli
from postkeep.storage.content.objects import S3ObjectStore, message_key
from postkeep.storage.lifecycle.orphans import message_id_of, sweep_orphans
from postkeep.storage.lifecycle.rules import S3Retention

pytestmark = pytest.mark.stack


def _put(objects: S3ObjectStore, org: TestOrg, content_days: int | None = 7) -> tuple[uuid.UUID,
                                                                                     str]:
    mid = uuid.uuid4()
    key = message_key(str(org.id), str(mid), datetime.now(UTC), content_days=content_days)
    objects.put(key, io.BytesIO(b"orphaned bytes"), 14)
    return mid, key


def test_message_id_of_reads_every_key_layout() -> None:
    mid, org = uuid.uuid4(), uuid.uuid4()
    now = datetime(2026, 12, 4, tzinfo=UTC)
    for key in (message_key(str(org), str(mid), now, content_days=30),
                message_key(str(org), str(mid), now, held=True),
                message_key(str(org), str(mid), now)):
        assert message_id_of(key) == mid, key
    assert message_id_of(f"parts/{org}/ab/{mid}.zst") is None
    assert message_id_of(f"dictionaries/{org}/1.zdict") is None


def test_only_objects_no_row_names_and_not_spooled_are_deleted(
        db: psycopg.Connection, objects: S3ObjectStore, make_org: Callable[..., TestOrg],
        store_message: StoreMessage) -> None:
    org = make_org()
    named = store_message(org)
    orphan_id, orphan = _put(objects, org)
    legacy_id, legacy = _put(objects, org, content_days=None)  # the layout before classes
    spooled_id, spooled = _put(objects, org)
    store = S3Retention(objects.client, objects.bucket)
    in_spool = {spooled_id}.__contains__

    young = sweep_orphans(db, store, in_spool, min_age=timedelta(hours=1), window_days=1)
    assert not {orphan, legacy} & set(young.orphans)  # a commit may still be under way
    assert store.exists(orphan)

    result = sweep_orphans(db, store, in_spool, min_age=timedelta(0), window_days=1)
    assert {orphan, legacy} <= set(result.orphans) and result.failed == []
    assert named.object_key not in result.orphans and spooled not in result.orphans
    assert not store.exists(orphan) and not store.exists(legacy)
    assert store.exists(named.object_key) and store.exists(spooled)
    assert result.examined >= 4 and result.deleted == len(result.orphans)
    row = db.execute("SELECT count, detail FROM retention_audit WHERE action = 'orphans_swept'"
                     " ORDER BY id DESC LIMIT 1").fetchone()
    assert row is not None and row[0] == result.deleted and orphan in row[1]["keys"]
    assert db.execute("SELECT count(*) FROM messages WHERE id = ANY(%s)",
                      ([orphan_id, legacy_id],)).fetchone() == (0,)


def test_the_cli_names_orphans_in_a_dry_run_and_deletes_nothing(
        stack_env: StackEnv, objects: S3ObjectStore, make_org: Callable[..., TestOrg]) -> None:
    org = make_org()
    _, orphan = _put(objects, org)
    cli._register()
    root: click.Group = cli.cli
    result = CliRunner().invoke(root, ["--config", stack_env.config_path, "retention",
                                       "orphans", "--dry-run", "--min-age", "1", "--json"])
    assert result.exit_code == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["dry_run"] is True and out["deleted"] == 0
    assert orphan not in out["orphans"]  # younger than a minute
    assert S3Retention(objects.client, objects.bucket).exists(orphan)
    help_text = CliRunner().invoke(root, ["retention", "orphans", "--help"]).stdout
    assert "--dry-run" in help_text and "--json" in help_text
