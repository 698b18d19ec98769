-- 0007: storage economics — large MIME parts stored once per organisation,
-- and per-organisation zstd dictionaries.
--
-- parts: one row per part object (content-addressed within an organisation).
-- At most one 'live' row per (org_id, sha256): that is the copy new messages
-- reference.  needed_until is at least the content expiry of every message
-- that references the object (the milter raises it before such a message is
-- committed), so the sweeper deletes only rows past it.  A row being swept is
-- 'deleting' first; a message arriving meanwhile uploads a fresh object under
-- a new key instead of reusing the one being deleted.
--
-- attachments: one row per split-out part of each message (filename, MIME
-- type, size, sha256, where the bytes live), partitioned by the message's
-- metadata expiry like message_recipients so it expires by dropping
-- partitions (ensure_partitions, from 0004 on, covers every table
-- partitioned by metadata_expires_at).
--
-- zstd_dictionaries: versioned per organisation; at most one 'current'.
-- Objects name the version they need; a retired version is deleted only
-- after needed_until (raised by the milter like parts.needed_until).

CREATE TABLE parts (
    object_key    text PRIMARY KEY,
    org_id        uuid NOT NULL,
    sha256        bytea NOT NULL CHECK (octet_length(sha256) = 32),
    size          bigint NOT NULL CHECK (size >= 0),       -- bytes as they appear in the message
    stored_size   bigint NOT NULL CHECK (stored_size >= 0), -- the compressed object
    state         text NOT NULL DEFAULT 'live' CHECK (state IN ('live', 'deleting')),
    needed_until  timestamptz NOT NULL,
    created_at    timestamptz NOT NULL DEFAULT now()
);
CREATE UNIQUE INDEX parts_live_idx ON parts (org_id, sha256) WHERE state = 'live';
CREATE INDEX parts_sweep_idx ON parts (needed_until) WHERE state = 'live';

CREATE TABLE attachments (
    message_id           uuid NOT NULL,
    org_id               uuid NOT NULL,
    part_index           integer NOT NULL CHECK (part_index >= 0),
    filename             text,
    content_type         text,
    size                 bigint NOT NULL CHECK (size >= 0),
    sha256               bytea NOT NULL CHECK (octet_length(sha256) = 32),
    object_key           text NOT NULL,
    content_expires_at   timestamptz NOT NULL,
    metadata_expires_at  timestamptz NOT NULL,
    -- a held message's stamp while its rows sit in the held partition (0005)
    held_metadata_expires_at timestamptz,
    created_at           timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (message_id, part_index, metadata_expires_at)
) PARTITION BY RANGE (metadata_expires_at);
-- Legal holds move a message's rows here with it (0005, storage/holds.py).
CREATE TABLE attachments_held PARTITION OF attachments
    FOR VALUES FROM ('9999-01-01 00:00:00+00') TO ('9999-12-31 00:00:00+00');
CREATE INDEX attachments_part_idx ON attachments (org_id, sha256, content_expires_at);

CREATE TABLE zstd_dictionaries (
    org_id        uuid NOT NULL,
    version       integer NOT NULL CHECK (version > 0),
    dict_id       bigint NOT NULL,            -- zstd's own id, in every frame using it
    object_key    text NOT NULL UNIQUE,
    size          integer NOT NULL CHECK (size > 0),
    samples       integer NOT NULL,
    sample_bytes  bigint NOT NULL,
    state         text NOT NULL DEFAULT 'current'
                  CHECK (state IN ('current', 'retired', 'deleting')),
    needed_until  timestamptz NOT NULL DEFAULT '1970-01-01 00:00:00+00', -- epoch: not yet used
    created_at    timestamptz NOT NULL DEFAULT now(),
    retired_at    timestamptz,
    PRIMARY KEY (org_id, version)
);
CREATE UNIQUE INDEX zstd_dictionaries_current_idx ON zstd_dictionaries (org_id)
    WHERE state = 'current';

ALTER TABLE parts ENABLE ROW LEVEL SECURITY;
ALTER TABLE attachments ENABLE ROW LEVEL SECURITY;
ALTER TABLE zstd_dictionaries ENABLE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON parts
    USING (org_id = nullif(current_setting('postkeep.org_id', true), '')::uuid);
CREATE POLICY tenant_isolation ON attachments
    USING (org_id = nullif(current_setting('postkeep.org_id', true), '')::uuid);
CREATE POLICY tenant_isolation ON zstd_dictionaries
    USING (org_id = nullif(current_setting('postkeep.org_id', true), '')::uuid);
