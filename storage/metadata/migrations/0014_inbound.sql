-- 0014: inbound mail, its classification and its link to what was sent.
--
-- Mail for an organisation's domains arriving from outside is captured like
-- outbound mail (direction = 'inbound', 0001).  message_type says what it is
-- (storage/reports/classify.py); a reply, auto-reply or complaint points at
-- the sent message it answers (parent_message_id, and the parent's metadata
-- expiry so the lookup stays inside one partition).  A complaint marks the
-- complained recipient 'complained' through record_report(), like any notice.

ALTER TABLE messages ADD COLUMN message_type text NOT NULL DEFAULT 'email'
    CHECK (message_type IN ('email', 'reply', 'auto_reply', 'bounce', 'complaint'));
ALTER TABLE messages ADD COLUMN parent_message_id uuid;
ALTER TABLE messages ADD COLUMN parent_metadata_expires_at timestamptz;
-- Linking by In-Reply-To/References looks up the organisation's sent Message-IDs.
CREATE INDEX messages_org_msgid_idx ON messages (org_id, message_id_header)
    WHERE message_id_header IS NOT NULL;
-- The thread view: the replies and complaints of a sent message.
CREATE INDEX messages_parent_idx ON messages (parent_message_id)
    WHERE parent_message_id IS NOT NULL;

-- Per domain, what happens to inbound mail once captured: NULL (the domain
-- takes no inbound mail: Postfix does not relay for it), 'archive' (captured,
-- then discarded) or 'relay' (captured, then relayed to inbound_relay, a
-- host[:port] of the organisation).  `postkeep domain set-inbound` sets it and
-- writes the Postfix maps (relay domains, transport) from these rows.
ALTER TABLE domains ADD COLUMN inbound_mode text CHECK (inbound_mode IN ('archive', 'relay'));
ALTER TABLE domains ADD COLUMN inbound_relay text
    CHECK (inbound_relay IS NULL OR inbound_relay ~ '^[A-Za-z0-9.:\[\]-]+$');
ALTER TABLE domains ADD CONSTRAINT domains_inbound_mode_relay_check
    CHECK ((inbound_mode = 'relay') = (inbound_relay IS NOT NULL));

-- 'complained': delivered, then reported as spam by its recipient (ARF).
ALTER TABLE message_recipients DROP CONSTRAINT message_recipients_status_check;
ALTER TABLE message_recipients ADD CONSTRAINT message_recipients_status_check
    CHECK (status IN ('queued', 'relayed', 'delivered', 'deferred', 'bounced', 'expired',
                      'complained'));
ALTER TABLE recipient_events DROP CONSTRAINT recipient_events_status_check;
ALTER TABLE recipient_events ADD CONSTRAINT recipient_events_status_check
    CHECK (status IN ('relayed', 'delivered', 'deferred', 'bounced', 'expired', 'complained'));
ALTER TABLE messages DROP CONSTRAINT messages_status_check;
ALTER TABLE messages ADD CONSTRAINT messages_status_check
    CHECK (status IN ('queued', 'relayed', 'delivered', 'deferred', 'bounced', 'expired',
                      'partial', 'complained'));

-- A complaint is final (a later-dated delivery notice does not undo it).
CREATE OR REPLACE FUNCTION outcome_is_final(status text) RETURNS boolean
LANGUAGE sql IMMUTABLE AS $$
    SELECT status IN ('relayed', 'delivered', 'bounced', 'expired', 'complained') $$;

-- A complained recipient was delivered to: with delivered ones the message
-- rolls up to 'relayed', not 'partial'.
CREATE OR REPLACE FUNCTION message_rollup(statuses text[]) RETURNS text
LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE
        WHEN count(DISTINCT s) = 1 THEN min(s)
        WHEN bool_or(s = 'deferred') THEN 'deferred'
        WHEN bool_or(s = 'queued') THEN 'queued'
        WHEN bool_and(s IN ('relayed', 'delivered', 'complained')) THEN 'relayed'
        ELSE 'partial'
    END
    FROM unnest(statuses) AS s
$$;
