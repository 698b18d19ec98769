"""Metadata partitions for a retention of years, created in bounded transactions."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import psycopg
import pytest

from postkeep.storage.metadata import migrate

pytestmark = pytest.mark.stack


def _last_partition_end(db: psycopg.Connection, table: str) -> datetime:
    row = db.execute(
        "SELECT max((regexp_match(pg_get_expr(c.relpartbound, c.oid),"
        " 'TO \\(''([^'']+)''\\)'))[1]::timestamptz)"
        " FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid"
        " WHERE i.inhparent = %s::regclass AND c.relname NOT LIKE %s",
        (table, "%\\_unlimited"),
    ).fetchone()
    assert row is not None and row[0] is not None
    return row[0]  # type: ignore[no-any-return]


def test_ten_years_of_partitions_are_made_in_batches(
    db: psycopg.Connection, make_org: Callable[..., object]
) -> None:
    # Ten years of weekly partitions of every partitioned table in one
    # transaction ran out of PostgreSQL's default lock table ("out of shared
    # memory"); in batches each transaction takes about 91 days' worth.
    make_org("enterprise", content_days=3650, metadata_days=3650)
    migrate.ensure_partitions(db)
    ahead = datetime.now(UTC) + timedelta(days=3650)
    for table in ("messages", "message_recipients", "recipient_events"):
        assert _last_partition_end(db, table) >= ahead, table
    # Idempotent: a second run creates nothing.
    assert migrate.ensure_partitions(db) == 0
