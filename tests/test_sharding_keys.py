"""Every tenant table can be distributed by org_id (Citus-style), or is listed.

Citus distributes a table by one column and can only enforce a primary key or
unique constraint that includes that column (each shard checks its own rows).
This test reads the migrated schema's catalog: every table in `public` must be
either a reference table (replicated to every node; listed with the reason
below), a known exception (a tenant table whose key lacks org_id today; listed
index by index with the reason, as work to do in docs/SCALING.md), or a tenant
table with an org_id column that every primary key and unique index includes.
A new table or unique index without org_id fails it until someone decides.
"""

from __future__ import annotations

import psycopg
import pytest

pytestmark = pytest.mark.stack

# Small, read on every message before the organisation is known, or global
# configuration: replicated to every node (Citus reference tables), so joins
# and foreign keys from distributed tables stay local.
REFERENCE_TABLES: dict[str, str] = {
    "tiers": "global configuration, a handful of rows, joined by every org",
    "organisations": "one row per tenant; its key IS the distribution key "
                     "(id), and its name must be unique across all tenants",
    "domains": "the milter finds the org FROM the domain: looked up by domain "
               "before org_id is known; one row per sending domain",
    "submitters": "the milter finds the org FROM the SASL username: looked up "
                  "before org_id is known",
    "dkim_keys": "selected by (domain, selector), unique across the platform "
                 "(DNS names are global); a few rows per domain",
    "dkim_key_changes": "one-row change marker the signers poll (not tenant data)",
    "tenant_roles": "maps a database login to its org; read by the row-security "
                    "policies before org_id is known",
    "retention_state": "one row per retention job (the sweeper's own cursor)",
    "schema_migrations": "which migrations are applied (not tenant data)",
}

# Tenant tables whose unique keys lack org_id today: {table: {index: reason}}.
# Each is work to do before distribution (docs/SCALING.md, "Work to do").
KNOWN_EXCEPTIONS: dict[str, dict[str, str]] = {
    "messages": {"messages_pkey": "(id, metadata_expires_at): the UUIDv7 id is "
                 "unique on its own; add org_id to the key (and to every FK/join)"},
    "message_recipients": {"message_recipients_pkey": "(message_id, recipient, "
                           "metadata_expires_at): add org_id with messages'"},
    "attachments": {"attachments_pkey": "(message_id, part_index, "
                    "metadata_expires_at): add org_id with messages'"},
    "parts": {"parts_pkey": "object_key alone; the key embeds the org, so "
              "(org_id, object_key) is equivalent"},
    "zstd_dictionaries": {"zstd_dictionaries_object_key_key": "object_key alone; "
                          "the key embeds the org, so (org_id, object_key) is equivalent"},
    "legal_holds": {"legal_holds_pkey": "bigserial id; make it (org_id, id)"},
    # The webhook contract (issue 18): one global id, partitioned by day.
    "packs": {"packs_pkey": "(id): a pack's UUID is unique alone; make it (org_id, id)"},
    "message_packs": {"message_packs_pkey": "(message_id): one pack entry per message;"
                      " make it (org_id, message_id) with messages' key"},
    "pack_leftovers": {"pack_leftovers_pkey": "(object_key): replaced objects awaiting"
                       " deletion; keyed by the S3 key, make it (org_id, object_key)"},
    "webhook_endpoints": {"webhook_endpoints_pkey": "(id): uuid; make it (org_id, id)"},
    "webhook_deliveries": {"webhook_deliveries_pkey": "(endpoint_id, event_id): make it"
                           " (org_id, endpoint_id, event_id)"},
    "event_outbox": {"event_outbox_pkey": "(id, created_at): identity id, the "
                     "webhook idempotency key; make it (org_id, id, created_at)"},
    "retention_audit": {"retention_audit_pkey": "bigserial id, org_id nullable "
                        "(platform-wide runs); append-only log: distribute or keep "
                        "on the coordinator"},
    # Reports arrive at the bounce domain before they are matched to a message:
    # the content hash is the platform-wide idempotency key, so these stay on
    # the coordinator (or become distributed by sha256, not by org).
    "reports": {"reports_pkey": "(sha256, received_at): no org_id, dedup is global"},
    "unmatched_reports": {"unmatched_reports_pkey": "sha256: by definition no org"},
}

_TABLES = """
SELECT c.oid, c.relname,
       (SELECT a.attnum FROM pg_attribute a
         WHERE a.attrelid = c.oid AND a.attname = 'org_id' AND NOT a.attisdropped)
  FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
 WHERE n.nspname = 'public' AND c.relkind IN ('r', 'p') AND NOT c.relispartition
"""

# Unique indexes (primary keys included) of a table and of all its partitions
# (pg_partition_tree() is empty for a plain table, hence the UNION),
# with whether org_id is one of the indexed columns (expressions count as not).
_UNIQUE = """
SELECT i.relname, x.indisprimary,
       EXISTS (SELECT 1 FROM pg_attribute a
                WHERE a.attrelid = x.indrelid AND a.attname = 'org_id'
                  AND a.attnum = ANY (x.indkey))
  FROM pg_index x JOIN pg_class i ON i.oid = x.indexrelid
 WHERE x.indisunique AND NOT i.relispartition
   AND x.indrelid IN (SELECT %(t)s::oid
                      UNION SELECT relid FROM pg_partition_tree(%(t)s::oid::regclass))
"""


def sharding_violations(db: psycopg.Connection) -> dict[str, dict[str, str]]:
    """{table: {index or '-': what is wrong}} for tables not on any list."""
    found: dict[str, dict[str, str]] = {}
    for oid, table, org_attnum in db.execute(_TABLES).fetchall():
        if table in REFERENCE_TABLES:
            continue
        problems: dict[str, str] = {}
        if org_attnum is None:
            problems["-"] = "no org_id column"
        for index, primary, has_org in db.execute(_UNIQUE, {"t": oid}).fetchall():
            if not has_org:
                problems[index] = "primary key" if primary else "unique index"
        expected = KNOWN_EXCEPTIONS.get(table, {})
        unexpected = {k: v for k, v in problems.items() if k not in expected}
        if org_attnum is None and table in KNOWN_EXCEPTIONS:
            unexpected.pop("-", None)  # listed: org-less by design (reports)
        if unexpected:
            found[table] = unexpected
    return found


def test_every_tenant_key_includes_org_id(db: psycopg.Connection) -> None:
    assert sharding_violations(db) == {}


def test_the_lists_name_real_tables_and_real_exceptions(db: psycopg.Connection) -> None:
    """A stale entry (table dropped, key fixed) must be removed from the lists."""
    tables = {row[1]: row[0] for row in db.execute(_TABLES).fetchall()}
    assert set(REFERENCE_TABLES) - set(tables) == set()
    assert set(KNOWN_EXCEPTIONS) & set(REFERENCE_TABLES) == set()
    still_wrong = {
        (table, index)
        for table in KNOWN_EXCEPTIONS
        for index, _primary, has_org in db.execute(_UNIQUE, {"t": tables[table]}).fetchall()
        if not has_org
    }
    listed = {(t, i) for t, indexes in KNOWN_EXCEPTIONS.items() for i in indexes}
    assert listed - still_wrong == set(), "fixed: remove these from KNOWN_EXCEPTIONS"


def test_a_new_table_without_org_id_in_its_key_is_caught(db: psycopg.Connection) -> None:
    """The check itself can fail: a new tenant table and a new unique index."""
    with db.transaction(force_rollback=True):
        db.execute("CREATE TABLE sharding_probe_a (id bigint PRIMARY KEY, v text)")
        db.execute("CREATE TABLE sharding_probe_b (org_id uuid, k text,"
                   " PRIMARY KEY (org_id, k))")
        db.execute("CREATE UNIQUE INDEX sharding_probe_b_k ON sharding_probe_b (k)")
        db.execute("CREATE UNIQUE INDEX messages_probe_idx ON messages_held (id)")
        found = sharding_violations(db)
    assert found == {
        "sharding_probe_a": {"-": "no org_id column", "sharding_probe_a_pkey": "primary key"},
        "sharding_probe_b": {"sharding_probe_b_k": "unique index"},
        "messages": {"messages_probe_idx": "unique index"},
    }
