-- 0019: `postkeep messages search` and the dashboard's search (issue 17).
--
-- Query shapes (storage/metadata/search.py), each scoped to one organisation
-- and read newest first, so each index leads with org_id and ends with
-- created_at: an ordered index scan per partition, merged, stops after a page.
-- - subject substring: ILIKE '%...%' through a trigram GIN index (pg_trgm).
--   pg_trgm is a trusted extension (PostgreSQL >= 13): the database owner
--   that runs `postkeep db migrate` may create it without being superuser;
--   the package postgresql-contrib (part of Debian's postgresql-15) ships it.
-- - sender and recipient: whole address, case-insensitive, through the
--   collation postkeep_ci (ICU, case-insensitive, non-deterministic), not
--   lower(): under row-level security PostgreSQL uses a condition of a
--   dashboard's query as an index condition only if its functions are
--   LEAKPROOF (else it could leak rows the policy hides), and lower() is not;
--   a COLLATE on the column is no function call, and texteq is leakproof.
--   (Same reason the trigram and tags GIN indexes serve the owner's searches
--   but not a dashboard's: ILIKE and jsonb @> are not leakproof; see
--   BENCHMARKS.md "Search".)
-- - recipient status: per organisation and status, newest first.
-- - direction and message type: per organisation, newest first.
-- Every index is on the partitioned parent: each partition, present and
-- future, gets it.

CREATE EXTENSION IF NOT EXISTS pg_trgm;

CREATE INDEX messages_subject_trgm_idx ON messages USING gin (subject gin_trgm_ops);
CREATE COLLATION postkeep_ci (provider = icu, locale = 'und-u-ks-level2', deterministic = false);

CREATE INDEX messages_org_sender_ci_idx
    ON messages (org_id, (envelope_from COLLATE postkeep_ci), created_at);
CREATE INDEX messages_org_kind_idx ON messages (org_id, direction, message_type, created_at);
CREATE INDEX message_recipients_org_rcpt_ci_idx
    ON message_recipients (org_id, (recipient COLLATE postkeep_ci), created_at);
CREATE INDEX message_recipients_org_status_idx
    ON message_recipients (org_id, status, created_at);
