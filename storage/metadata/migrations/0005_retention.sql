-- 0005: retention — legal holds, erasure, audit, daily delivery statistics.
--
-- Content expiry stays derived: a message's content is available while
-- now < content_expires_at and content_erased_at IS NULL (erasure is the only
-- per-row write, bounded to one address).  Metadata expires by dropping whole
-- weekly partitions (0001); rows under a legal hold are moved, just before
-- their partition is dropped, into the `*_held` partitions, which are never
-- dropped.  Their own stamp travels with them in held_metadata_expires_at so
-- that releasing the hold restores (or applies) it.

ALTER TABLE messages ADD COLUMN content_erased_at timestamptz;
-- Every table partitioned by metadata_expires_at carries the column, so a
-- held message's rows move together (storage/retention.py checks this).
ALTER TABLE messages ADD COLUMN held_metadata_expires_at timestamptz;
ALTER TABLE message_recipients ADD COLUMN held_metadata_expires_at timestamptz;
ALTER TABLE recipient_events ADD COLUMN held_metadata_expires_at timestamptz;

-- The content sweeper walks messages in content expiry order from a watermark.
CREATE INDEX messages_content_expiry_idx ON messages (content_expires_at, id);
-- The daily statistics roll-up reads days of rows by capture time.  Rows
-- arrive in time order, so a BRIN index is a few pages and costs capture
-- almost nothing, unlike a B-tree on every row.
CREATE INDEX messages_created_brin ON messages USING brin (created_at);
CREATE INDEX message_recipients_created_brin ON message_recipients USING brin (created_at);

-- Held rows live here: 9999-01-01 <= metadata_expires_at < 9999-12-31, below
-- the 'unlimited' partition (9999-12-31 and later), above any weekly one.
CREATE TABLE messages_held PARTITION OF messages
    FOR VALUES FROM ('9999-01-01 00:00:00+00') TO ('9999-12-31 00:00:00+00');
CREATE TABLE message_recipients_held PARTITION OF message_recipients
    FOR VALUES FROM ('9999-01-01 00:00:00+00') TO ('9999-12-31 00:00:00+00');
CREATE TABLE recipient_events_held PARTITION OF recipient_events
    FOR VALUES FROM ('9999-01-01 00:00:00+00') TO ('9999-12-31 00:00:00+00');

-- A legal hold: the organisation's mail (address NULL) or only mail to or
-- from ADDRESS.  Active while released_at IS NULL; reconciled_at is set when
-- `retention run` has applied the release (held rows back to their stamps).
CREATE TABLE legal_holds (
    id              bigserial PRIMARY KEY,
    org_id          uuid NOT NULL REFERENCES organisations(id) ON DELETE RESTRICT,
    address         text CHECK (address IS NULL OR (address = lower(address) AND address <> '')),
    reason          text NOT NULL CHECK (reason <> ''),
    created_at      timestamptz NOT NULL DEFAULT now(),
    released_at     timestamptz,
    reconciled_at   timestamptz
);
CREATE UNIQUE INDEX legal_holds_active_idx ON legal_holds (org_id, coalesce(address, ''))
    WHERE released_at IS NULL;

-- One row per retention or erasure action: what, on which target, how many, when.
-- Erasure records a sha256 of the address, never the address itself.
CREATE TABLE retention_audit (
    id          bigserial PRIMARY KEY,
    at          timestamptz NOT NULL DEFAULT clock_timestamp(),
    run_id      uuid,
    action      text NOT NULL,
    org_id      uuid,
    target      text,
    count       bigint NOT NULL DEFAULT 0,
    detail      jsonb NOT NULL DEFAULT '{}'
);
CREATE INDEX retention_audit_at_idx ON retention_audit (at);
CREATE INDEX retention_audit_run_idx ON retention_audit (run_id);

-- Daily delivery statistics per organisation (UTC day of capture).  They
-- outlive message metadata: a day's row is recomputed as the counts of the
-- rows still present plus delivery_stats_dropped, which a partition drop
-- increments in the same transaction as the DROP.
CREATE TABLE delivery_stats_daily (
    org_id          uuid NOT NULL,
    day             date NOT NULL,
    messages        bigint NOT NULL DEFAULT 0,
    sent            bigint NOT NULL DEFAULT 0,      -- recipients accepted
    delivered       bigint NOT NULL DEFAULT 0,      -- delivered or relayed
    deferred        bigint NOT NULL DEFAULT 0,
    bounced         bigint NOT NULL DEFAULT 0,
    expired         bigint NOT NULL DEFAULT 0,
    bytes           bigint NOT NULL DEFAULT 0,      -- message bytes received
    stored_bytes    bigint NOT NULL DEFAULT 0,      -- compressed bytes stored
    updated_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (org_id, day)
);
CREATE TABLE delivery_stats_dropped (LIKE delivery_stats_daily INCLUDING ALL);

-- Small key/value state of the retention job (the sweeper's watermark).
CREATE TABLE retention_state (
    name        text PRIMARY KEY,
    at          timestamptz NOT NULL,
    id          uuid NOT NULL DEFAULT '00000000-0000-0000-0000-000000000000',
    updated_at  timestamptz NOT NULL DEFAULT now()
);

ALTER TABLE legal_holds ENABLE ROW LEVEL SECURITY;
ALTER TABLE delivery_stats_daily ENABLE ROW LEVEL SECURITY;
ALTER TABLE delivery_stats_dropped ENABLE ROW LEVEL SECURITY;
ALTER TABLE retention_audit ENABLE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON legal_holds
    USING (org_id = nullif(current_setting('postkeep.org_id', true), '')::uuid);
CREATE POLICY tenant_isolation ON delivery_stats_daily
    USING (org_id = nullif(current_setting('postkeep.org_id', true), '')::uuid);
CREATE POLICY tenant_isolation ON delivery_stats_dropped
    USING (org_id = nullif(current_setting('postkeep.org_id', true), '')::uuid);
CREATE POLICY tenant_isolation ON retention_audit
    USING (org_id = nullif(current_setting('postkeep.org_id', true), '')::uuid);
