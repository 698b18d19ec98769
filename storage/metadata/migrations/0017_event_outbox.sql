CREATE TABLE event_outbox (
    id          bigint GENERATED ALWAYS AS IDENTITY,
    org_id      uuid NOT NULL,
    message_id  uuid,
    recipient   text,
    event_type  text NOT NULL,
    payload     jsonb NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (id, created_at)
) PARTITION BY RANGE (created_at);
CREATE TABLE event_outbox_default PARTITION OF event_outbox DEFAULT;
CREATE INDEX event_outbox_org_idx ON event_outbox (org_id, id);
CREATE OR REPLACE FUNCTION event_outbox_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN PERFORM pg_notify('postkeep_events', NEW.org_id || ':' || NEW.id); RETURN NULL; END $$;
CREATE TRIGGER event_outbox_notify AFTER INSERT ON event_outbox FOR EACH ROW EXECUTE FUNCTION event_outbox_notify();
