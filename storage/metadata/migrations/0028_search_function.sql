-- 0028: message search as one function, `search_messages(filter jsonb)`, for
-- the owner's CLI and for dashboard logins alike (issue 17).
--
-- Why a function: under row-level security PostgreSQL lets a condition of a
-- tenant's query into an index scan only if its functions are LEAKPROOF;
-- ILIKE and jsonb @> are not, so a dashboard's subject and free-tag searches
-- scanned the organisation's rows (BENCHMARKS.md "Search").  This function is
-- SECURITY DEFINER: it runs as the owner (exempt from RLS, like the daemons)
-- with the owner's indexes, and it does the tenant check itself: the
-- organisation is the one `tenant_roles` maps the *session's* login to
-- (session_user: inside a SECURITY DEFINER function current_user is the
-- owner), never one the caller passes.  A caller that is neither a mapped
-- login nor a member of the owner role gets an error.  Every value of the
-- filter reaches the query as a parameter ($2->>'key'), never as SQL text.
--
-- Filter keys (storage/metadata/search.py writes them): org_id (the owner
-- only; a tenant naming another organisation gets nothing), sender,
-- recipient, subject (literal substring, case-insensitive), status,
-- direction, message_type, since, until, tags (object: all pairs must match),
-- after_at + after_id (keyset cursor), limit.
--
-- Plans: with a recipient, or a status and no condition on the message
-- itself, the search walks that organisation's recipient rows newest first
-- on (org_id, recipient|status, created_at) through a cursor, skips a
-- message's further recipient rows (adjacent in that order), and looks the
-- messages up by key a page at a time until the page is full: it reads
-- little more than it returns.  Else
-- it selects messages and probes a status per message (OFFSET 0 keeps that
-- EXISTS a per-row probe instead of a hash join over every recipient row).

-- CONDS (format strings: %1$s the table's alias, %2$s its message id column)
-- for the table ALIAS whose message id is ID_COL.
CREATE FUNCTION search_window(alias text, id_col text, conds text[]) RETURNS text[]
LANGUAGE sql IMMUTABLE
SET search_path = public, pg_temp
RETURN coalesce((SELECT array_agg(format(c, alias, id_col) ORDER BY i)
                 FROM unnest(conds) WITH ORDINALITY AS u(c, i)), '{}');

CREATE FUNCTION search_messages(filter jsonb) RETURNS SETOF messages
LANGUAGE plpgsql STABLE SECURITY DEFINER
SET search_path = public, pg_temp
AS $fn$
DECLARE
    org uuid;
    asked uuid := (filter->>'org_id')::uuid;
    lim integer := coalesce((filter->>'limit')::integer, 50);
    m_conds text[] := '{}';
    r_conds text[] := '{}';
    t_conds text[] := '{}';
    by_recipient boolean;
    q text;
    mq text;
    hit record;
    last_id uuid;
    ids uuid[] := '{}';
    expiries timestamptz[] := '{}';
    n integer := 0;
    got integer;
    slice integer;
    rows_read integer;
    after_at timestamptz;
    after_id uuid;
BEGIN
    SELECT t.org_id INTO org FROM tenant_roles t WHERE t.role_name = session_user;
    IF org IS NOT NULL THEN
        IF asked IS NOT NULL AND asked <> org THEN
            RETURN;  -- another organisation's messages: none
        END IF;
    ELSIF pg_has_role(session_user, current_user, 'MEMBER') THEN
        org := asked;  -- the owner (daemons, CLI): one organisation or every one
    ELSE
        RAISE EXCEPTION 'search_messages: % is not a dashboard login (postkeep tenant grant)',
            session_user USING ERRCODE = 'insufficient_privilege';
    END IF;
    -- the largest page `messages list|search` asks for, 10,000, plus the one
    -- more row that tells whether another page follows
    IF lim < 1 OR lim > 10001 THEN
        RAISE EXCEPTION 'search_messages: limit % out of range 1..10001', lim
            USING ERRCODE = 'invalid_parameter_value';
    END IF;

    -- The time window and the keyset cursor, written once for whichever
    -- table the search walks (search_window fills in its alias and id column).
    IF filter ? 'since' THEN
        -- metadata never expires before it was created: prunes partitions
        t_conds := t_conds || ('(%1$s.created_at >= ($2->>''since'')::timestamptz'
            ' AND %1$s.metadata_expires_at >= ($2->>''since'')::timestamptz)')::text;
    END IF;
    IF filter ? 'until' THEN
        t_conds := t_conds || '%1$s.created_at < ($2->>''until'')::timestamptz'::text;
    END IF;
    IF filter ? 'after_at' THEN
        t_conds := t_conds || ('(%1$s.created_at, %2$s) < '
            '(($2->>''after_at'')::timestamptz, ($2->>''after_id'')::uuid)')::text;
    END IF;

    -- Conditions on the message (m), with the parameters $1 (org) and $2 (filter).
    IF org IS NOT NULL THEN
        m_conds := array_append(m_conds, 'm.org_id = $1');
    END IF;
    IF filter ? 'sender' THEN
        -- the collation postkeep_ci (0019): whole address, case-insensitive
        m_conds := array_append(m_conds, '(m.envelope_from COLLATE postkeep_ci) = ($2->>''sender'')');
    END IF;
    IF filter ? 'subject' THEN
        -- literal: %, _ and \ in the text match themselves
        m_conds := array_append(m_conds, ('m.subject ILIKE (''%'' || replace(replace(replace('
            '$2->>''subject'', ''\'', ''\\''), ''%'', ''\%''), ''_'', ''\_'') || ''%'')'
            ' ESCAPE ''\'''));
    END IF;
    IF filter ? 'direction' THEN
        m_conds := array_append(m_conds, 'm.direction = ($2->>''direction'')');
    END IF;
    IF filter ? 'message_type' THEN
        m_conds := array_append(m_conds, 'm.message_type = ($2->>''message_type'')');
    END IF;
    IF filter ? 'tags' THEN
        m_conds := array_append(m_conds, 'm.tags @> ($2->''tags'')');
        IF filter->'tags' ? 'campaign_id' THEN  -- its own b-tree (0016)
            m_conds := array_append(m_conds, 'm.campaign_id = ($2->''tags''->>''campaign_id'')');
        END IF;
    END IF;

    -- (a status alone: only within one organisation, whose index is ordered)
    by_recipient := filter ? 'recipient'
                    OR (filter ? 'status' AND org IS NOT NULL AND cardinality(m_conds) = 1);
    IF by_recipient THEN
        slice := greatest(2 * lim, 100);
        -- Walk the recipient rows; they carry the message's created_at.
        IF org IS NOT NULL THEN
            r_conds := array_append(r_conds, 'r.org_id = $1');
        END IF;
        IF filter ? 'recipient' THEN
            r_conds := array_append(r_conds, '(r.recipient COLLATE postkeep_ci) = ($2->>''recipient'')');
        END IF;
        IF filter ? 'status' THEN
            r_conds := array_append(r_conds, 'r.status = ($2->>''status'')');
        END IF;
        r_conds := r_conds || search_window('r', 'r.message_id', t_conds);
        -- Two steps, so that no query plans every partition twice over: the
        -- recipient rows' keys newest first, then their messages, a page at a
        -- time, by key: the expiries are constants, so the planner keeps
        -- only their partitions (planning over hundreds of partitions, as a
        -- ten-year tier makes, costs more than the search itself).
        -- In slices of a LIMIT (a cursor alone is planned for every row: a
        -- sort of all the organisation's bounced rows), each after the last
        -- row of the one before ($3, $4; NULL the first time, folded away).
        q := 'SELECT r.message_id, r.metadata_expires_at, r.created_at'
             ' FROM message_recipients r WHERE ' || array_to_string(r_conds, ' AND ')
             || ' AND ($3::timestamptz IS NULL OR (r.created_at, r.message_id) < ($3, $4::uuid))'
             || ' ORDER BY r.created_at DESC, r.message_id DESC LIMIT ' || slice;
        mq := 'SELECT m.* FROM messages m WHERE m.id = ANY($3) AND m.metadata_expires_at = ANY($4)'
              || CASE WHEN cardinality(m_conds) > 0
                      THEN ' AND ' || array_to_string(m_conds, ' AND ') ELSE '' END
              || ' ORDER BY m.created_at DESC, m.id DESC LIMIT ';
        <<walk>>
        LOOP
            rows_read := 0;
            FOR hit IN EXECUTE q USING org, filter, after_at, after_id LOOP
                rows_read := rows_read + 1;
                after_at := hit.created_at;
                after_id := hit.message_id;
                CONTINUE WHEN hit.message_id = last_id;  -- the same message's next recipient
                last_id := hit.message_id;
                ids := ids || hit.message_id;
                expiries := expiries || hit.metadata_expires_at;
                IF cardinality(ids) >= lim - n THEN
                    RETURN QUERY EXECUTE mq || (lim - n) USING org, filter, ids, expiries;
                    GET DIAGNOSTICS got = ROW_COUNT;
                    n := n + got;
                    ids := '{}';
                    expiries := '{}';
                    EXIT walk WHEN n >= lim;
                END IF;
            END LOOP;
            EXIT walk WHEN rows_read < slice;  -- no more recipient rows
        END LOOP walk;
        IF cardinality(ids) > 0 AND n < lim THEN
            RETURN QUERY EXECUTE mq || (lim - n) USING org, filter, ids, expiries;
        END IF;
        RETURN;
    END IF;

    IF filter ? 'status' THEN
        m_conds := array_append(m_conds, ('EXISTS (SELECT 1 FROM message_recipients r'
            ' WHERE r.message_id = m.id AND r.org_id = m.org_id'
            ' AND r.metadata_expires_at = m.metadata_expires_at'
            ' AND r.status = ($2->>''status'') OFFSET 0)'));
    END IF;
    m_conds := m_conds || search_window('m', 'm.id', t_conds);
    q := 'SELECT m.* FROM messages m'
         || CASE WHEN cardinality(m_conds) > 0
                 THEN ' WHERE ' || array_to_string(m_conds, ' AND ') ELSE '' END
         || ' ORDER BY m.created_at DESC, m.id DESC LIMIT ' || lim;
    RETURN QUERY EXECUTE q USING org, filter;
END
$fn$;

REVOKE ALL ON FUNCTION search_window(text, text, text[]) FROM PUBLIC;
REVOKE ALL ON FUNCTION search_messages(jsonb) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION search_messages(jsonb) TO postkeep_tenant;
