"""`postkeep db migrate`: the metadata database's schema and partitions."""

from __future__ import annotations

import click

from postkeep.cli.common import session
from postkeep.storage.metadata import migrate


@click.group()
def db() -> None:
    """The metadata database: schema migrations and partitions."""


@db.command("migrate")
@click.pass_context
def db_migrate(ctx: click.Context) -> None:
    """Apply pending migrations and create partitions ahead (idempotent)."""
    with session(ctx) as s:
        applied = migrate.apply_migrations(s.conn)
        for m in applied:
            click.echo(f"applied {m.version:04d}_{m.name}")
        if not applied:
            click.echo("schema up to date")
        created = migrate.ensure_partitions(s.conn)
        click.echo(f"created {created} partition(s)")


COMMANDS: list[click.Group] = [db]
