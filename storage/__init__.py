"""postkeep.storage: the data layer every daemon and the CLI stand on.

Five sub-packages, each owning one kind of state:

- `metadata`  PostgreSQL: connections, migrations and the schema, and the
              rows of messages, recipients, organisations, rate-limit
              counters, DKIM keys, legal holds and the audit trail;
- `content`   object storage: the S3 interface, the stored object's format,
              compression and restore, shared parts, zstd dictionaries, the
              outage spool, and where each object's key puts it;
- `reports`   delivery reports: parsing a DSN or bounce, recording what it
              says as each recipient's status;
- `lifecycle` what ends: retention runs, S3 lifecycle rules, erasure, legal
              holds' protection of content, daily statistics;
- `sidecar`   postkeep-storage, the daemon: LMTP handler, batching, upkeep
              jobs (retention on a schedule).

Imports go one way: metadata <- content <- lifecycle, metadata <- reports,
and the sidecar on top of them all.  Nothing here imports a daemon
(`postkeep.milter`, `postkeep.policyd`) or the CLI; tests/test_layers.py
holds every module to that.
"""
