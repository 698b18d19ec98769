-- 0001: organisations, tiers, domains, submitters, messages, recipients.
--
-- messages and message_recipients are range-partitioned by the metadata expiry
-- date stamped at capture (weekly partitions, plus one for "unlimited",
-- stamped as 9999-12-31 UTC so it round-trips through any driver), so
-- expiring metadata is DROP TABLE of whole partitions, never a row-by-row
-- DELETE.  Every tenant table carries org_id and has row-level security: a
-- session that sets postkeep.org_id sees only that organisation's rows.

CREATE TABLE tiers (
    name                text PRIMARY KEY,
    content_days        integer NOT NULL CHECK (content_days > 0),
    metadata_days       integer CHECK (metadata_days > 0),          -- NULL: unlimited
    messages_per_hour   integer CHECK (messages_per_hour >= 0),     -- NULL: unlimited
    recipients_per_day  integer CHECK (recipients_per_day >= 0),
    bytes_per_day       bigint  CHECK (bytes_per_day >= 0)
);

INSERT INTO tiers (name, content_days, metadata_days, messages_per_hour, recipients_per_day, bytes_per_day) VALUES
    ('free',         7,   30,    100,    300,    NULL),
    ('basic',       30,   90,   1000,  10000,    NULL),
    ('pro',         90,  365,  10000, 250000,    NULL),
    ('enterprise', 365, NULL,   NULL,   NULL,    NULL);

CREATE TABLE organisations (
    id                  uuid PRIMARY KEY,
    name                text NOT NULL UNIQUE CHECK (name <> ''),
    tier                text NOT NULL REFERENCES tiers(name),
    -- per-organisation overrides of the tier; NULL: take the tier's value
    content_days        integer CHECK (content_days > 0),
    metadata_days       integer CHECK (metadata_days > 0),
    messages_per_hour   integer CHECK (messages_per_hour >= 0),
    recipients_per_day  integer CHECK (recipients_per_day >= 0),
    bytes_per_day       bigint  CHECK (bytes_per_day >= 0),
    created_at          timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE domains (
    domain      text PRIMARY KEY CHECK (domain = lower(domain) AND domain <> ''),
    org_id      uuid NOT NULL REFERENCES organisations(id) ON DELETE CASCADE,
    created_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX domains_org_idx ON domains (org_id);

CREATE TABLE submitters (
    username    text PRIMARY KEY CHECK (username <> ''),
    org_id      uuid NOT NULL REFERENCES organisations(id) ON DELETE CASCADE,
    created_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX submitters_org_idx ON submitters (org_id);

CREATE TABLE messages (
    id                   uuid NOT NULL,             -- UUIDv7, time-ordered
    org_id               uuid NOT NULL,
    domain               text NOT NULL,
    direction            text NOT NULL DEFAULT 'outbound' CHECK (direction IN ('outbound', 'inbound')),
    queue_id             text NOT NULL,
    message_id_header    text,                      -- NULL: the message had none
    envelope_from        text NOT NULL,
    header_from          text,
    subject              text,
    size                 bigint NOT NULL CHECK (size >= 0),
    object_key           text NOT NULL,
    compressed_size      bigint NOT NULL CHECK (compressed_size >= 0),
    sha256               bytea NOT NULL CHECK (octet_length(sha256) = 32),
    content_expires_at   timestamptz NOT NULL,
    metadata_expires_at  timestamptz NOT NULL,       -- 9999-12-31: unlimited
    status               text NOT NULL DEFAULT 'queued'
                         CHECK (status IN ('queued', 'relayed', 'delivered', 'deferred', 'bounced', 'expired', 'partial')),
    recipient_count      integer NOT NULL CHECK (recipient_count >= 0),
    created_at           timestamptz NOT NULL DEFAULT now(),
    accepted_at          timestamptz,
    PRIMARY KEY (id, metadata_expires_at)
) PARTITION BY RANGE (metadata_expires_at);
CREATE INDEX messages_org_created_idx ON messages (org_id, created_at DESC);
CREATE INDEX messages_queue_idx ON messages (queue_id);
CREATE INDEX messages_sender_idx ON messages (org_id, envelope_from);

CREATE TABLE message_recipients (
    message_id           uuid NOT NULL,
    org_id               uuid NOT NULL,
    recipient            text NOT NULL,
    status               text NOT NULL DEFAULT 'queued'
                         CHECK (status IN ('queued', 'relayed', 'delivered', 'deferred', 'bounced', 'expired')),
    dsn_status           text,
    remote_mta           text,
    diagnostic           text,
    metadata_expires_at  timestamptz NOT NULL,
    created_at           timestamptz NOT NULL DEFAULT now(),
    updated_at           timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (message_id, recipient, metadata_expires_at)
) PARTITION BY RANGE (metadata_expires_at);
CREATE INDEX message_recipients_org_rcpt_idx ON message_recipients (org_id, recipient);

-- ensure_partitions(upto): weekly partitions (Monday to Monday, UTC) of both
-- partitioned tables from the current week up to UPTO, plus the 'unlimited'
-- partition.  Idempotent; safe to run concurrently (advisory lock).
CREATE FUNCTION ensure_partitions(upto timestamptz) RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    tbl     text;
    wk      timestamptz;
    created integer := 0;
    pname   text;
BEGIN
    PERFORM pg_advisory_xact_lock(hashtext('postkeep.ensure_partitions'));
    FOREACH tbl IN ARRAY ARRAY['messages', 'message_recipients'] LOOP
        pname := tbl || '_unlimited';
        IF to_regclass(pname) IS NULL THEN
            EXECUTE format('CREATE TABLE %I PARTITION OF %I FOR VALUES FROM (%L) TO (MAXVALUE)',
                           pname, tbl, '9999-12-31 00:00:00+00');
            created := created + 1;
        END IF;
        wk := date_trunc('week', now() AT TIME ZONE 'UTC') AT TIME ZONE 'UTC';
        WHILE wk <= upto LOOP
            pname := tbl || '_e' || to_char(wk AT TIME ZONE 'UTC', 'IYYY"w"IW');
            IF to_regclass(pname) IS NULL THEN
                EXECUTE format('CREATE TABLE %I PARTITION OF %I FOR VALUES FROM (%L) TO (%L)',
                               pname, tbl, wk, wk + interval '7 days');
                created := created + 1;
            END IF;
            wk := wk + interval '7 days';
        END LOOP;
    END LOOP;
    RETURN created;
END $$;

-- Row-level security: the table owner (the daemons) is exempt; a dashboard
-- role sees only the organisation named by the postkeep.org_id setting.
ALTER TABLE domains ENABLE ROW LEVEL SECURITY;
ALTER TABLE submitters ENABLE ROW LEVEL SECURITY;
ALTER TABLE messages ENABLE ROW LEVEL SECURITY;
ALTER TABLE message_recipients ENABLE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON domains
    USING (org_id = nullif(current_setting('postkeep.org_id', true), '')::uuid);
CREATE POLICY tenant_isolation ON submitters
    USING (org_id = nullif(current_setting('postkeep.org_id', true), '')::uuid);
CREATE POLICY tenant_isolation ON messages
    USING (org_id = nullif(current_setting('postkeep.org_id', true), '')::uuid);
CREATE POLICY tenant_isolation ON message_recipients
    USING (org_id = nullif(current_setting('postkeep.org_id', true), '')::uuid);
