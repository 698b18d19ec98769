"""`postkeep db migrate`: the metadata database's schema and partitions."""

from __future__ import annotations

import click

from postkeep.cli.common import json_flag, say, session
from postkeep.storage.metadata import migrate


@click.group()
def db() -> None:
    """The metadata database: schema migrations and partitions."""


@db.command("migrate")
@json_flag
@click.pass_context
def db_migrate(ctx: click.Context) -> None:
    """Apply pending migrations and create partitions ahead (idempotent)."""
    with session(ctx) as s:
        applied = migrate.apply_migrations(s.conn)
        created = migrate.ensure_partitions(s.conn)
    lines = [f"applied {m.version:04d}_{m.name}" for m in applied] or ["schema up to date"]
    say("\n".join([*lines, f"created {created} partition(s)"]),
        applied=[f"{m.version:04d}_{m.name}" for m in applied], partitions_created=created)


COMMANDS: list[click.Group] = [db]
