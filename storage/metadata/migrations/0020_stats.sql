-- 0020: per-organisation statistics by day, direction, message type and
-- campaign (issue 17), kept after metadata expires like delivery_stats_daily
-- (0005), and the views a dashboard reads.
--
-- - `message_stats_daily` (org, UTC day of capture, direction, message_type,
--   campaign_id; '' for none: a primary key column cannot be NULL): messages,
--   bytes, and per recipient its status (sent = recipients accepted;
--   delivered counts delivered, relayed and complained: a complained
--   recipient was delivered to), replied and auto_replied.  Maintained as
--   delivery_stats_daily is (storage/lifecycle/stats.py): rows about to go
--   (a partition drop, a released hold's expired rows) add their counts to
--   `message_stats_dropped` in the transaction that removes them, and a
--   rollup recomputes a range of days as (rows present) + (dropped counts).
--   Erasure only redacts addresses: counts never change.
-- - A reply or auto-reply is counted on the sent message it answers (its
--   day and campaign): linking it (messages.parent_message_id, set by
--   storage/metadata/inbound.py) stamps `replied_at`/`auto_replied_at` on the
--   answered recipient in the same transaction (trigger below), so the count
--   stays exact after the reply's own row expires.  The answered recipient is
--   the one whose address is the reply's envelope sender or appears in its
--   From:, else the parent's only recipient.
-- - The views are security_invoker: a tenant role reads them under its own
--   row-level security (0012), never with the owner's rights.

ALTER TABLE message_recipients ADD COLUMN replied_at timestamptz;
ALTER TABLE message_recipients ADD COLUMN auto_replied_at timestamptz;

CREATE TABLE message_stats_daily (
    org_id          uuid NOT NULL,
    day             date NOT NULL,
    direction       text NOT NULL,
    message_type    text NOT NULL,
    campaign_id     text NOT NULL DEFAULT '',
    messages        bigint NOT NULL DEFAULT 0,
    bytes           bigint NOT NULL DEFAULT 0,
    sent            bigint NOT NULL DEFAULT 0,      -- recipients accepted
    queued          bigint NOT NULL DEFAULT 0,
    delivered       bigint NOT NULL DEFAULT 0,      -- delivered, relayed or complained
    deferred        bigint NOT NULL DEFAULT 0,
    bounced         bigint NOT NULL DEFAULT 0,
    expired         bigint NOT NULL DEFAULT 0,
    complained      bigint NOT NULL DEFAULT 0,
    replied         bigint NOT NULL DEFAULT 0,      -- recipients who replied
    auto_replied    bigint NOT NULL DEFAULT 0,      -- recipients who auto-replied
    updated_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (org_id, day, direction, message_type, campaign_id)
);
CREATE INDEX message_stats_daily_campaign_idx ON message_stats_daily (org_id, campaign_id, day)
    WHERE campaign_id <> '';
CREATE TABLE message_stats_dropped (LIKE message_stats_daily INCLUDING ALL);

CREATE FUNCTION mark_answered() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    UPDATE message_recipients r
    SET replied_at = CASE WHEN NEW.message_type = 'reply'
                          THEN coalesce(r.replied_at, NEW.created_at) ELSE r.replied_at END,
        auto_replied_at = CASE WHEN NEW.message_type = 'auto_reply'
                               THEN coalesce(r.auto_replied_at, NEW.created_at)
                               ELSE r.auto_replied_at END
    WHERE r.message_id = NEW.parent_message_id
      AND r.metadata_expires_at = NEW.parent_metadata_expires_at
      AND r.org_id = NEW.org_id
      AND (lower(r.recipient) = lower(NEW.envelope_from)
           OR strpos(lower(coalesce(NEW.header_from, '')), lower(r.recipient)) > 0
           OR NOT EXISTS (SELECT 1 FROM message_recipients o
                          WHERE o.message_id = r.message_id
                            AND o.metadata_expires_at = r.metadata_expires_at
                            AND o.recipient <> r.recipient));
    RETURN NULL;
END $$;

CREATE TRIGGER messages_mark_answered_on_link
    AFTER UPDATE OF parent_message_id ON messages FOR EACH ROW
    WHEN (NEW.parent_message_id IS NOT NULL
          AND NEW.parent_message_id IS DISTINCT FROM OLD.parent_message_id
          AND NEW.message_type IN ('reply', 'auto_reply'))
    EXECUTE FUNCTION mark_answered();
CREATE TRIGGER messages_mark_answered_on_insert
    AFTER INSERT ON messages FOR EACH ROW
    WHEN (NEW.parent_message_id IS NOT NULL AND NEW.message_type IN ('reply', 'auto_reply'))
    EXECUTE FUNCTION mark_answered();

-- What a dashboard reads.  Rates are per recipient sent, NULL with none sent.
CREATE VIEW stats_daily WITH (security_invoker = true) AS
SELECT org_id, day, direction, message_type, nullif(campaign_id, '') AS campaign_id,
       messages, bytes, sent, queued, delivered, deferred, bounced, expired, complained,
       replied, auto_replied, updated_at
FROM message_stats_daily;

CREATE VIEW stats_campaigns WITH (security_invoker = true) AS
SELECT org_id, campaign_id, min(day) AS first_day, max(day) AS last_day,
       sum(messages)::bigint AS messages, sum(sent)::bigint AS sent,
       sum(delivered)::bigint AS delivered, sum(bounced)::bigint AS bounced,
       sum(complained)::bigint AS complained, sum(replied)::bigint AS replied,
       sum(auto_replied)::bigint AS auto_replied,
       round(sum(delivered) / nullif(sum(sent), 0), 4) AS delivery_rate,
       round(sum(bounced) / nullif(sum(sent), 0), 4) AS bounce_rate,
       round(sum(complained) / nullif(sum(sent), 0), 4) AS complaint_rate,
       round(sum(replied) / nullif(sum(sent), 0), 4) AS reply_rate
FROM message_stats_daily
WHERE direction = 'outbound' AND campaign_id <> ''
GROUP BY org_id, campaign_id;

SELECT secure_tenant_tables();
GRANT SELECT ON message_stats_daily, stats_daily, stats_campaigns TO postkeep_tenant;
