"""`postkeep storage repack` and `storage compact`: content into packs.

A click adapter over storage/content/repack.py.  Both take the retention lock
(storage/lifecycle/retention.py run_lock), so they never interleave with a
retention run, an erasure or a hold change; both are idempotent and
resumable (rerun after a crash or an S3 failure).
"""

from __future__ import annotations

import json

import click

from postkeep.cli.common import find_org, session
from postkeep.cli.storage import storage
from postkeep.storage.content import repack as repack_mod
from postkeep.storage.content.objects import S3ObjectStore
from postkeep.storage.lifecycle import rules
from postkeep.storage.lifecycle.retention import run_lock


def _progress(line: str) -> None:
    click.echo(f"storage: {line}", err=True)


def _show(result: repack_mod.RepackResult, as_json: bool, dry_run: bool, what: str) -> None:
    if as_json:
        click.echo(json.dumps({"dry_run": dry_run, **result.as_dict()}, indent=2))
        return
    verb = "would move" if dry_run else "moved"
    if what == "repack":
        click.echo(f"{verb} {result.messages} messages ({result.bytes_read} bytes) into"
                   f" {result.packs_written} packs; {result.objects_deleted} old objects"
                   " deleted")
    else:
        click.echo(f"{'would rewrite' if dry_run else 'rewrote'} {result.packs_compacted}"
                   f" packs ({result.dead_bytes_freed} bytes of erased content freed);"
                   f" {result.packs_written} new packs, {result.objects_deleted} objects"
                   " deleted")
    for f in result.failed:
        click.echo(f"  not repacked: {f}")


@storage.command("repack")
@click.option("--org", "org_name", help="Only this organisation (name or id).")
@click.option("--batch", default=500, show_default=True, type=click.IntRange(1, 10_000),
              help="Messages read per batch (at most one pack per group per batch).")
@click.option("--dry-run", is_flag=True, help="Count what would move; change nothing.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.pass_context
def repack(ctx: click.Context, org_name: str | None, batch: int, dry_run: bool,
           as_json: bool) -> None:
    """Move messages stored one object each into packs and delete the old objects.

    Held, inbound, erased, expired and large (> 256 KiB stored) messages stay
    as they are.  Idempotent and resumable.
    """
    with session(ctx) as s:
        org = find_org(s.conn, org_name).id if org_name else None
        objects = S3ObjectStore(s.cfg.s3)
        store = rules.S3Retention(objects.client, objects.bucket)
        with run_lock(s.conn, _progress):
            result = repack_mod.repack(s.conn, objects, store.delete_many, org_id=org,
                                       batch=batch, dry_run=dry_run, progress=_progress)
    _show(result, as_json, dry_run, "repack")
    if result.failed:
        ctx.exit(1)


@storage.command("compact")
@click.option("--org", "org_name", help="Only this organisation (name or id).")
@click.option("--threshold", default=0.5, show_default=True, type=click.FloatRange(0, 1),
              help="Rewrite packs whose live entries are less than this share of its bytes.")
@click.option("--dry-run", is_flag=True, help="Count what would be rewritten; change nothing.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.pass_context
def compact(ctx: click.Context, org_name: str | None, threshold: float, dry_run: bool,
            as_json: bool) -> None:
    """Rewrite packs holding mostly erased content, without it (erased bytes go here)."""
    with session(ctx) as s:
        org = find_org(s.conn, org_name).id if org_name else None
        objects = S3ObjectStore(s.cfg.s3)
        store = rules.S3Retention(objects.client, objects.bucket)
        with run_lock(s.conn, _progress):
            result = repack_mod.compact(s.conn, objects, store.delete_many, threshold=threshold,
                                        org_id=org, dry_run=dry_run, progress=_progress)
    _show(result, as_json, dry_run, "compact")


# The commands join `postkeep storage` (postkeep/cli/storage.py), registered there.
COMMANDS: list[click.Group] = []
