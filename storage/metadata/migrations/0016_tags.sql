-- 0016: application tags (issue 17): what a message belongs to, as the
-- platform told it in headers ([tags] in postkeep.toml, postkeep/milter/tags.py).
--
-- - `tags` holds every tag of a message as one JSON object of strings
--   ({"campaign_id": "c-42", "lead_id": "981"}).  Keys are the platform's
--   to choose (configured header map and free X-Postkeep-Tag: key=value), so
--   a column per key would need a migration per new key; JSONB does not.
--   The GIN index (jsonb_path_ops: small, containment only) serves the one
--   query shape tags are filtered by, `tags @> '{"key": "value"}'`.
-- - `campaign_id` is also a real column (the tag campaign_id, filled by the
--   insert): it is what statistics group by and what the dashboard lists a
--   campaign's mail by, newest first.  A b-tree on (org_id, campaign_id,
--   created_at) answers that with an ordered index scan per partition; GIN
--   can neither order nor feed GROUP BY, and its statistics are poor.
-- Both are on the partitioned parent: every partition, present and future,
-- gets the columns and the indexes.  A constant default adds the column
-- without rewriting or scanning any partition (hence no CHECK constraint:
-- the insert only ever writes an object of strings).

ALTER TABLE messages ADD COLUMN tags jsonb NOT NULL DEFAULT '{}'::jsonb;
ALTER TABLE messages ADD COLUMN campaign_id text;

CREATE INDEX messages_tags_idx ON messages USING gin (tags jsonb_path_ops);
CREATE INDEX messages_campaign_idx ON messages (org_id, campaign_id, created_at)
    WHERE campaign_id IS NOT NULL;
