-- 0026: sealed content, crypto-shredding (issue 19; storage/content/sealing.py).
--
-- Each packed message's compressed entry is encrypted (AES-256-GCM) with its
-- own random data key.  The data key is stored here wrapped (AES-256-GCM) by
-- its organisation's content key, which is stored here wrapped by the master
-- key ([storage] master_key_file, never in the database).
--
-- org_keys: one wrapped content key per organisation.  Removing the
--   organisation deletes the row (directory.remove_organisation deletes every
--   org_id table): every data key of it becomes unusable at once.
-- message_keys: one wrapped data key per sealed message, partitioned by the
--   message's content expiry (monthly, made ahead by ensure_partitions).
--   Expiring content is dropping a partition whose month has passed (the
--   retention run) and deleting the passed rows of the current one; erasing a
--   message is deleting its row.  Without the row its bytes (in a pack, or
--   under Object Lock) are noise.  A legal hold moves its messages' rows to
--   expires_at = 'infinity' (the DEFAULT partition, never dropped).

CREATE TABLE org_keys (
    org_id      uuid PRIMARY KEY,
    wrapped     bytea NOT NULL,  -- nonce (12) || AES-256-GCM(master key, content key) || tag
    master_id   text NOT NULL,   -- which master key wrapped it (sha256 prefix, not the key)
    created_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE message_keys (
    message_id  uuid NOT NULL,
    org_id      uuid NOT NULL,
    expires_at  timestamptz NOT NULL,  -- the message's content_expires_at ('infinity': held)
    wrapped     bytea NOT NULL,  -- nonce (12) || AES-256-GCM(content key, data key) || tag
    -- message_id first (restore and erasure look keys up by message); org_id
    -- in the key so the table can be distributed by it (tests/test_sharding_keys.py).
    PRIMARY KEY (message_id, expires_at, org_id)
) PARTITION BY RANGE (expires_at);
CREATE TABLE message_keys_default PARTITION OF message_keys DEFAULT;

-- maintain_key_partitions(upto): monthly partitions of message_keys from this
-- month to UPTO.  A month whose rows already sit in the DEFAULT partition is
-- left there (they go when their messages are erased or swept).  Returns how
-- many partitions it created.
CREATE FUNCTION maintain_key_partitions(upto timestamptz) RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    m       timestamptz := date_trunc('month', now() AT TIME ZONE 'UTC') AT TIME ZONE 'UTC';
    pname   text;
    n       integer := 0;
BEGIN
    PERFORM pg_advisory_xact_lock(hashtext('postkeep.key_partitions'));
    WHILE m <= upto LOOP
        pname := 'message_keys_e' || to_char(m AT TIME ZONE 'UTC', 'YYYY"m"MM');
        IF to_regclass(pname) IS NULL THEN
            BEGIN
                EXECUTE format('CREATE TABLE %I PARTITION OF message_keys FOR VALUES FROM (%L) TO (%L)',
                               pname, m, ((m AT TIME ZONE 'UTC') + interval '1 month') AT TIME ZONE 'UTC');
                n := n + 1;
            EXCEPTION WHEN check_violation THEN
                RAISE NOTICE 'maintain_key_partitions: % has rows in the default partition', m;
            END;
        END IF;
        m := ((m AT TIME ZONE 'UTC') + interval '1 month') AT TIME ZONE 'UTC';
    END LOOP;
    RETURN n;
END $$;

-- expire_keys(now): crypto-shred the content that expired by NOW: drop every
-- monthly partition wholly before it, delete the passed rows of the others.
-- Returns (partitions dropped, rows deleted).
CREATE FUNCTION expire_keys(cutoff timestamptz, OUT dropped integer, OUT deleted bigint)
LANGUAGE plpgsql AS $$
DECLARE
    part record;
BEGIN
    dropped := 0;
    PERFORM pg_advisory_xact_lock(hashtext('postkeep.key_partitions'));
    FOR part IN
        SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
        WHERE i.inhparent = 'message_keys'::regclass
          AND c.relname ~ '^message_keys_e[0-9]{4}m[0-9]{2}$'
          AND ((to_date(substr(c.relname, 15), 'YYYY"m"MM')::timestamp + interval '1 month')
               AT TIME ZONE 'UTC') <= cutoff
    LOOP
        EXECUTE format('DROP TABLE %I', part.relname);
        dropped := dropped + 1;
    END LOOP;
    DELETE FROM message_keys WHERE expires_at <= cutoff;
    GET DIAGNOSTICS deleted = ROW_COUNT;
END $$;

SELECT maintain_key_partitions(now() + interval '62 days');
SELECT secure_tenant_tables();
-- No grant to postkeep_tenant: a dashboard never reads keys.
