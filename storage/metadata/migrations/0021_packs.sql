-- 0021: packs.  The messages one group commit writes for one organisation
-- and retention class go into ONE object (a pack) instead of one object each
-- (storage/content/packs.py).  PostgreSQL is the pack's index:
--
-- packs: one row per pack object.  expires_at is the latest
--   content_expires_at of the messages written into it: the whole pack is
--   deleted at once when that passes (by the class's lifecycle rule, or by the
--   retention run's pack sweep), never one message at a time.
-- message_packs: where one message's bytes are in its pack (offset, length:
--   a ranged GET), and in what form (`format` 0: the message's compressed
--   object as it would have been stored alone; a later format seals it).
--   Erasing a packed message deletes its row here: the pack object stays
--   until it expires or `postkeep storage compact` rewrites it.
--
-- A message with no message_packs row is read the old way (its own object at
-- messages.object_key).  messages.object_key of a packed message is the pack's key.

CREATE TABLE packs (
    object_key  text PRIMARY KEY,
    org_id      uuid NOT NULL,
    expires_at  timestamptz NOT NULL,
    length      bigint NOT NULL CHECK (length >= 0),
    messages    integer NOT NULL CHECK (messages >= 0),
    created_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX packs_expires_idx ON packs (expires_at);
CREATE INDEX packs_org_idx ON packs (org_id);

CREATE TABLE message_packs (
    message_id   uuid PRIMARY KEY,
    org_id       uuid NOT NULL,
    pack_key     text NOT NULL REFERENCES packs (object_key) ON DELETE CASCADE,
    pack_offset  bigint NOT NULL CHECK (pack_offset >= 0),
    length       bigint NOT NULL CHECK (length >= 0),
    format       smallint NOT NULL DEFAULT 0
);
CREATE INDEX message_packs_pack_idx ON message_packs (pack_key);

-- Objects `postkeep storage repack` / `compact` replaced: listed in the same
-- transaction that points the rows at the new pack, deleted afterwards, so a
-- crash between the two leaves them here for the next run, never forgotten.
CREATE TABLE pack_leftovers (
    object_key  text PRIMARY KEY,
    org_id      uuid NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);

SELECT secure_tenant_tables();
GRANT SELECT ON packs, message_packs TO postkeep_tenant;
