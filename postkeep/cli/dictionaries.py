"""`postkeep dict`: per-organisation zstd dictionaries (train, list, sweep).

A click adapter over `postkeep.storage.dictionaries`.  A newly trained
version becomes current at once; running milters pick it up within
`milter.dictionary_refresh_seconds`.  Old versions stay as long as any stored
message may need them (`dict sweep` removes the others).
"""

from __future__ import annotations

import json
from datetime import UTC, datetime

import click

from postkeep.cli.common import confirm, destructive, fail, find_org, iso, json_flag, say, session
from postkeep.storage.content import dictionaries
from postkeep.storage.content.dictionaries import DictionaryError, DictionaryRow
from postkeep.storage.content.objects import S3ObjectStore


def format_dictionaries(rows: list[DictionaryRow], names: dict[str, str]) -> str:
    """A fixed-width table of dictionary versions (pure)."""
    lines = [f"{'ORGANISATION':24}  {'VERSION':>7}  {'STATE':8}  {'BYTES':>7}  {'SAMPLES':>7}"
             f"  {'CREATED':16}  NEEDED UNTIL"]
    for r in rows:
        needed = ("-" if r.needed_until.year <= 1970  # never used yet
                  else f"{r.needed_until:%Y-%m-%d %H:%M}")
        lines.append(f"{names.get(str(r.org_id), str(r.org_id)):24}  {r.version:>7}"
                     f"  {r.state:8}  {r.size:>7}  {r.samples:>7}"
                     f"  {r.created_at:%Y-%m-%d %H:%M}  {needed}")
    return "\n".join(lines)


def dictionary_to_json(r: DictionaryRow, names: dict[str, str]) -> dict[str, object]:
    """A dictionary version as a JSON-ready dict (pure)."""
    return {"org_id": str(r.org_id), "org": names.get(str(r.org_id)), "version": r.version,
            "state": r.state, "size": r.size, "samples": r.samples, "dict_id": r.dict_id,
            "created_at": iso(r.created_at),
            "needed_until": None if r.needed_until.year <= 1970 else iso(r.needed_until)}


@click.group("dict")
def dict_group() -> None:
    """zstd dictionaries per organisation, for small templated messages."""


@dict_group.command("train")
@click.option("--org", "org_name", required=True, help="Organisation (name or id).")
@click.option("--samples", default=2000, show_default=True, type=click.IntRange(20, 100_000),
              help="At most this many of its newest messages are used.")
@click.option("--size", "dict_bytes", default=dictionaries.DEFAULT_DICT_BYTES,
              show_default=True, type=click.IntRange(1024, 1 << 20),
              help="Dictionary size in bytes.")
@click.option("--max-message-bytes", default=dictionaries.DEFAULT_SAMPLE_MAX_BYTES,
              show_default=True, type=click.IntRange(256, 1 << 24),
              help="Only messages up to this size are samples.")
@json_flag
@click.pass_context
def train(ctx: click.Context, org_name: str, samples: int, dict_bytes: int,
          max_message_bytes: int) -> None:
    """Train a new dictionary version on ORG's recent mail and make it current."""
    with session(ctx) as s:
        org = find_org(s.conn, org_name)
        try:
            result = dictionaries.train_for_org(
                s.conn, S3ObjectStore(s.cfg.s3), org.id, datetime.now(UTC), limit=samples,
                dict_bytes=dict_bytes, max_bytes=max_message_bytes, level=s.cfg.milter.zstd_level)
        except DictionaryError as exc:
            fail(f"{org.name}: {exc}")
        r = result.row
        gain = (f"held-out messages: {result.raw_bytes} bytes, {result.plain_bytes} compressed"
                f" alone, {result.dict_bytes} with the dictionary"
                if result.raw_bytes else "no held-out messages to measure on")
        say(f"{org.name}: dictionary version {r.version} ({r.size} bytes, zstd id"
            f" {r.dict_id}) trained on {r.samples} messages, now current; {gain}",
            org=org.name, org_id=str(org.id), version=r.version, size=r.size,
            dict_id=r.dict_id, samples=r.samples, held_out_raw_bytes=result.raw_bytes,
            held_out_plain_bytes=result.plain_bytes, held_out_dict_bytes=result.dict_bytes)


@dict_group.command("list")
@click.option("--org", "org_name", default=None, help="Only this organisation (name or id).")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON array.")
@click.pass_context
def list_cmd(ctx: click.Context, org_name: str | None, as_json: bool) -> None:
    """Every dictionary version, its state and until when stored mail needs it."""
    with session(ctx) as s:
        org = find_org(s.conn, org_name) if org_name else None
        rows = dictionaries.list_dictionaries(s.conn, org.id if org else None)
        names = {str(oid): name for oid, name in s.conn.execute(
            "SELECT id, name FROM organisations")}
    if as_json:
        click.echo(json.dumps([dictionary_to_json(r, names) for r in rows], indent=2))
    else:
        click.echo(format_dictionaries(rows, names))


@dict_group.command("sweep")
@destructive
@json_flag
@click.pass_context
def sweep(ctx: click.Context, yes: bool, dry_run: bool) -> None:
    """Delete retired versions that no stored message can need any more."""
    with session(ctx) as s:
        doomed = dictionaries.sweepable(s.conn, datetime.now(UTC))
        if dry_run:
            lines = [f"would delete {org_id} version {version} ({key})"
                     for org_id, version, key in doomed]
            say("\n".join([*lines, f"{len(doomed)} dictionary versions would be deleted"]),
                dry_run=True, versions=[{"org_id": str(o), "version": v, "key": k}
                                        for o, v, k in doomed])
            return
        if doomed:
            confirm(f"delete {len(doomed)} retired dictionary versions (objects and rows)", yes)
        n = dictionaries.sweep_dictionaries(s.conn, S3ObjectStore(s.cfg.s3), datetime.now(UTC))
        say(f"{n} dictionary versions deleted", deleted=n)


COMMANDS: list[click.Group] = [dict_group]
