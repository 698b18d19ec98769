-- 0017: the event outbox (issue 18).
--
-- Every change the platform is told about (a message accepted, a recipient's
-- status changed, a reply linked, an address suppressed) writes one row here
-- in the same transaction as the change itself: triggers on the tables that
-- hold the change, so no writer, present or later, can skip its event, and a
-- rolled-back change leaves no event.  The webhook worker and local readers
-- fetch rows by id (per organisation: event_outbox_org_idx); each insert
-- NOTIFYs 'postkeep_events' with 'org_id:id' (delivered at commit only), so a
-- reader on the same network waits instead of polling.
--
-- Partitioned by day of creation: maintain_event_partitions(keep_days), run
-- by postkeep-storage with the report partitions, makes days ahead and drops
-- days older than storage.event_days.  The DEFAULT partition catches a row
-- whose day has no partition yet (maintenance stopped), so an insert never
-- fails for want of one.
--
-- The payload is the event exactly as delivered (schema postkeep.event.v1,
-- docs/events.schema.json), built by event_payload() alone.

CREATE TABLE event_outbox (
    id          bigint GENERATED ALWAYS AS IDENTITY,
    org_id      uuid NOT NULL,
    message_id  uuid,            -- postkeep id; NULL for events not about one message
    recipient   text,
    -- accepted relayed delivered deferred bounced expired complained replied
    -- suppressed erased (no CHECK: the webhook side may add its own, e.g. a test event)
    event_type  text NOT NULL,
    payload     jsonb NOT NULL,  -- the versioned event (schema "postkeep.event.v1") exactly as delivered
    created_at  timestamptz NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (id, created_at)
) PARTITION BY RANGE (created_at);
CREATE INDEX event_outbox_org_idx ON event_outbox (org_id, id);
CREATE TABLE event_outbox_default PARTITION OF event_outbox DEFAULT;

-- maintain_event_partitions(keep_days): daily partitions from yesterday to
-- two days ahead; drops the days older than KEEP_DAYS (NULL: drops nothing).
-- A day whose rows already sit in the DEFAULT partition (maintenance was
-- stopped) is left there rather than moved under a lock: they expire when
-- an operator empties the default partition.  Returns how many partitions
-- it created or dropped.  Idempotent, concurrency-safe.
CREATE FUNCTION maintain_event_partitions(keep_days integer) RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    d       date;
    i       integer;
    pname   text;
    n       integer := 0;
    part    record;
    today   date := (now() AT TIME ZONE 'UTC')::date;
BEGIN
    PERFORM pg_advisory_xact_lock(hashtext('postkeep.event_partitions'));
    FOR i IN -1..2 LOOP
        d := today + i;
        pname := 'event_outbox_d' || to_char(d, 'YYYYMMDD');
        CONTINUE WHEN to_regclass(pname) IS NOT NULL;
        BEGIN
            EXECUTE format('CREATE TABLE %I PARTITION OF event_outbox FOR VALUES FROM (%L) TO (%L)',
                           pname, d::timestamp AT TIME ZONE 'UTC',
                           (d + 1)::timestamp AT TIME ZONE 'UTC');
            n := n + 1;
        EXCEPTION WHEN check_violation THEN
            RAISE NOTICE 'maintain_event_partitions: % has rows in the default partition', d;
        END;
    END LOOP;
    IF keep_days IS NOT NULL THEN
        FOR part IN
            SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
            WHERE i.inhparent = 'event_outbox'::regclass
              AND c.relname ~ '^event_outbox_d[0-9]{8}$'
              AND to_date(substr(c.relname, 15), 'YYYYMMDD') < today - keep_days
        LOOP
            EXECUTE format('DROP TABLE %I', part.relname);
            n := n + 1;
        END LOOP;
    END IF;
    PERFORM secure_tenant_tables();
    RETURN n;
END $$;

SELECT maintain_event_partitions(NULL);

-- After each insert: a wake-up for LISTEN postkeep_events (sent at commit).
CREATE FUNCTION event_outbox_notify() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('postkeep_events', NEW.org_id::text || ':' || NEW.id::text);
    RETURN NULL;
END $$;
CREATE TRIGGER event_outbox_notify AFTER INSERT ON event_outbox
    FOR EACH ROW EXECUTE FUNCTION event_outbox_notify();

-- The one place an event's JSON is built (schema postkeep.event.v1).  EXTRA
-- adds type-specific fields (recipients of `accepted`, reason of
-- `suppressed`, ...).  "id" is filled by event_emit().
CREATE FUNCTION event_payload(
    p_type text, p_org uuid, p_postkeep_id uuid, p_message_id text, p_recipient text,
    p_status text, p_dsn_status text, p_remote_reply text, p_tags jsonb, p_campaign_id text,
    p_event_at timestamptz, p_extra jsonb
) RETURNS jsonb
LANGUAGE sql STABLE AS $$
    SELECT jsonb_build_object(
        'schema', 'postkeep.event.v1',
        'id', NULL,
        'type', p_type,
        'postkeep_id', p_postkeep_id,
        'message_id', p_message_id,
        'org_id', p_org,
        'recipient', p_recipient,
        'status', p_status,
        'dsn_status', p_dsn_status,
        'remote_reply', p_remote_reply,
        'tags', coalesce(p_tags, '{}'::jsonb),
        'campaign_id', p_campaign_id,
        'event_at', to_char(p_event_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"'),
        'recorded_at', to_char(clock_timestamp() AT TIME ZONE 'UTC',
                               'YYYY-MM-DD"T"HH24:MI:SS.US"Z"')
    ) || coalesce(p_extra, '{}'::jsonb)
$$;

-- Insert one event; its payload carries its own outbox id.
CREATE FUNCTION event_emit(p_type text, p_org uuid, p_postkeep_id uuid, p_recipient text,
                           p_payload jsonb) RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    new_id bigint := nextval('event_outbox_id_seq'::regclass);
BEGIN
    INSERT INTO event_outbox (id, org_id, message_id, recipient, event_type, payload)
    OVERRIDING SYSTEM VALUE
    VALUES (new_id, p_org, p_postkeep_id, p_recipient, p_type,
            p_payload || jsonb_build_object('id', new_id));
    RETURN new_id;
END $$;

-- accepted: once per outbound message, when its rows are written.  The
-- capture writes messages and message_recipients in one statement (a
-- batch), so this is a statement trigger: one INSERT of every message's
-- event, recipients in the payload.  It fires at the end of that whole
-- statement, when the recipient rows are in too.  A retried capture (ON
-- CONFLICT DO NOTHING) inserts no row, so emits no second event.
CREATE FUNCTION event_on_messages_insert() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO event_outbox (id, org_id, message_id, recipient, event_type, payload)
    OVERRIDING SYSTEM VALUE
    SELECT e.id, e.org_id, e.mid, NULL, 'accepted', e.payload || jsonb_build_object('id', e.id)
    FROM (
        SELECT nextval('event_outbox_id_seq'::regclass) AS id, m.org_id,
               m.id AS mid,
               event_payload('accepted', m.org_id, m.id, m.message_id_header, NULL, 'accepted',
                             NULL, NULL, m.tags, m.campaign_id,
                             coalesce(m.accepted_at, m.created_at),
                             jsonb_build_object(
                                 'envelope_from', m.envelope_from,
                                 'subject', m.subject,
                                 'recipients', coalesce((
                                     SELECT jsonb_agg(r.recipient ORDER BY r.recipient)
                                     FROM message_recipients r
                                     WHERE r.message_id = m.id
                                       AND r.metadata_expires_at = m.metadata_expires_at),
                                     '[]'::jsonb))) AS payload
        FROM new_messages m
        WHERE m.direction = 'outbound'
        ORDER BY m.created_at, m.id
    ) e;
    RETURN NULL;
END $$;
CREATE TRIGGER messages_event_accepted AFTER INSERT ON messages
    REFERENCING NEW TABLE AS new_messages
    FOR EACH STATEMENT EXECUTE FUNCTION event_on_messages_insert();

-- relayed, delivered, deferred, bounced, expired, complained: a report
-- event that changed the recipient's current status (applied).  Any writer
-- of recipient_events (record_report, queue expiry, complaints) emits it.
CREATE FUNCTION event_on_recipient_event() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    m record;
BEGIN
    SELECT msg.message_id_header, msg.tags, msg.campaign_id INTO m FROM messages msg
    WHERE msg.id = NEW.message_id AND msg.metadata_expires_at = NEW.metadata_expires_at;
    PERFORM event_emit(NEW.status, NEW.org_id, NEW.message_id, NEW.recipient,
                       event_payload(NEW.status, NEW.org_id, NEW.message_id,
                                     m.message_id_header, NEW.recipient, NEW.status,
                                     NEW.dsn_status, NEW.diagnostic, m.tags, m.campaign_id,
                                     NEW.event_at,
                                     jsonb_build_object('remote_mta', NEW.remote_mta,
                                                        'report_kind', NEW.report_kind)));
    RETURN NULL;
END $$;
CREATE TRIGGER recipient_events_event AFTER INSERT ON recipient_events
    FOR EACH ROW WHEN (NEW.applied) EXECUTE FUNCTION event_on_recipient_event();

-- replied: an inbound reply (or auto-reply) linked to the sent message it
-- answers (storage/metadata/inbound.py set_parent).  The event is about the
-- sent message: its postkeep id, Message-ID and tags; the reply's own id
-- and sender are in reply_postkeep_id / reply_from.
CREATE FUNCTION event_on_reply() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    p record;
BEGIN
    SELECT msg.id, msg.message_id_header, msg.tags, msg.campaign_id INTO p FROM messages msg
    WHERE msg.id = NEW.parent_message_id
      AND msg.metadata_expires_at = NEW.parent_metadata_expires_at;
    PERFORM event_emit('replied', NEW.org_id, NEW.parent_message_id, NEW.envelope_from,
                       event_payload('replied', NEW.org_id, NEW.parent_message_id,
                                     p.message_id_header, NEW.envelope_from, NEW.message_type,
                                     NULL, NULL, p.tags, p.campaign_id,
                                     coalesce(NEW.accepted_at, NEW.created_at),
                                     jsonb_build_object('reply_postkeep_id', NEW.id,
                                                        'reply_message_id', NEW.message_id_header,
                                                        'reply_from', NEW.header_from,
                                                        'reply_subject', NEW.subject,
                                                        'message_type', NEW.message_type)));
    RETURN NULL;
END $$;
CREATE TRIGGER messages_event_replied
    AFTER UPDATE OF parent_message_id ON messages
    FOR EACH ROW
    WHEN (NEW.parent_message_id IS NOT NULL
          AND OLD.parent_message_id IS DISTINCT FROM NEW.parent_message_id
          AND NEW.message_type IN ('reply', 'auto_reply'))
    EXECUTE FUNCTION event_on_reply();

-- suppressed: an address put on (or refreshed on) an organisation's list.
CREATE FUNCTION event_on_suppression() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    m record;
BEGIN
    -- Rare (one per suppressed address): a lookup by id alone is fine here.
    SELECT msg.message_id_header, msg.tags, msg.campaign_id INTO m FROM messages msg
    WHERE msg.id = NEW.message_id LIMIT 1;
    PERFORM event_emit('suppressed', NEW.org_id, NEW.message_id, NEW.address,
                       event_payload('suppressed', NEW.org_id, NEW.message_id,
                                     m.message_id_header, NEW.address, NEW.reason, NULL,
                                     NEW.detail, m.tags, m.campaign_id, NEW.suppressed_at,
                                     jsonb_build_object('reason', NEW.reason,
                                                        'source', NEW.source,
                                                        'detail', NEW.detail,
                                                        'expires_at', NEW.expires_at)));
    RETURN NULL;
END $$;
CREATE TRIGGER suppressions_event AFTER INSERT ON suppressions
    FOR EACH ROW EXECUTE FUNCTION event_on_suppression();
CREATE TRIGGER suppressions_event_update AFTER UPDATE ON suppressions
    FOR EACH ROW WHEN (OLD.* IS DISTINCT FROM NEW.*) EXECUTE FUNCTION event_on_suppression();

SELECT secure_tenant_tables();
GRANT SELECT ON event_outbox TO postkeep_tenant;
