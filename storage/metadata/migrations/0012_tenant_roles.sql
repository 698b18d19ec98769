-- 0012: tenants are database roles, not a setting a session can change.
--
-- Until now row-level security read `postkeep.org_id`, a custom setting any
-- session may set to any value (SET, set_config(), PGOPTIONS), so a dashboard
-- role could read every organisation's rows; and RLS was off on every
-- partition (a role granted SELECT on one read all tenants there), on
-- organisations, reports, unmatched_reports and dkim_key_changes.
--
-- Now:
-- - `tenant_roles` maps a database role to one organisation.  Only the owner
--   (postkeep's daemons and CLI) writes it; a tenant role may read its own row
--   and nothing else, so it cannot change which organisation it is.
-- - Every table with an `org_id` column, and each of its partitions, has the
--   policy `tenant_isolation`: rows of the organisation mapped to
--   current_user.  `organisations` shows a tenant its own row.  Every other
--   table has RLS on and no policy for tenants: they see nothing there.
-- - `secure_tenant_tables()` applies that to any table or partition that
--   lacks it; ensure_partitions() and maintain_report_partitions(), which
--   create partitions later, call it before they return.
-- - `postkeep_tenant` is the group role a dashboard's login role joins (with
--   `postkeep tenant grant ORG ROLE`): SELECT on what a customer may see.
-- The owner is exempt from RLS (it is not FORCEd): the daemons act for every
-- organisation.

CREATE TABLE tenant_roles (
    role_name   name PRIMARY KEY,
    org_id      uuid NOT NULL REFERENCES organisations(id) ON DELETE CASCADE,
    created_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX tenant_roles_org_idx ON tenant_roles (org_id);

DO $$
BEGIN
    CREATE ROLE postkeep_tenant NOLOGIN;
EXCEPTION WHEN duplicate_object THEN
    NULL;  -- roles are cluster-wide: another postkeep database made it
END $$;

-- Enable RLS on every table of this schema (partitions included) and give
-- each one with an org_id column the tenant policy, where missing.  Returns
-- how many tables it changed.  Idempotent.  Both statements need an ACCESS
-- EXCLUSIVE lock: a table someone else holds a lock on is left for the next
-- call (NOWAIT) instead of making partition maintenance wait behind it.  The
-- partitions ensure_partitions() creates are new in the same transaction,
-- so they are never skipped.
CREATE FUNCTION secure_tenant_tables() RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    t       record;
    changed integer := 0;
BEGIN
    FOR t IN
        SELECT c.oid, c.relname, c.relrowsecurity,
               EXISTS (SELECT 1 FROM pg_attribute a WHERE a.attrelid = c.oid
                       AND a.attname = 'org_id' AND NOT a.attisdropped) AS has_org,
               EXISTS (SELECT 1 FROM pg_policy p WHERE p.polrelid = c.oid
                       AND p.polname = 'tenant_isolation') AS has_policy
        FROM pg_class c
        WHERE c.relnamespace = current_schema()::regnamespace AND c.relkind IN ('r', 'p')
    LOOP
        -- tenant_roles has its own policy (reading itself would recurse).
        CONTINUE WHEN t.relrowsecurity
                  AND NOT (t.has_org AND NOT t.has_policy AND t.relname <> 'tenant_roles');
        BEGIN
            EXECUTE format('LOCK TABLE %I IN ACCESS EXCLUSIVE MODE NOWAIT', t.relname);
        EXCEPTION WHEN lock_not_available THEN
            RAISE NOTICE 'secure_tenant_tables: % is locked; it is secured by a later call',
                         t.relname;
            CONTINUE;
        END;
        IF NOT t.relrowsecurity THEN
            EXECUTE format('ALTER TABLE %I ENABLE ROW LEVEL SECURITY', t.relname);
            changed := changed + 1;
        END IF;
        IF t.has_org AND NOT t.has_policy AND t.relname <> 'tenant_roles' THEN
            EXECUTE format('CREATE POLICY tenant_isolation ON %I USING (org_id IN'
                           ' (SELECT r.org_id FROM tenant_roles r WHERE r.role_name = current_user))',
                           t.relname);
            changed := changed + 1;
        END IF;
    END LOOP;
    RETURN changed;
END $$;

-- The old policies read the setting: replace them all.
DO $$
DECLARE
    p record;
BEGIN
    FOR p IN
        SELECT c.relname FROM pg_policy pol JOIN pg_class c ON c.oid = pol.polrelid
        WHERE pol.polname = 'tenant_isolation'
          AND c.relnamespace = current_schema()::regnamespace
    LOOP
        EXECUTE format('DROP POLICY tenant_isolation ON %I', p.relname);
    END LOOP;
END $$;

SELECT secure_tenant_tables();

CREATE POLICY tenant_own_organisation ON organisations
    USING (id IN (SELECT r.org_id FROM tenant_roles r WHERE r.role_name = current_user));
CREATE POLICY tenant_own_mapping ON tenant_roles
    USING (role_name = current_user);

-- Partitions created from now on are secured by the functions that create
-- them.  A PL/pgSQL function is only ever replaced whole; wrapping keeps
-- their bodies where they are (0001/0004/0007, 0008).
ALTER FUNCTION ensure_partitions(timestamptz) RENAME TO ensure_partitions_unsecured;
CREATE FUNCTION ensure_partitions(upto timestamptz) RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    n integer;
BEGIN
    n := ensure_partitions_unsecured(upto);
    PERFORM secure_tenant_tables();
    RETURN n;
END $$;

ALTER FUNCTION maintain_report_partitions(integer) RENAME TO maintain_report_partitions_unsecured;
CREATE FUNCTION maintain_report_partitions(keep_days integer) RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    n integer;
BEGIN
    n := maintain_report_partitions_unsecured(keep_days);
    PERFORM secure_tenant_tables();
    RETURN n;
END $$;

-- What a customer's dashboard may read.  Never dkim_keys (sealed private
-- keys), rate counters, reports or the audit trail's other organisations.
GRANT SELECT ON tenant_roles, organisations, domains, messages, message_recipients,
    recipient_events, attachments, delivery_stats_daily, legal_holds TO postkeep_tenant;
