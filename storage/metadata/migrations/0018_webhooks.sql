-- 0018: webhook endpoints and the delivery of event_outbox (0017) to them
-- (issue 18; postkeep-storage's worker, storage/sidecar/webhooks.py).
--
-- - webhook_endpoints: one HTTPS endpoint of an organisation.  Its signing
--   secrets are stored sealed (AES-256-GCM under a key derived from the DKIM
--   master key, the endpoint id as associated data): a reader of the
--   database, or of a dump, never sees them in the clear.  During a
--   rotation the previous secret stays valid until previous_expires_at.
--   `fanned_to` is the outbox id up to which every event of the
--   organisation has a delivery row; `horizon_id`/`horizon_xmax` are a
--   candidate for it: once every transaction older than horizon_xmax has
--   ended, no event with an id below horizon_id can still appear (identity
--   values are taken before commit, so ids become visible out of order;
--   horizon_at adds two seconds for nextval() running before the xid is taken).
-- - webhook_deliveries: one row per (endpoint, event): its attempts, the
--   next attempt's time, the last answer, and whether it was delivered or
--   dead-lettered.  The worker sends each endpoint's pending rows strictly
--   in event id order (head of line), so one message's events arrive in
--   order and a failing event holds back the later ones of that endpoint.
-- RLS: both tables have org_id, so secure_tenant_tables() gives them the
-- tenant policy; tenants may read an endpoint's URL and filter (never its
-- sealed secrets) and its deliveries.

CREATE TABLE webhook_endpoints (
    id                  uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    org_id              uuid NOT NULL REFERENCES organisations(id) ON DELETE CASCADE,
    url                 text NOT NULL CHECK (url ~ '^https?://'),
    -- NULL: every event type.
    event_types         text[],
    master_key_id       text NOT NULL,
    secret_sealed       bytea NOT NULL,
    secret_nonce        bytea NOT NULL,
    previous_sealed     bytea,
    previous_nonce      bytea,
    previous_expires_at timestamptz,
    fanned_to           bigint NOT NULL,
    horizon_id          bigint,
    horizon_xmax        xid8,
    horizon_at          timestamptz,
    created_at          timestamptz NOT NULL DEFAULT now(),
    CHECK ((previous_sealed IS NULL) = (previous_expires_at IS NULL))
);
CREATE INDEX webhook_endpoints_org_idx ON webhook_endpoints (org_id);

CREATE TABLE webhook_deliveries (
    endpoint_id      uuid NOT NULL REFERENCES webhook_endpoints(id) ON DELETE CASCADE,
    event_id         bigint NOT NULL,
    org_id           uuid NOT NULL,
    message_id       uuid,
    event_type       text NOT NULL,
    event_created_at timestamptz NOT NULL,
    state            text NOT NULL DEFAULT 'pending'
                     CHECK (state IN ('pending', 'delivered', 'dead')),
    attempts         integer NOT NULL DEFAULT 0,
    next_attempt_at  timestamptz NOT NULL DEFAULT now(),
    last_attempt_at  timestamptz,
    last_status      integer,
    last_error       text,
    delivered_at     timestamptz,
    PRIMARY KEY (endpoint_id, event_id)
);
-- The worker's head-of-line lookup and the queue gauges.
CREATE INDEX webhook_deliveries_pending_idx ON webhook_deliveries (endpoint_id, event_id)
    WHERE state = 'pending';
CREATE INDEX webhook_deliveries_dead_idx ON webhook_deliveries (endpoint_id, event_id)
    WHERE state = 'dead';
CREATE INDEX webhook_deliveries_delivered_idx ON webhook_deliveries (delivered_at)
    WHERE state = 'delivered';

SELECT secure_tenant_tables();

GRANT SELECT (id, org_id, url, event_types, created_at) ON webhook_endpoints TO postkeep_tenant;
GRANT SELECT ON webhook_deliveries TO postkeep_tenant;
