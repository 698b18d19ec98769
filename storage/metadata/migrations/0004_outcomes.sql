-- 0004: delivery outcomes.  The milter rewrites each captured message's
-- envelope (return path on a bounce domain carrying the message id, ENVID,
-- NOTIFY forced on every recipient); Postfix's DSNs and remote servers'
-- bounces come back to postkeep-storage, which records them here.
--
-- recipient_events is the status history (partitioned like messages, so it
-- expires with them); message_recipients keeps the current status; reports
-- makes every received report idempotent by content hash; unmatched_reports
-- keeps what could not be matched or parsed (the report itself is in object
-- storage), so nothing received is ever lost.

-- Where a sending domain's bounces go (NULL: the platform default,
-- storage.bounce_domain / milter.bounce_domain).
ALTER TABLE domains ADD COLUMN bounce_domain text
    CHECK (bounce_domain = lower(bounce_domain) AND bounce_domain <> '');

-- Forward failure notices to the original envelope sender (customers that
-- relied on bounces reaching their own address).
ALTER TABLE organisations ADD COLUMN forward_failures boolean NOT NULL DEFAULT false;

-- The rewritten return path; the client's own envelope sender stays in
-- envelope_from.
ALTER TABLE messages ADD COLUMN return_path text;

-- The client's own NOTIFY request (NULL: none given, or not known, as for
-- mail injected with sendmail) and ORCPT; status_at is the time of the
-- report event that set the current status.
ALTER TABLE message_recipients ADD COLUMN notify text;
ALTER TABLE message_recipients ADD COLUMN status_at timestamptz;
ALTER TABLE message_recipients ADD COLUMN report_count integer NOT NULL DEFAULT 0;

CREATE TABLE recipient_events (
    message_id           uuid NOT NULL,
    org_id               uuid NOT NULL,
    recipient            text NOT NULL,
    status               text NOT NULL
                         CHECK (status IN ('relayed', 'delivered', 'deferred', 'bounced', 'expired')),
    dsn_status           text,            -- e.g. 5.1.1
    remote_mta           text,
    diagnostic           text,            -- the remote server's reply, as reported
    event_at             timestamptz NOT NULL,  -- when the reporting MTA dated it
    recorded_at          timestamptz NOT NULL DEFAULT now(),
    report_sha256        bytea NOT NULL,
    report_kind          text NOT NULL,   -- dsn, async_bounce
    applied              boolean NOT NULL, -- did it change the current status
    metadata_expires_at  timestamptz NOT NULL
) PARTITION BY RANGE (metadata_expires_at);
CREATE INDEX recipient_events_msg_idx ON recipient_events (message_id, recipient, event_at);
ALTER TABLE recipient_events ENABLE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON recipient_events
    USING (org_id = nullif(current_setting('postkeep.org_id', true), '')::uuid);

-- Every report received, once: a second copy of the same bytes changes nothing.
CREATE TABLE reports (
    sha256       bytea PRIMARY KEY CHECK (octet_length(sha256) = 32),
    kind         text NOT NULL,          -- dsn, async_bounce, unparsable
    message_id   uuid,                   -- NULL: unmatched
    object_key   text NOT NULL,          -- where the bytes are kept (unmatched reports only)
    size         bigint NOT NULL,
    received_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX reports_received_idx ON reports (received_at);

CREATE TABLE unmatched_reports (
    sha256        bytea PRIMARY KEY REFERENCES reports (sha256) ON DELETE CASCADE,
    reason        text NOT NULL,
    envelope_from text,
    envelope_to   text,
    subject       text,
    received_at   timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX unmatched_reports_received_idx ON unmatched_reports (received_at);

-- ensure_partitions now covers every table partitioned by
-- metadata_expires_at, so later tables join it without redefining it.
CREATE OR REPLACE FUNCTION ensure_partitions(upto timestamptz) RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    tbl     text;
    wk      timestamptz;
    created integer := 0;
    pname   text;
BEGIN
    PERFORM pg_advisory_xact_lock(hashtext('postkeep.ensure_partitions'));
    FOR tbl IN
        SELECT c.relname FROM pg_partitioned_table p
        JOIN pg_class c ON c.oid = p.partrelid
        JOIN pg_namespace n ON n.oid = c.relnamespace AND n.nspname = current_schema()
        JOIN pg_attribute a ON a.attrelid = p.partrelid AND a.attnum = p.partattrs[0]
        WHERE a.attname = 'metadata_expires_at' AND p.partstrat = 'r'
        ORDER BY c.relname
    LOOP
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

-- outcome_rank(status): final outcomes beat provisional ones.
CREATE FUNCTION outcome_is_final(status text) RETURNS boolean
LANGUAGE sql IMMUTABLE AS $$ SELECT status IN ('relayed', 'delivered', 'bounced', 'expired') $$;

-- The message's status from its recipients': one shared status is the
-- message's; otherwise anything still open makes it deferred/queued, and a
-- mix of final outcomes is 'relayed' when all succeeded, 'partial' if not.
CREATE FUNCTION message_rollup(statuses text[]) RETURNS text
LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE
        WHEN count(DISTINCT s) = 1 THEN min(s)
        WHEN bool_or(s = 'deferred') THEN 'deferred'
        WHEN bool_or(s = 'queued') THEN 'queued'
        WHEN bool_and(s IN ('relayed', 'delivered')) THEN 'relayed'
        ELSE 'partial'
    END
    FROM unnest(statuses) AS s
$$;

-- in_partition(ts, expires): does a row stamped TS belong to the message whose
-- metadata expiry is EXPIRES (to the second)?  NULL: unknown, any partition.
-- Inlined by the planner, so a known EXPIRES prunes to one partition.
CREATE FUNCTION in_partition(ts timestamptz, expires timestamptz) RETURNS boolean
LANGUAGE sql IMMUTABLE AS $$
    SELECT expires IS NULL OR (ts >= expires AND ts < expires + interval '1 second')
$$;

-- record_report(...): one received report and its per-recipient outcomes, in
-- one call.  Returns -1 if this report (by hash) was already recorded (-3 if
-- it was kept as unmatched): a duplicate changes nothing; -2 if it is kept as
-- unmatched now; otherwise how many recipients' status changed.  Events apply
-- in event time order: a final status replaces a provisional one, a later
-- final status replaces an earlier one (an asynchronous bounce after a
-- relay), and a delay never replaces a final status.  P_EXPIRES (the
-- message's metadata expiry, from its return path) confines every lookup to
-- the message's partition; custom plans let the planner prune with it.
CREATE FUNCTION record_report(
    p_sha256 bytea, p_kind text, p_message_id uuid, p_expires timestamptz, p_object_key text,
    p_size bigint, p_unmatched_reason text, p_envelope_from text, p_envelope_to text,
    p_subject text, p_recipients text[], p_originals text[], p_statuses text[],
    p_dsn_statuses text[], p_remote_mtas text[], p_diagnostics text[], p_event_ats timestamptz[]
) RETURNS integer
LANGUAGE plpgsql
SET plan_cache_mode = force_custom_plan
AS $$
DECLARE
    ev       record;
    cur      record;
    changed  integer := 0;
    matched  integer := 0;
    applies  boolean;
    reason   text := p_unmatched_reason;
BEGIN
    IF reason IS NULL AND NOT EXISTS (
        SELECT 1 FROM messages m
        WHERE m.id = p_message_id AND in_partition(m.metadata_expires_at, p_expires)
    ) THEN
        reason := format('message %s not found (expired, or not captured here)', p_message_id);
    END IF;
    INSERT INTO reports (sha256, kind, message_id, object_key, size)
    VALUES (p_sha256, p_kind, CASE WHEN reason IS NULL THEN p_message_id END,
            p_object_key, p_size)
    ON CONFLICT (sha256) DO NOTHING;
    IF NOT FOUND THEN
        RETURN CASE WHEN EXISTS (SELECT 1 FROM unmatched_reports WHERE sha256 = p_sha256)
                    THEN -3 ELSE -1 END;
    END IF;
    IF reason IS NOT NULL THEN
        INSERT INTO unmatched_reports (sha256, reason, envelope_from, envelope_to, subject)
        VALUES (p_sha256, reason, p_envelope_from, p_envelope_to, p_subject);
        RETURN -2;
    END IF;
    FOR ev IN
        SELECT * FROM unnest(p_recipients, p_originals, p_statuses, p_dsn_statuses,
                             p_remote_mtas, p_diagnostics, p_event_ats)
               WITH ORDINALITY AS t(recipient, original, status, dsn_status, remote_mta,
                                    diagnostic, event_at, n)
        ORDER BY event_at, n
    LOOP
        SELECT r.recipient, r.org_id, r.status, r.status_at, r.metadata_expires_at INTO cur
        FROM message_recipients r
        WHERE r.message_id = p_message_id AND in_partition(r.metadata_expires_at, p_expires)
          AND lower(r.recipient) IN (lower(ev.recipient), lower(ev.original))
        ORDER BY lower(r.recipient) = lower(ev.original) DESC
        LIMIT 1 FOR UPDATE;
        IF NOT FOUND THEN
            CONTINUE;
        END IF;
        matched := matched + 1;
        applies := cur.status IN ('queued', 'deferred')
                   OR (outcome_is_final(ev.status)
                       AND ev.event_at >= coalesce(cur.status_at, '-infinity'));
        INSERT INTO recipient_events (message_id, org_id, recipient, status, dsn_status,
                                      remote_mta, diagnostic, event_at, report_sha256,
                                      report_kind, applied, metadata_expires_at)
        VALUES (p_message_id, cur.org_id, cur.recipient, ev.status, ev.dsn_status,
                ev.remote_mta, ev.diagnostic, ev.event_at, p_sha256, p_kind, applies,
                cur.metadata_expires_at);
        UPDATE message_recipients r
        SET report_count = r.report_count + 1,
            status = CASE WHEN applies THEN ev.status ELSE r.status END,
            dsn_status = CASE WHEN applies THEN ev.dsn_status ELSE r.dsn_status END,
            remote_mta = CASE WHEN applies THEN ev.remote_mta ELSE r.remote_mta END,
            diagnostic = CASE WHEN applies THEN ev.diagnostic ELSE r.diagnostic END,
            status_at = CASE WHEN applies THEN ev.event_at ELSE r.status_at END,
            updated_at = now()
        WHERE r.message_id = p_message_id AND r.recipient = cur.recipient
          AND r.metadata_expires_at = cur.metadata_expires_at;
        IF applies THEN
            changed := changed + 1;
        END IF;
    END LOOP;
    IF matched = 0 THEN
        UPDATE reports SET message_id = NULL WHERE sha256 = p_sha256;
        INSERT INTO unmatched_reports (sha256, reason, envelope_from, envelope_to, subject)
        VALUES (p_sha256, format('no reported recipient (%s) is a recipient of message %s',
                                 array_to_string(p_recipients, ', '), p_message_id),
                p_envelope_from, p_envelope_to, p_subject);
        RETURN -2;
    END IF;
    IF changed > 0 THEN
        UPDATE messages m
        SET status = (SELECT message_rollup(array_agg(r.status)) FROM message_recipients r
                      WHERE r.message_id = p_message_id
                        AND in_partition(r.metadata_expires_at, p_expires))
        WHERE m.id = p_message_id AND in_partition(m.metadata_expires_at, p_expires);
    END IF;
    RETURN changed;
END $$;
