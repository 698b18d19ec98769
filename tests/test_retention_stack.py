"""Retention through real PostgreSQL and MinIO: drops, sweep, rules, holds, erasure.

Each test takes a week of its own in the past (support/retention.py) so the
partitions it expires hold only its own rows.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import psycopg
import pytest
from conftest import TestOrg, act_as, dashboard_role
from minio.commonconfig import ENABLED, Filter
from minio.lifecycleconfig import Expiration, LifecycleConfig, Rule
from support.retention import audit_rows, exists, past_week, put_message, stats_row

from postkeep.storage.content import layout
from postkeep.storage.content.objects import S3ObjectStore
from postkeep.storage.lifecycle import erasure, holds, rules
from postkeep.storage.lifecycle.retention import RetentionSettings, run_retention
from postkeep.storage.metadata import legal_holds, messages

pytestmark = pytest.mark.stack

SWEEP = RetentionSettings(content_expiry="sweep")


@pytest.fixture
def store(objects: S3ObjectStore) -> rules.S3Retention:
    return rules.S3Retention(objects.client, objects.bucket)


def _present(objects: S3ObjectStore, key: str) -> bool:
    return rules.S3Retention(objects.client, objects.bucket).exists(key)


def _run(db: psycopg.Connection, store: rules.S3Retention, sweep_from: datetime,
         settings: RetentionSettings = SWEEP) -> object:
    lines: list[str] = []
    report = run_retention(db, store, progress=lines.append, settings=settings,
                           sweep_from=sweep_from)
    assert not report.errors, report.errors
    return report


def test_lifecycle_rules_are_installed_bounded_and_keep_foreign_rules(
        store: rules.S3Retention, objects: S3ObjectStore) -> None:
    client = objects.client
    foreign = Rule(ENABLED, rule_filter=Filter(prefix="exports/"), rule_id="ops-exports",
                   expiration=Expiration(days=3))
    client.set_bucket_lifecycle(objects.bucket, LifecycleConfig([foreign]))
    total = store.apply_rules(rules.planned_rules())
    again = store.apply_rules(rules.planned_rules())  # idempotent: no duplicates
    cfg = client.get_bucket_lifecycle(objects.bucket)
    assert cfg is not None
    ids = [r.rule_id for r in cfg.rules]
    assert total == again == len(ids) == len(layout.CONTENT_CLASSES) + 1 <= 1000
    assert "ops-exports" in ids
    by_id = {r.rule_id: r for r in cfg.rules}
    for days in layout.CONTENT_CLASSES:
        rule = by_id[f"postkeep-content-{days}d"]
        assert rule.status == ENABLED
        assert rule.rule_filter.prefix == f"messages/{days}d/"
        assert rule.expiration.days == days
    assert store.rules() == rules.planned_rules()


def test_run_drops_expired_week_sweeps_content_and_keeps_statistics(
        db: psycopg.Connection, objects: S3ObjectStore, store: rules.S3Retention,
        make_org: Callable[..., TestOrg]) -> None:
    started = datetime.now(UTC)
    org = make_org("free")
    week = past_week(db)
    sent = [put_message(db, objects, org.id, org.domain, week, recipients=(
        ("a@example.net", "delivered"), ("b@example.net", "bounced"),
        ("c@example.net", "deferred"))) for _ in range(5)]
    sent += [put_message(db, objects, org.id, org.domain, week, classed=False,
                         recipients=(("d@example.net", "relayed"),)) for _ in range(2)]
    day = sent[0].created_at.date()
    assert all(_present(objects, m.object_key) for m in sent)

    report = _run(db, store, week.monday - timedelta(days=40))

    assert week.messages in report.partitions_dropped  # type: ignore[attr-defined]
    assert not exists(db, week.messages) and not exists(db, week.recipients)
    assert db.execute("SELECT count(*) FROM messages WHERE org_id = %s",
                      (org.id,)).fetchone() == (0,)
    assert not any(_present(objects, m.object_key) for m in sent)
    s = stats_row(db, org.id, day)
    assert s["messages"] == 7 and s["sent"] == 17
    assert (s["delivered"], s["bounced"], s["deferred"], s["expired"]) == (7, 5, 5, 0)
    assert s["bytes"] == sum(m.size for m in sent)
    assert s["stored_bytes"] == sum(m.compressed_size for m in sent)
    (count, detail), = audit_rows(db, "partition_dropped", week.messages, started)
    assert count == 7 and detail["recipients"] == 17 and detail["held_messages_kept"] == 0

    # A second run changes nothing: no double counting, nothing to drop.
    report2 = _run(db, store, week.monday - timedelta(days=40))
    assert week.messages not in report2.partitions_dropped  # type: ignore[attr-defined]
    assert stats_row(db, org.id, day) == s
    assert len(audit_rows(db, "partition_dropped", week.messages, started)) == 1


def test_lifecycle_mode_leaves_classed_objects_to_the_rules(
        db: psycopg.Connection, objects: S3ObjectStore, store: rules.S3Retention,
        make_org: Callable[..., TestOrg]) -> None:
    org = make_org("free")
    week = past_week(db)
    classed = put_message(db, objects, org.id, org.domain, week)
    legacy = put_message(db, objects, org.id, org.domain, week, classed=False)
    # A metadata stamp far ahead: only content expires in this test.
    keep_week = put_message(db, objects, org.id, org.domain, created=week.monday,
                            content_days=2, metadata_days=None)
    report = _run(db, store, week.monday - timedelta(days=40),
                  RetentionSettings(content_expiry="auto"))
    assert report.mode == "lifecycle"  # type: ignore[attr-defined]
    assert _present(objects, classed.object_key)  # S3 deletes it, per its rule
    assert not _present(objects, legacy.object_key)  # no rule covers it: swept
    assert _present(objects, keep_week.object_key)
    row = messages.get_message(db, keep_week.id)
    assert row is not None
    assert messages.content_unavailable_reason(row.message, datetime.now(UTC)) == (
        "content expired per retention policy")


def test_held_org_survives_the_drop_and_release_restores_retention(
        db: psycopg.Connection, objects: S3ObjectStore, store: rules.S3Retention,
        make_org: Callable[..., TestOrg]) -> None:
    held_org, other = make_org("free"), make_org("free")
    week = past_week(db)
    kept = [put_message(db, objects, held_org.id, held_org.domain, week) for _ in range(3)]
    gone = put_message(db, objects, other.id, other.domain, week)
    hold = legal_holds.add_hold(db, held_org.id, None, "case 2026-17")
    wm = week.monday - timedelta(days=40)
    # add_hold's CLI moves content at once; here the run does it.
    report = _run(db, store, wm)

    assert report.held_rows_kept == 3  # type: ignore[attr-defined]
    # The sweeper had not reached them yet: the hold keeps the content too,
    # moved out of the expiring prefix before the sweep.
    assert report.held_objects_protected == 3  # type: ignore[attr-defined]
    assert not exists(db, week.messages)
    for m in kept:
        detail = messages.get_message(db, m.id)
        assert detail is not None, "held message's metadata was dropped"
        assert detail.message.metadata_expires_at == holds.HELD_AT
        assert detail.message.held_metadata_expires_at == m.metadata_expires_at
        assert [r.recipient for r in detail.recipients] == ["rcpt@example.net"]
        assert detail.message.object_key == layout.held_key(m.object_key)
        assert _present(objects, detail.message.object_key)
        assert not _present(objects, m.object_key)
        assert messages.content_available(detail.message, datetime.now(UTC))
    assert messages.get_message(db, gone.id) is None
    assert not _present(objects, gone.object_key)
    day = kept[0].created_at.date()
    before = stats_row(db, held_org.id, day)
    assert before["messages"] == 3

    legal_holds.release_hold(db, hold.id)
    report = _run(db, store, wm)
    assert report.holds_reconciled == 1  # type: ignore[attr-defined]
    for m in kept:
        assert messages.get_message(db, m.id) is None  # own stamp long past
        assert not _present(objects, layout.held_key(m.object_key))
    assert stats_row(db, held_org.id, day) == before  # counted once, not lost
    (count, detail), = audit_rows(db, "hold_reconciled", f"hold {hold.id}")
    assert count == 3 and detail["messages_dropped"] == 3


def test_hold_moves_live_content_out_of_lifecycle_reach(
        db: psycopg.Connection, objects: S3ObjectStore, store: rules.S3Retention,
        make_org: Callable[..., TestOrg]) -> None:
    org = make_org("free")
    now = datetime.now(UTC)
    alice = put_message(db, objects, org.id, org.domain, created=now,
                        recipients=(("Alice@Example.net", "delivered"),))
    bob = put_message(db, objects, org.id, org.domain, created=now,
                      recipients=(("bob@example.net", "delivered"),))
    assert layout.covered_by_rules(alice.object_key)
    hold = legal_holds.add_hold(db, org.id, "alice@example.net", "subpoena 9")
    res = holds.protect(db, store, hold, now - timedelta(days=1))
    assert res.moved == 1
    row = messages.get_message(db, alice.id)
    assert row is not None
    assert row.message.object_key == layout.held_key(alice.object_key)
    assert _present(objects, row.message.object_key)
    assert not _present(objects, alice.object_key)
    bob_row = messages.get_message(db, bob.id)
    assert bob_row is not None and bob_row.message.object_key == bob.object_key
    # Held content stays readable past its own stamp.
    later = alice.content_expires_at + timedelta(days=1)
    assert messages.content_available(row.message, later)
    # Erasure of the held address is refused, naming the hold.
    with pytest.raises(erasure.ErasureRefused, match=f"hold {hold.id} on alice@example.net"):
        erasure.erase_address(db, store, org.id, "alice@example.net")
    assert _present(objects, row.message.object_key)
    legal_holds.release_hold(db, hold.id)


def test_erasure_deletes_content_and_redacts_metadata(
        db: psycopg.Connection, objects: S3ObjectStore, store: rules.S3Retention,
        make_org: Callable[..., TestOrg]) -> None:
    org, other_org = make_org("basic"), make_org("basic")
    now = datetime.now(UTC)
    target = "carol.o'neil+x@example.net"
    to_her = put_message(db, objects, org.id, org.domain, created=now, subject=f"hi {target}",
                         recipients=((target.upper(), "bounced"),
                                     ("dave@example.net", "delivered")))
    db.execute("UPDATE message_recipients SET diagnostic = %s WHERE message_id = %s",
               (f"550 5.1.1 <{target}>: no such user", to_her.id))
    from_her = put_message(db, objects, org.id, org.domain, created=now, sender=target)
    unrelated = put_message(db, objects, org.id, org.domain, created=now)
    elsewhere = put_message(db, objects, other_org.id, other_org.domain, created=now,
                            recipients=((target, "delivered"),))

    rep = erasure.erase_address(db, store, org.id, target)

    assert rep.messages == 2 and rep.objects_deleted == 2
    for m in (to_her, from_her):
        assert not _present(objects, m.object_key)
        detail = messages.get_message(db, m.id)
        assert detail is not None
        assert detail.message.content_erased_at is not None
        assert not messages.content_available(detail.message, now)
        text = repr(detail).lower()
        assert target not in text, f"address left in {text}"
    d = messages.get_message(db, to_her.id)
    assert d is not None
    assert d.message.subject == "hi [erased]"
    rcpts = {r.recipient: r for r in d.recipients}
    assert "dave@example.net" in rcpts
    erased = [r for name, r in rcpts.items() if name.startswith("[erased]-")]
    assert len(erased) == 1 and erased[0].status == "bounced"
    assert all("[erased]" in (r.diagnostic or "[erased]") for r in d.recipients)
    f = messages.get_message(db, from_her.id)
    assert f is not None and f.message.envelope_from == "[erased]"
    assert f.message.header_from == "[erased]"
    for m in (unrelated, elsewhere):  # other mail, other organisations: untouched
        assert _present(objects, m.object_key)
        row = messages.get_message(db, m.id)
        assert row is not None and row.message.content_erased_at is None
    digest = rep.address_sha256
    rows = db.execute("SELECT count, detail::text FROM retention_audit WHERE action = 'erased'"
                      " AND org_id = %s", (org.id,)).fetchall()
    assert sum(r[0] for r in rows) == 2
    assert all(digest in r[1] and target not in r[1] for r in rows)
    # Again: nothing left to find.
    assert erasure.erase_address(db, store, org.id, target).messages == 0


def test_erasure_refused_by_an_org_hold_names_it(
        db: psycopg.Connection, objects: S3ObjectStore, store: rules.S3Retention,
        make_org: Callable[..., TestOrg]) -> None:
    org = make_org("free")
    m = put_message(db, objects, org.id, org.domain, created=datetime.now(UTC),
                    recipients=(("eve@example.net", "delivered"),))
    hold = legal_holds.add_hold(db, org.id, None, "audit Q3")
    try:
        with pytest.raises(erasure.ErasureRefused) as err:
            erasure.erase_address(db, store, org.id, "eve@example.net")
        assert f"hold {hold.id} on org {org.name} (audit Q3)" in str(err.value)
        assert _present(objects, m.object_key)
        row = messages.get_message(db, m.id)
        assert row is not None and row.message.content_erased_at is None
    finally:
        legal_holds.release_hold(db, hold.id)


def test_address_hold_keeps_only_that_address_through_a_drop(
        db: psycopg.Connection, objects: S3ObjectStore, store: rules.S3Retention,
        make_org: Callable[..., TestOrg]) -> None:
    org = make_org("free")
    week = past_week(db)
    frank = put_message(db, objects, org.id, org.domain, week,
                        recipients=(("x@example.net", "delivered"),
                                    ("Frank@Example.net", "delivered")))
    others = [put_message(db, objects, org.id, org.domain, week) for _ in range(2)]
    hold = legal_holds.add_hold(db, org.id, "frank@example.net", "HR case")
    try:
        report = _run(db, store, week.monday - timedelta(days=40))
        assert report.held_rows_kept == 1  # type: ignore[attr-defined]
        detail = messages.get_message(db, frank.id)
        assert detail is not None and len(detail.recipients) == 2
        assert all(messages.get_message(db, m.id) is None for m in others)
    finally:
        legal_holds.release_hold(db, hold.id)


def test_content_expired_is_what_readers_say(
        db: psycopg.Connection, objects: S3ObjectStore, make_org: Callable[..., TestOrg],
        stack_env: object) -> None:
    import subprocess
    import sys
    from pathlib import Path

    org = make_org("free")
    m = put_message(db, objects, org.id, org.domain,
                    created=datetime.now(UTC) - timedelta(days=8), metadata_days=None)
    script = Path(sys.executable).with_name("postkeep")
    show = subprocess.run([str(script), "messages", "show", str(m.id)], capture_output=True,
                          text=True, timeout=60, check=False)
    assert show.returncode == 0, show.stderr
    assert "content:             content expired per retention policy" in show.stdout
    assert "content_available:   False" in show.stdout
    raw = subprocess.run([str(script), "messages", "raw", str(m.id)], capture_output=True,
                         text=True, timeout=60, check=False)
    assert raw.returncode == 1
    assert raw.stderr.strip() == f"postkeep: message {m.id}: content expired per retention policy"


def test_unknown_org_and_bad_address_refused_by_cli(stack_env: object) -> None:
    import subprocess
    import sys
    from pathlib import Path

    script = Path(sys.executable).with_name("postkeep")
    bad = subprocess.run([str(script), "erase", "--org", f"nope-{uuid.uuid4().hex[:6]}",
                          "--address", "x@y.example"], capture_output=True, text=True,
                         timeout=60, check=False)
    assert bad.returncode == 1 and "no organisation" in bad.stderr
    bad = subprocess.run([str(script), "erase", "--org", "x", "--address", "not-an-address"],
                         capture_output=True, text=True, timeout=60, check=False)
    assert bad.returncode == 1 and "expected local@domain" in bad.stderr


def test_cli_hold_list_stats_and_lifecycle_show(
        db: psycopg.Connection, objects: S3ObjectStore, store: rules.S3Retention,
        make_org: Callable[..., TestOrg], stack_env: object) -> None:
    import json

    from click.testing import CliRunner

    from postkeep import cli

    cli._register()
    config_path = stack_env.config_path  # type: ignore[attr-defined]

    def run(*args: str) -> str:
        result = CliRunner().invoke(cli.cli, ["--config", config_path, *args])
        assert result.exit_code == 0, f"{args}: {result.stderr}{result.exception!r}"
        return result.stdout

    org = make_org("free")
    week = past_week(db)
    put_message(db, objects, org.id, org.domain, week,
                recipients=(("x@example.net", "delivered"), ("y@example.net", "expired")))
    added = run("hold", "add", "--org", org.name, "--address", "<Zed@Example.NET>",
                "--reason", "ticket 7")
    hold_id = int(added.split()[1])
    assert f"hold {hold_id} on zed@example.net in org {org.name}: ticket 7" in added
    listed = json.loads(run("hold", "list", "--org", org.name, "--json"))
    assert [(h["id"], h["address"], h["reason"], h["released_at"]) for h in listed] == [
        (hold_id, "zed@example.net", "ticket 7", None)]
    again = CliRunner().invoke(cli.cli, ["--config", config_path, "hold", "add", "--org",
                                         org.name, "--address", "zed@example.net",
                                         "--reason", "dup"])
    assert again.exit_code == 1 and "already active" in again.stderr
    run("hold", "remove", "--yes", str(hold_id))
    assert "releasing" in run("hold", "list", "--org", org.name, "--all")
    gone = CliRunner().invoke(cli.cli, ["--config", config_path, "hold", "remove",
                                        str(hold_id)])
    assert gone.exit_code == 1 and "already released" in gone.stderr

    _run(db, store, week.monday - timedelta(days=40))
    assert "released" in run("hold", "list", "--org", org.name, "--all")
    stats = json.loads(run("retention", "stats", org.name, "--json"))
    assert [(s["messages"], s["sent"], s["delivered"], s["expired"]) for s in stats] == [
        (1, 2, 1, 1)]
    assert "DELIVERED" in run("retention", "stats", org.name)

    store.apply_rules(rules.planned_rules())
    shown = run("retention", "lifecycle", "show")
    assert "postkeep-content-7d" in shown and "prefix messages/7d/" in shown
    assert len([ln for ln in shown.splitlines() if ln.startswith("postkeep-content-")]) == 15


def test_the_sidecar_schedule_runs_retention(
        db: psycopg.Connection, objects: S3ObjectStore, config: object,
        make_org: Callable[..., TestOrg]) -> None:
    """The upkeep job postkeep-storage runs drops an expired week on its own."""
    import asyncio
    import threading

    from prometheus_client import REGISTRY

    from postkeep.config import RetentionConfig
    from postkeep.storage.metadata.db import Database
    from postkeep.storage.sidecar.retention_job import retention_job
    from postkeep.storage.sidecar.upkeep import run_jobs

    def runs_ok() -> float:
        return REGISTRY.get_sample_value("postkeep_retention_runs_total",
                                         {"result": "ok"}) or 0.0

    org = make_org("free")
    week = past_week(db)
    put_message(db, objects, org.id, org.domain, week)
    ok_before = runs_ok()
    pool = Database(config.postgres, min_size=1)  # type: ignore[attr-defined]
    job = retention_job(pool, objects,
                        RetentionConfig(interval_seconds=0.2, content_expiry="sweep"),
                        threading.Event())
    assert job.name == "retention" and job.first_after == 0.2

    async def scenario() -> None:
        stop = asyncio.Event()
        task = asyncio.create_task(run_jobs([job], stop))
        for _ in range(300):
            await asyncio.sleep(0.2)
            if not exists(db, week.messages):
                break
        stop.set()
        await task

    try:
        asyncio.run(scenario())
    finally:
        pool.close()
    assert not exists(db, week.messages), "the scheduled run never dropped the week"
    assert runs_ok() > ok_before


def test_the_stack_sidecar_has_retention_scheduled(stack_env: object) -> None:
    import os
    from pathlib import Path

    log = Path(os.environ["POSTKEEP_STACK_DIR"]) / "storage" / "storage.log"
    assert "retention runs every 3600s (retention.interval_seconds)" in log.read_text()


def test_dashboard_role_sees_only_its_organisations_statistics_holds_and_audit(
        db: psycopg.Connection, objects: S3ObjectStore, store: rules.S3Retention,
        make_org: Callable[..., TestOrg]) -> None:

    mine, theirs = make_org("free"), make_org("free")
    week = past_week(db)
    for org in (mine, theirs):
        put_message(db, objects, org.id, org.domain, week)
        legal_holds.release_hold(db, legal_holds.add_hold(db, org.id, None, "rls check").id)
    _run(db, store, week.monday - timedelta(days=40))
    tables = "delivery_stats_daily, delivery_stats_dropped, legal_holds, retention_audit"
    with dashboard_role(db, tables) as role:
        with db.transaction():
            act_as(db, role, mine.id)
            seen = {t: {r[0] for r in db.execute(f"SELECT org_id FROM {t}")}
                    for t in tables.split(", ")}
        assert seen == {t: {mine.id} for t in tables.split(", ")}


def test_release_deletes_content_a_hold_kept_even_where_protection_failed(
        db: psycopg.Connection, objects: S3ObjectStore, make_org: Callable[..., TestOrg]) -> None:
    """S3 refused the copy under messages/hold/: the sweeper still skips the held
    message, and releasing the hold deletes it once its stamp has passed."""
    from postkeep.storage.metadata.db import BackendError

    class CopyFails(rules.MemoryRetention):
        def copy(self, src: str, dst: str) -> None:
            raise BackendError("s3", f"copy {src}: SlowDown")

    org = make_org("free")
    now = datetime.now(UTC)
    m = put_message(db, objects, org.id, org.domain, created=now - timedelta(days=7, hours=12),
                    metadata_days=None, classed=False)  # content expired 12 hours ago
    memory = CopyFails({m.object_key: b"x"}, lifecycle=False)
    hold = legal_holds.add_hold(db, org.id, None, "protection fails")
    report = run_retention(db, memory, settings=SWEEP, sweep_from=now - timedelta(days=2))
    assert any("SlowDown" in e for e in report.errors)
    assert m.object_key in memory.objects, "the sweeper deleted held content"
    legal_holds.release_hold(db, hold.id)
    report = run_retention(db, memory, settings=SWEEP)
    assert report.holds_reconciled == 1 and not report.errors
    assert m.object_key not in memory.objects
