"""Schema migrations: numbered SQL files applied once each, in order.

The schema lives only in `migrations/NNNN_name.sql`.  `apply_migrations` takes
an advisory lock, so two `postkeep db migrate` runs at once apply each file
exactly once, and records every applied file in `schema_migrations`.  Running
it again is a no-op apart from creating partitions ahead of time.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources

import psycopg

# Weekly metadata partitions are created this far ahead of the longest
# retention configured, so captures never meet a missing partition.
PARTITION_MARGIN_DAYS = 35


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str


def available_migrations() -> list[Migration]:
    """Every migration shipped with the package, in version order."""
    out = []
    for entry in resources.files("postkeep.storage.metadata").joinpath("migrations").iterdir():
        if not entry.name.endswith(".sql"):
            continue
        number, _, rest = entry.name.partition("_")
        out.append(Migration(int(number), rest.removesuffix(".sql"), entry.read_text()))
    return sorted(out, key=lambda m: m.version)


def apply_migrations(conn: psycopg.Connection) -> list[Migration]:
    """Apply pending migrations; return the ones applied now."""
    applied_now: list[Migration] = []
    with conn.transaction():
        # Maintenance may wait for locks held by live traffic: no statement
        # timeout here (the daemons' own statements keep theirs).
        conn.execute("SET LOCAL statement_timeout = 0")
        conn.execute("SELECT pg_advisory_xact_lock(hashtext('postkeep.migrate'))")
        conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations ("
            " version integer PRIMARY KEY, name text NOT NULL,"
            " applied_at timestamptz NOT NULL DEFAULT now())"
        )
        done = {row[0] for row in conn.execute("SELECT version FROM schema_migrations")}
        for m in available_migrations():
            if m.version in done:
                continue
            conn.execute(m.sql.encode())
            conn.execute(
                "INSERT INTO schema_migrations (version, name) VALUES (%s, %s)",
                (m.version, m.name),
            )
            applied_now.append(m)
    return applied_now


def ensure_partitions(conn: psycopg.Connection) -> int:
    """Create metadata partitions up to the longest retention plus a margin.

    In batches of PARTITION_BATCH_DAYS, one transaction each: creating a
    partition takes locks on it and its parent until commit, and ten years of
    weekly partitions for every partitioned table in one transaction run out
    of PostgreSQL's lock table at its default size (64 per connection).  On an
    autocommit connection (the daemons', the CLI's) each batch commits; inside
    a caller's transaction they are savepoints and the locks add up again.
    """
    # Metadata never expires before content (expiry_dates), so the longest
    # content retention bounds the stamped metadata expiry too.
    row = conn.execute(
        "SELECT greatest("
        " (SELECT max(greatest(metadata_days, content_days)) FROM tiers),"
        " (SELECT max(greatest(metadata_days, content_days)) FROM organisations), 0)"
    ).fetchone()
    longest = int(row[0]) if row and row[0] is not None else 0
    created = 0
    for horizon in partition_batches(longest + PARTITION_MARGIN_DAYS):
        with conn.transaction():
            conn.execute("SET LOCAL statement_timeout = 0")
            one = conn.execute(
                "SELECT ensure_partitions(now() + make_interval(days => %s))", (horizon,)
            ).fetchone()
            created += int(one[0]) if one else 0
            # Sealed content's data keys, by content expiry month (0026_sealing.sql).
            if conn.execute("SELECT to_regproc('maintain_key_partitions')").fetchone() != (
                    None,):
                one = conn.execute("SELECT maintain_key_partitions(now() + make_interval("
                                   "days => %s))", (horizon,)).fetchone()
                created += int(one[0]) if one else 0
    with conn.transaction():
        # The days ahead for received reports (postkeep-storage drops old ones).
        if conn.execute("SELECT to_regproc('maintain_report_partitions')").fetchone() != (None,):
            conn.execute("SELECT maintain_report_partitions(NULL)")
        # The days ahead of the event outbox (postkeep-storage drops old ones).
        if conn.execute("SELECT to_regproc('maintain_event_partitions')").fetchone() != (None,):
            conn.execute("SELECT maintain_event_partitions(NULL)")
    return created


# About 13 weekly partitions per partitioned table per transaction.
PARTITION_BATCH_DAYS = 91


def partition_batches(days: int, step: int = PARTITION_BATCH_DAYS) -> list[int]:
    """The horizons (days from now) of successive partition batches, last = DAYS."""
    if days <= 0:
        return [0]
    return [min(h, days) for h in range(step, days + step, step)]
