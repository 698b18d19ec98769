-- 0031: sealed shared parts (issue 19; storage/content/part_keys.py).
--
-- A large part stored once per organisation (parts, 0007) is sealed, when a
-- master key is configured, under a key of its own (storage/content/
-- sealed_stream.py), stored here wrapped (AES-256-GCM) by its organisation's
-- content key (org_keys, 0026).  The row goes when the part's last reference
-- does: erasing the last message that uses it, or the sweep of an expired
-- part (parts.release_message_parts, parts.sweep_parts), before its object
-- is deleted, so the part is unreadable at once even where S3 cannot delete
-- (Object Lock, replicas, backups of the bucket).  Removing the organisation
-- deletes its rows with every org_id table.

CREATE TABLE part_keys (
    org_id      uuid NOT NULL,
    object_key  text NOT NULL,   -- the part object's key (parts.object_key)
    wrapped     bytea NOT NULL,  -- nonce (12) || AES-256-GCM(org key, part key) || tag
    created_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (org_id, object_key)
);
CREATE INDEX part_keys_object_idx ON part_keys (object_key);

SELECT secure_tenant_tables();
-- No grant to postkeep_tenant: a dashboard never reads keys.
