"""Prometheus metrics of postkeep-milter (served on [milter].metrics_listen)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

from postkeep import build_info

MESSAGES = Counter(
    "postkeep_milter_messages_total",
    "Messages by outcome: captured, spooled (accepted into the outage spool), journaled"
    " (accepted into the spool by accept_after = 'journal'), system"
    " (signed, not stored), passed (uncaptured), refused (5xx), tempfailed (4xx),"
    " report (a bounce to a postkeep return path).",
    ["outcome"],
)
RECEIVED_BYTES = Counter(
    "postkeep_milter_received_bytes_total", "Uncompressed bytes of captured messages."
)
STORED_BYTES = Counter(
    "postkeep_milter_stored_bytes_total", "Compressed bytes written to object storage."
)
BACKEND_ERRORS = Counter(
    "postkeep_milter_backend_errors_total",
    "Backend failures that tempfailed a message, by backend (s3, postgres).",
    ["backend"],
)
EOM_SECONDS = Histogram(
    "postkeep_milter_eom_duration_seconds",
    "Time from end of message to the milter's reply (store + rows).",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)

SPOOL_REFUSED = Counter(
    "postkeep_milter_spool_refused_total",
    "Messages tempfailed because the spool could not take them (fill level reached or"
    " write failed), during an outage or under accept_after = 'journal'.",
)
SPOOL_WRITE_SECONDS = Histogram(
    "postkeep_milter_spool_write_duration_seconds",
    "Time to write one message durably into the outage spool (fsync included).",
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1),
)

DKIM_SIGNATURES = Counter(
    "postkeep_milter_dkim_signatures_total", "DKIM signatures made, by algorithm.",
    ["algorithm"],
)
DKIM_FAILURES = Counter(
    "postkeep_milter_dkim_unsigned_total",
    "Messages not signed, by reason: untrusted_client, no_key (the From: domain is the"
    " organisation's but has no usable key yet), foreign_from (the From: domain is another"
    " organisation's or none's), from_header (not exactly one From:).",
    ["reason"],
)
UNKNOWN_LOGINS = Counter(
    "postkeep_milter_unknown_login_total",
    "Messages from a SASL login that is no registered submitter, by outcome: refused"
    " (at MAIL FROM, or at end of message), passed (uncaptured, unsigned).",
    ["outcome"],
)
DKIM_SECONDS = Histogram(
    "postkeep_milter_dkim_sign_duration_seconds",
    "Time to sign one message (every signature it gets), body hash excluded.",
    buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025),
)
COMMIT_BATCH = Histogram(
    "postkeep_milter_commit_batch_messages",
    "Messages whose objects one upload batch stored (one S3 call for small objects).",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128),
)
COMMIT_ROWS_BATCH = Histogram(
    "postkeep_milter_commit_rows_batch_messages",
    "Messages whose rows one INSERT (one PostgreSQL commit) wrote: every upload"
    " batch that finished while the previous INSERT was running.",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
)
COMMIT_STAGE_SECONDS = Histogram(
    "postkeep_milter_commit_stage_duration_seconds",
    "Time one group commit spends in each stage: wait (the batch's first message"
    " queued until a worker took it), s3 (every object stored), postgres (rows"
    " committed).",
    ["stage"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
)
# Bound once: observed for every batch.
COMMIT_WAIT_SECONDS = COMMIT_STAGE_SECONDS.labels("wait")
DKIM_OLDEST_ACTIVE_KEY = Gauge(
    "postkeep_milter_dkim_oldest_active_key_timestamp_seconds",
    "When the longest-serving active DKIM key became active (Unix time; 0: no active"
    " key). time() minus it is the age of the key most overdue for rotation.",
)
COMMIT_TIMEOUTS = Counter(
    "postkeep_milter_commit_timeouts_total",
    "Messages given up after milter.commit_timeout_seconds, by the backend they waited on",
    ["backend"],
)
for _backend in ("s3", "postgres"):
    COMMIT_TIMEOUTS.labels(_backend)
COMMIT_S3_SECONDS = COMMIT_STAGE_SECONDS.labels("s3")
COMMIT_POSTGRES_SECONDS = COMMIT_STAGE_SECONDS.labels("postgres")

# Every label value a counter is incremented with exists at zero from start, so that
# rate() and increase() in alert rules see the first event (monitoring/).
for _outcome in ("captured", "spooled", "system", "passed", "refused", "tempfailed", "report"):
    MESSAGES.labels(_outcome)
for _backend in ("s3", "postgres"):
    BACKEND_ERRORS.labels(_backend)
for _algorithm in ("rsa-sha256", "ed25519-sha256"):
    DKIM_SIGNATURES.labels(_algorithm)
for _reason in ("untrusted_client", "no_key", "foreign_from", "from_header"):
    DKIM_FAILURES.labels(_reason)

PARTS = Counter(
    "postkeep_milter_parts_total",
    "Large MIME parts cut out of captured messages: uploaded (new to the organisation)"
    " or reused (already stored once for it).",
    ["outcome"],
)
PART_STORED_BYTES = Counter(
    "postkeep_milter_part_stored_bytes_total",
    "Compressed bytes of part objects written to object storage.",
)
DICTIONARY_MESSAGES = Counter(
    "postkeep_milter_dictionary_messages_total",
    "Captured messages compressed with their organisation's zstd dictionary.",
)
for _outcome in ("uploaded", "reused"):
    PARTS.labels(_outcome)
for _outcome in ("refused", "passed"):
    UNKNOWN_LOGINS.labels(_outcome)

build_info.export("milter")
PACKS = Counter(
    "postkeep_milter_packs_total",
    "Pack objects written (storage/content/packs.py): one PUT each, carrying the"
    " small messages of one group commit for one organisation and retention class.",
)
# Adaptive linger (milter/linger.py): per batch formed with commit_linger_ms > 0,
# whether its first message waited for company ("waited": at least
# commit_siblings other captures in flight) or went at once ("skipped").
COMMIT_LINGER = Counter(
    "postkeep_milter_commit_linger_total",
    "Group-commit batches whose first message waited for company (waited) or not (skipped).",
    ["decision"],
)
for _decision in ("waited", "skipped"):
    COMMIT_LINGER.labels(_decision)
