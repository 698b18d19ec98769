-- 0029: daily statistics per tag value, for the tag keys an operator names
-- (issue 17: "statistics by ... tag"), kept after metadata expires exactly as
-- message_stats_daily is (0020; storage/lifecycle/stats.py).
--
-- - `stats_tag_keys`: the tag keys counted (`postkeep stats-tags add KEY`),
--   e.g. template_id.  campaign_id has its own column in message_stats_daily
--   and is never listed here.  A key whose values are per message or per
--   recipient (a lead id) would make a row per message: name only keys with
--   few values.  Counting starts from the rows present when a key is added
--   (rows already expired were counted by no one).
-- - `message_tag_stats_daily` (org, UTC day of capture, direction, type, tag
--   key, tag value): the same counts as message_stats_daily; a message
--   counts once under each of its counted tags.  Rows about to go add their
--   counts to `message_tag_stats_dropped` in the transaction that removes
--   them, and the rollup recomputes days as (rows present) + (dropped).
-- - `stats_tags` (security_invoker): per key and value, totals and rates of
--   outbound mail, as stats_campaigns gives per campaign.

CREATE TABLE stats_tag_keys (
    tag_key     text PRIMARY KEY CHECK (tag_key ~ '^[a-z][a-z0-9_]{0,63}$'
                                        AND tag_key <> 'campaign_id'),
    created_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE message_tag_stats_daily (
    org_id          uuid NOT NULL,
    day             date NOT NULL,
    direction       text NOT NULL,
    message_type    text NOT NULL,
    tag_key         text NOT NULL,
    tag_value       text NOT NULL,
    messages        bigint NOT NULL DEFAULT 0,
    bytes           bigint NOT NULL DEFAULT 0,
    sent            bigint NOT NULL DEFAULT 0,
    queued          bigint NOT NULL DEFAULT 0,
    delivered       bigint NOT NULL DEFAULT 0,
    deferred        bigint NOT NULL DEFAULT 0,
    bounced         bigint NOT NULL DEFAULT 0,
    expired         bigint NOT NULL DEFAULT 0,
    complained      bigint NOT NULL DEFAULT 0,
    replied         bigint NOT NULL DEFAULT 0,
    auto_replied    bigint NOT NULL DEFAULT 0,
    updated_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (org_id, day, direction, message_type, tag_key, tag_value)
);
CREATE INDEX message_tag_stats_daily_key_idx
    ON message_tag_stats_daily (org_id, tag_key, tag_value, day);
CREATE TABLE message_tag_stats_dropped (LIKE message_tag_stats_daily INCLUDING ALL);

CREATE VIEW stats_tags WITH (security_invoker = true) AS
SELECT org_id, tag_key, tag_value, min(day) AS first_day, max(day) AS last_day,
       sum(messages)::bigint AS messages, sum(sent)::bigint AS sent,
       sum(delivered)::bigint AS delivered, sum(bounced)::bigint AS bounced,
       sum(complained)::bigint AS complained, sum(replied)::bigint AS replied,
       sum(auto_replied)::bigint AS auto_replied,
       round(sum(delivered) / nullif(sum(sent), 0), 4) AS delivery_rate,
       round(sum(bounced) / nullif(sum(sent), 0), 4) AS bounce_rate,
       round(sum(complained) / nullif(sum(sent), 0), 4) AS complaint_rate,
       round(sum(replied) / nullif(sum(sent), 0), 4) AS reply_rate
FROM message_tag_stats_daily
WHERE direction = 'outbound'
GROUP BY org_id, tag_key, tag_value;

SELECT secure_tenant_tables();
GRANT SELECT ON message_tag_stats_daily, stats_tags TO postkeep_tenant;
