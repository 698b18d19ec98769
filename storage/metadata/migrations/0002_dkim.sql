-- 0002: DKIM keys per domain and selector, and what to do when a domain has none.
--
-- A key's life is told by two times, so rotation is data, not a procedure:
--   staged   active_from IS NULL, or active_from in the future
--   signing  the newest key of its (domain, algorithm) with active_from <= now
--            and not retired; one per algorithm, so rsa + ed25519 dual-sign
--   grace    active_from <= now, not retired, but a newer key of the same
--            algorithm is signing: no longer used, its DNS record stays
--   retired  retire_after <= now: neither used nor published
-- Activating a key sets the previous signing key's retire_after to the new
-- key's active_from plus the grace period (storage/dkim_keys.py).
--
-- Private keys are AES-256-GCM ciphertext under a master key that never
-- enters the database; domain, selector and algorithm are the associated
-- data, so a row copied onto another selector does not decrypt.

ALTER TABLE organisations
    ADD COLUMN dkim_missing_key text NOT NULL DEFAULT 'tempfail'
        CHECK (dkim_missing_key IN ('tempfail', 'unsigned'));

-- dkim_keys names (domain, org_id) together so the owner is always the
-- domain's organisation, including after a domain changes hands.
ALTER TABLE domains ADD CONSTRAINT domains_domain_org_key UNIQUE (domain, org_id);

CREATE TABLE dkim_keys (
    id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    org_id          uuid NOT NULL,
    domain          text NOT NULL,
    selector        text NOT NULL CHECK (selector = lower(selector) AND selector <> ''),
    algorithm       text NOT NULL CHECK (algorithm IN ('rsa-sha256', 'ed25519-sha256')),
    -- PKCS#8 DER of the private key, AES-256-GCM encrypted (ciphertext || tag)
    private_key_enc bytea NOT NULL,
    nonce           bytea NOT NULL CHECK (octet_length(nonce) = 12),
    -- which master key encrypted it (a fingerprint, not the key)
    master_key_id   text NOT NULL,
    -- the DNS p= value, decoded: SubjectPublicKeyInfo DER (rsa), 32 raw bytes (ed25519)
    public_key      bytea NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now(),
    active_from     timestamptz,                 -- NULL: staged
    retire_after    timestamptz,                 -- NULL: no end
    updated_at      timestamptz NOT NULL DEFAULT now(),
    UNIQUE (domain, selector),
    FOREIGN KEY (domain, org_id) REFERENCES domains (domain, org_id)
        ON DELETE CASCADE ON UPDATE CASCADE,
    CHECK (retire_after IS NULL OR active_from IS NOT NULL)
);
CREATE INDEX dkim_keys_org_idx ON dkim_keys (org_id);

-- One row counting every change to dkim_keys: the milter polls it (one
-- primary-key read) and reloads its key ring when the number moves.  A
-- counter, unlike max(updated_at), cannot miss a transaction that commits
-- after a later one.
CREATE TABLE dkim_key_changes (
    id          boolean PRIMARY KEY DEFAULT true CHECK (id),
    version     bigint NOT NULL DEFAULT 0,
    changed_at  timestamptz NOT NULL DEFAULT now()
);
INSERT INTO dkim_key_changes DEFAULT VALUES;

CREATE FUNCTION dkim_keys_touch() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    NEW.updated_at := now();
    RETURN NEW;
END $$;

CREATE FUNCTION dkim_keys_changed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    UPDATE dkim_key_changes SET version = version + 1, changed_at = now();
    RETURN NULL;
END $$;

CREATE TRIGGER dkim_keys_touch BEFORE UPDATE ON dkim_keys
    FOR EACH ROW EXECUTE FUNCTION dkim_keys_touch();
CREATE TRIGGER dkim_keys_changed AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON dkim_keys
    FOR EACH STATEMENT EXECUTE FUNCTION dkim_keys_changed();

ALTER TABLE dkim_keys ENABLE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON dkim_keys
    USING (org_id = nullif(current_setting('postkeep.org_id', true), '')::uuid);
