-- 0019: `postkeep messages search` and the dashboard's search (issue 17).
--
-- Query shapes (storage/metadata/search.py), each scoped to one organisation
-- and read newest first, so each index leads with org_id and ends with
-- created_at: an ordered index scan per partition, merged, stops after a page.
-- - subject substring: ILIKE '%...%' through a trigram GIN index (pg_trgm).
--   pg_trgm is a trusted extension (PostgreSQL >= 13): the database owner
--   that runs `postkeep db migrate` may create it without being superuser;
--   the package postgresql-contrib (part of Debian's postgresql-15) ships it.
-- - sender: lower(envelope_from), the search is case-insensitive.
-- - recipient: lower(recipient) per organisation, newest first.
-- - recipient status: per organisation and status, newest first.
-- - direction and message type: per organisation, newest first.
-- Every index is on the partitioned parent: each partition, present and
-- future, gets it.

CREATE EXTENSION IF NOT EXISTS pg_trgm;

CREATE INDEX messages_subject_trgm_idx ON messages USING gin (subject gin_trgm_ops);
CREATE INDEX messages_org_sender_lower_idx ON messages (org_id, lower(envelope_from), created_at);
CREATE INDEX messages_org_kind_idx ON messages (org_id, direction, message_type, created_at);
CREATE INDEX message_recipients_org_rcpt_lower_idx
    ON message_recipients (org_id, lower(recipient), created_at);
CREATE INDEX message_recipients_org_status_idx
    ON message_recipients (org_id, status, created_at);
