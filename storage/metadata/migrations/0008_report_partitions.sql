-- 0008: received reports expire in constant work.
--
-- 0004 kept every received report's hash in one table, one row per message
-- sent: at platform volume that is a table needing million-row DELETEs.
-- reports only exists to make a report idempotent while Postfix may still
-- retry it (bounce_queue_lifetime, 1 hour), so it is now partitioned by day
-- of receipt and old days are dropped (maintain_report_partitions, run by
-- postkeep-storage every hour).  unmatched_reports (rare; what an operator
-- looks at) stands alone and keeps the report's kind, object and size.

DROP TABLE unmatched_reports;
DROP TABLE reports;

CREATE TABLE reports (
    sha256       bytea NOT NULL CHECK (octet_length(sha256) = 32),
    kind         text NOT NULL,          -- dsn, async_bounce, unparsable
    message_id   uuid,                   -- NULL: unmatched
    object_key   text NOT NULL,          -- where the bytes are kept (unmatched reports only)
    size         bigint NOT NULL,
    received_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (sha256, received_at)
) PARTITION BY RANGE (received_at);

CREATE TABLE unmatched_reports (
    sha256        bytea PRIMARY KEY CHECK (octet_length(sha256) = 32),
    kind          text NOT NULL,
    reason        text NOT NULL,
    envelope_from text,
    envelope_to   text,
    subject       text,
    object_key    text NOT NULL,
    size          bigint NOT NULL,
    received_at   timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX unmatched_reports_received_idx ON unmatched_reports (received_at);

-- maintain_report_partitions(keep_days): daily partitions of reports from
-- yesterday to two days ahead; drops the days older than KEEP_DAYS (NULL:
-- drops nothing, as `postkeep db migrate` calls it).  Returns
-- how many partitions it created or dropped.  Idempotent, concurrency-safe.
CREATE FUNCTION maintain_report_partitions(keep_days integer) RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    d       date;
    i       integer;
    pname   text;
    n       integer := 0;
    part    record;
    today   date := (now() AT TIME ZONE 'UTC')::date;
BEGIN
    PERFORM pg_advisory_xact_lock(hashtext('postkeep.report_partitions'));
    FOR i IN -1..2 LOOP
        d := today + i;
        pname := 'reports_d' || to_char(d, 'YYYYMMDD');
        IF to_regclass(pname) IS NULL THEN
            EXECUTE format('CREATE TABLE %I PARTITION OF reports FOR VALUES FROM (%L) TO (%L)',
                           pname, d::timestamp AT TIME ZONE 'UTC',
                           (d + 1)::timestamp AT TIME ZONE 'UTC');
            n := n + 1;
        END IF;
    END LOOP;
    IF keep_days IS NULL THEN
        RETURN n;
    END IF;
    FOR part IN
        SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
        WHERE i.inhparent = 'reports'::regclass AND c.relname ~ '^reports_d[0-9]{8}$'
          AND to_date(substr(c.relname, 10), 'YYYYMMDD') < today - keep_days
    LOOP
        EXECUTE format('DROP TABLE %I', part.relname);
        n := n + 1;
    END LOOP;
    RETURN n;
END $$;

SELECT maintain_report_partitions(NULL);

-- in_window(ts, lo, hi): is TS in [LO, HI)?  NULL LO: anywhere.  The
-- caller passes both bounds as values (not LO + an interval, which is only
-- stable), so that a plan made for known bounds prunes to one partition at
-- plan time: a lookup by id alone plans over every partition.
CREATE FUNCTION in_window(ts timestamptz, lo timestamptz, hi timestamptz) RETURNS boolean
LANGUAGE sql IMMUTABLE AS $$
    SELECT lo IS NULL OR (ts >= lo AND ts < hi)
$$;

DROP FUNCTION record_report(bytea, text, uuid, timestamptz, text, bigint, text, text, text,
                            text, text[], text[], text[], text[], text[], text[],
                            timestamptz[]);
DROP FUNCTION in_partition(timestamptz, timestamptz);

-- record_report(...): one received report and its per-recipient outcomes, in
-- one call.  Returns -1 if this report (by hash) was already recorded (-3 if
-- it was kept as unmatched): a duplicate changes nothing; -2 if it is kept as
-- unmatched now; otherwise how many recipients' status changed.  Events apply
-- in event time order: a final status replaces a provisional one, a later
-- final status replaces an earlier one (an asynchronous bounce after a
-- relay), and a delay never replaces a final status.  P_EXPIRES_LO/HI (the
-- second of the message's metadata expiry, from its return path) confine
-- every lookup to the message's partition; custom plans prune with them.
CREATE FUNCTION record_report(
    p_sha256 bytea, p_kind text, p_message_id uuid, p_expires_lo timestamptz,
    p_expires_hi timestamptz, p_object_key text,
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
        WHERE m.id = p_message_id AND in_window(m.metadata_expires_at, p_expires_lo, p_expires_hi)
    ) THEN
        reason := format('message %s not found (expired, or not captured here)', p_message_id);
    END IF;
    -- Two copies of one report at once take turns here.
    PERFORM pg_advisory_xact_lock(hashtextextended(encode(p_sha256, 'hex'), 7));
    IF EXISTS (SELECT 1 FROM reports WHERE sha256 = p_sha256) THEN
        RETURN CASE WHEN EXISTS (SELECT 1 FROM unmatched_reports WHERE sha256 = p_sha256)
                    THEN -3 ELSE -1 END;
    END IF;
    INSERT INTO reports (sha256, kind, message_id, object_key, size)
    VALUES (p_sha256, p_kind, CASE WHEN reason IS NULL THEN p_message_id END,
            p_object_key, p_size);
    IF reason IS NOT NULL THEN
        INSERT INTO unmatched_reports (sha256, kind, reason, envelope_from, envelope_to,
                                       subject, object_key, size)
        VALUES (p_sha256, p_kind, reason, p_envelope_from, p_envelope_to, p_subject,
                p_object_key, p_size);
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
        WHERE r.message_id = p_message_id AND in_window(r.metadata_expires_at, p_expires_lo, p_expires_hi)
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
        INSERT INTO unmatched_reports (sha256, kind, reason, envelope_from, envelope_to,
                                       subject, object_key, size)
        VALUES (p_sha256, p_kind,
                format('no reported recipient (%s) is a recipient of message %s',
                       array_to_string(p_recipients, ', '), p_message_id),
                p_envelope_from, p_envelope_to, p_subject, p_object_key, p_size);
        RETURN -2;
    END IF;
    IF changed > 0 THEN
        UPDATE messages m
        SET status = (SELECT message_rollup(array_agg(r.status)) FROM message_recipients r
                      WHERE r.message_id = p_message_id
                        AND in_window(r.metadata_expires_at, p_expires_lo, p_expires_hi))
        WHERE m.id = p_message_id AND in_window(m.metadata_expires_at, p_expires_lo, p_expires_hi);
    END IF;
    RETURN changed;
END $$;
