-- 0015: per-organisation suppression lists (issue 17).
--
-- An address on its organisation's list is refused at RCPT by postkeep-policyd
-- (organisations.suppression_mode 'enforce') or only logged and counted
-- ('shadow').  Lists are never shared: the key is (org_id, address) and the
-- table carries the tenant_isolation policy (0012) like every org_id table.
--
-- Addresses are compared with the local part exact (RFC 5321 2.4: only the
-- receiving host may fold it) and the domain case-insensitive: stored as
-- suppression_address(), the local part as given, the domain lower-cased,
-- without a trailing dot.  The lookup is the primary key: one index probe.
--
-- Recording an outcome suppresses in the same transaction as record_report()
-- (a trigger on recipient_events, so any writer of events, also a later one
-- such as complaints, is covered).  Which events suppress is
-- suppression_kind():
--   hard bounce, at once: a failed recipient ('bounced') whose DSN status says
--     the address itself is bad: 5.1.1 (no such mailbox), 5.1.2 (no such
--     domain), 5.1.3 (bad address syntax), 5.1.6 (mailbox moved, no
--     forwarding), 5.1.10 (null MX, RFC 7505), 5.2.1 (mailbox disabled);
--   never: 5.7.x (policy: spam, reputation, authentication; the sender's
--     problem, not the address's) and 5.1.7/5.1.8 (the sender's address);
--   soft bounce, after tiers.soft_bounce_limit of them within
--     tiers.soft_bounce_window_days: every other final failure ('bounced'
--     with 5.2.2 mailbox full, 5.1.0/5.1.4, 5.3.x, 5.4.x, 5.5.x, a 4.x.x code
--     given up on, no code at all) and 'expired' (Postfix gave up after
--     retries; not an operator's queue expiry), one per failed message
--     however many notices report it.  Delay notices ('deferred') are not
--     bounces and never count;
--   complaint, at once: a 'complained' event (feedback reports).
-- Entries expire tiers.suppression_days after they were made (NULL: never);
-- an expired entry is ignored by every reader and replaced by a new one.

ALTER TABLE tiers
    ADD COLUMN suppression_days integer DEFAULT 365
        CHECK (suppression_days IS NULL OR suppression_days > 0),
    ADD COLUMN soft_bounce_limit integer DEFAULT 3
        CHECK (soft_bounce_limit IS NULL OR soft_bounce_limit > 0),
    ADD COLUMN soft_bounce_window_days integer NOT NULL DEFAULT 7
        CHECK (soft_bounce_window_days > 0);

ALTER TABLE organisations
    ADD COLUMN suppression_mode text NOT NULL DEFAULT 'enforce'
        CHECK (suppression_mode IN ('enforce', 'shadow'));

CREATE TABLE suppressions (
    org_id         uuid NOT NULL REFERENCES organisations(id) ON DELETE CASCADE,
    address        text NOT NULL,  -- suppression_address(): local part exact, domain lower
    reason         text NOT NULL
                   CHECK (reason IN ('hard_bounce', 'soft_bounce', 'complaint', 'unsubscribe',
                                     'manual')),
    source         text NOT NULL,  -- outcome, cli, complaint, api ...
    detail         text,           -- DSN status, or a note
    message_id     uuid,           -- the message whose outcome put it here
    suppressed_at  timestamptz NOT NULL DEFAULT now(),
    expires_at     timestamptz,    -- NULL: never
    PRIMARY KEY (org_id, address)
);
CREATE INDEX suppressions_org_time_idx ON suppressions (org_id, suppressed_at DESC);
CREATE INDEX suppressions_expiry_idx ON suppressions (expires_at) WHERE expires_at IS NOT NULL;

-- Recent soft bounces of an address that is not (yet) suppressed: the
-- event times within the tier's window, newest soft_bounce_limit kept.
CREATE TABLE suppression_soft_bounces (
    org_id     uuid NOT NULL REFERENCES organisations(id) ON DELETE CASCADE,
    address    text NOT NULL,
    bounce_at  timestamptz[] NOT NULL,
    PRIMARY KEY (org_id, address)
);

CREATE FUNCTION suppression_address(a text) RETURNS text
LANGUAGE plpgsql IMMUTABLE STRICT AS $$
DECLARE
    s   text := btrim(a);
    dom text;
BEGIN
    IF left(s, 1) = '<' AND right(s, 1) = '>' THEN
        s := substr(s, 2, length(s) - 2);
    END IF;
    dom := substring(s FROM '@([^@]*)$');
    IF dom IS NULL THEN
        RETURN s;
    END IF;
    RETURN left(s, length(s) - length(dom)) || rtrim(lower(dom), '.');
END $$;

CREATE FUNCTION suppression_kind(p_status text, p_dsn text, p_report_kind text) RETURNS text
LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE
        WHEN p_status = 'complained' THEN 'complaint'
        WHEN p_status = 'expired' AND p_report_kind IS DISTINCT FROM 'queue_expiry'
            THEN 'soft_bounce'
        WHEN p_status <> 'bounced' THEN NULL
        WHEN p_dsn IN ('5.1.1', '5.1.2', '5.1.3', '5.1.6', '5.1.10', '5.2.1') THEN 'hard_bounce'
        WHEN p_dsn LIKE '5.7.%' OR p_dsn IN ('5.1.7', '5.1.8') THEN NULL
        ELSE 'soft_bounce'
    END
$$;

-- Put ADDRESS on ORG's list (or refresh its entry: the latest reason wins).
-- P_DAYS NULL: the tier's suppression_days; 0: never expires.
CREATE FUNCTION suppression_add(p_org uuid, p_address text, p_reason text, p_source text,
                                p_detail text, p_message_id uuid, p_at timestamptz,
                                p_days integer) RETURNS timestamptz
LANGUAGE plpgsql AS $$
DECLARE
    days    integer := p_days;
    expires timestamptz;
BEGIN
    IF days IS NULL THEN
        SELECT t.suppression_days INTO days FROM organisations o JOIN tiers t ON t.name = o.tier
        WHERE o.id = p_org;
    END IF;
    expires := CASE WHEN coalesce(days, 0) = 0 THEN NULL
                    ELSE coalesce(p_at, now()) + make_interval(days => days) END;
    INSERT INTO suppressions (org_id, address, reason, source, detail, message_id,
                              suppressed_at, expires_at)
    VALUES (p_org, suppression_address(p_address), p_reason, p_source, p_detail, p_message_id,
            coalesce(p_at, now()), expires)
    ON CONFLICT (org_id, address) DO UPDATE
    SET reason = EXCLUDED.reason, source = EXCLUDED.source, detail = EXCLUDED.detail,
        message_id = EXCLUDED.message_id, suppressed_at = EXCLUDED.suppressed_at,
        expires_at = EXCLUDED.expires_at;
    RETURN expires;
END $$;

CREATE FUNCTION suppression_on_event() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    kind    text := suppression_kind(NEW.status, NEW.dsn_status, NEW.report_kind);
    addr    text;
    lim     integer;
    win     interval;
    n       integer;
    detail  text := NEW.dsn_status;
BEGIN
    IF kind IS NULL THEN
        RETURN NULL;
    END IF;
    addr := suppression_address(NEW.recipient);
    IF kind = 'soft_bounce' THEN
        SELECT t.soft_bounce_limit, make_interval(days => t.soft_bounce_window_days)
        INTO lim, win
        FROM organisations o JOIN tiers t ON t.name = o.tier WHERE o.id = NEW.org_id;
        IF lim IS NULL THEN
            RETURN NULL;  -- this tier never suppresses for soft bounces
        END IF;
        -- One failed message is one soft bounce, however many notices say
        -- so (Postfix's own and the remote server's, say).
        IF EXISTS (SELECT 1 FROM recipient_events e
                   WHERE e.message_id = NEW.message_id AND e.recipient = NEW.recipient
                     AND e.metadata_expires_at = NEW.metadata_expires_at
                     AND e.status IN ('bounced', 'expired')
                     AND e.report_sha256 <> NEW.report_sha256) THEN
            RETURN NULL;
        END IF;
        INSERT INTO suppression_soft_bounces AS b (org_id, address, bounce_at)
        VALUES (NEW.org_id, addr, ARRAY[NEW.event_at])
        ON CONFLICT (org_id, address) DO UPDATE
        SET bounce_at = ARRAY(
            SELECT x FROM unnest(b.bounce_at || NEW.event_at) x
            WHERE x > greatest(NEW.event_at, (SELECT max(y) FROM unnest(b.bounce_at) y)) - win
            ORDER BY x DESC LIMIT lim)
        RETURNING cardinality(bounce_at) INTO n;
        IF n < lim THEN
            RETURN NULL;
        END IF;
        DELETE FROM suppression_soft_bounces WHERE org_id = NEW.org_id AND address = addr;
        detail := format('%s in %s days, last %s', n, extract(day FROM win),
                         coalesce(NEW.dsn_status, NEW.status));
    END IF;
    PERFORM suppression_add(NEW.org_id, addr, kind, 'outcome', detail, NEW.message_id,
                            NEW.event_at, NULL);
    RETURN NULL;
END $$;

-- On the partitioned table: every partition, also those created later, has it.
CREATE TRIGGER recipient_events_suppress AFTER INSERT ON recipient_events
    FOR EACH ROW WHEN (NEW.status IN ('bounced', 'expired', 'complained'))
    EXECUTE FUNCTION suppression_on_event();

SELECT secure_tenant_tables();
GRANT SELECT ON suppressions TO postkeep_tenant;
