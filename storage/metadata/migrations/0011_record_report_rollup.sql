-- 0011: record_report() does less planning per report.
--
-- Each statement in record_report() is planned for its one partition every
-- call (force_custom_plan, see 0008), and planning over 60 partitions is most
-- of a report's cost in PostgreSQL (pg_stat_statements, 1000 relayed reports:
-- 0.6 of 0.93 ms).  The costliest was the message status roll-up: an UPDATE
-- with an aggregate over message_recipients, 0.35 ms.  Most messages have one
-- recipient, whose new status is then the message's status: the function now
-- reads the message's recipient_count where it checked that the message
-- exists (the same lookup), and for one recipient sets the status directly.
-- Same signature, same results; the rest of the body is 0008's (a PL/pgSQL
-- function is only ever replaced whole).  1000 reports, 5 a batch, the two
-- versions alternated (bench/record_report_cost.py): 1.86 -> 1.47 ms a report.

CREATE OR REPLACE FUNCTION record_report(
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
    n_rcpts  integer;
    last_status text;
BEGIN
    IF reason IS NULL THEN
        SELECT m.recipient_count INTO n_rcpts FROM messages m
        WHERE m.id = p_message_id AND in_window(m.metadata_expires_at, p_expires_lo, p_expires_hi);
        IF NOT FOUND THEN
            reason := format('message %s not found (expired, or not captured here)', p_message_id);
        END IF;
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
            last_status := ev.status;
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
    IF changed > 0 AND n_rcpts = 1 THEN
        -- One recipient: the message's status is its status (message_rollup
        -- of one), without planning the aggregate over message_recipients.
        UPDATE messages m SET status = last_status
        WHERE m.id = p_message_id AND in_window(m.metadata_expires_at, p_expires_lo, p_expires_hi);
    ELSIF changed > 0 THEN
        UPDATE messages m
        SET status = (SELECT message_rollup(array_agg(r.status)) FROM message_recipients r
                      WHERE r.message_id = p_message_id
                        AND in_window(r.metadata_expires_at, p_expires_lo, p_expires_hi))
        WHERE m.id = p_message_id AND in_window(m.metadata_expires_at, p_expires_lo, p_expires_hi);
    END IF;
    RETURN changed;
END $$;
