-- 0010: rate_consume() gives back expired reservations without a scan of
-- the whole table.
--
-- The reservations table churns (a row per message, deleted once its time to
-- live is over), so its statistics always lag: the planner estimated that
-- nearly every row of the organisation had expired and deleted them with a
-- sequential scan, on every decision.  On a stack that had taken 200,000
-- messages in a quarter of an hour that scan was 8-11 ms of PostgreSQL CPU per
-- decision, three decisions a message.  Every statement of rate_consume()
-- looks rows up by an organisation's key, which an index always serves (the
-- expired ones through (org_id, expires_at)), so the function plans without
-- sequential scans.  Its text and its decisions are unchanged.
ALTER FUNCTION rate_consume(text, uuid, text, timestamptz, integer, bigint, bigint, bigint,
                            bigint, interval, interval, interval)
    SET enable_seqscan = off;
