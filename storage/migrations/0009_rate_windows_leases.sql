-- 0009: window lengths as parameters, and leases for lease mode.
--
-- rate_consume() as in 0003, with the window lengths passed in (default one
-- hour and one day, aligned to the epoch: UTC hours and days, as before).
-- policyd.message_window_seconds / daily_window_seconds shorten them only for
-- tests that watch a window roll over in real time.
--
-- rate_consume_many() runs several decisions of one organisation in one
-- transaction, one after another: policyd sends the decisions that queued
-- while the previous round trip for that organisation was in flight.
--
-- rate_lease() and rate_release() serve policyd's lease mode (tiers listed in
-- policyd.lease_tiers): a process takes a block of units of a window from the
-- shared counter in one atomic step, spends it in memory, and gives back what
-- it did not spend.  Units are counted when leased, so the processes together
-- never admit more than the limit; see policyd/decide.py (LeaseBook) for the
-- bound on what they may leave unused.

DROP FUNCTION rate_consume(text, uuid, text, timestamptz, integer, bigint, bigint, bigint,
                           bigint, interval);

CREATE FUNCTION rate_consume(
    p_stage text, p_org uuid, p_instance text, p_now timestamptz,
    p_recipients integer, p_size bigint,
    p_lim_messages bigint, p_lim_recipients bigint, p_lim_bytes bigint,
    p_ttl interval,
    p_hour interval DEFAULT '1 hour', p_day interval DEFAULT '1 day'
) RETURNS TABLE (outcome text, kind text, used bigint, lim bigint)
LANGUAGE plpgsql AS $$
DECLARE
    v_now   timestamptz := coalesce(p_now, now());
    v_hour  timestamptz := date_bin(p_hour, v_now, 'epoch');
    v_day   timestamptz := date_bin(p_day, v_now, 'epoch');
    v_msgs  bigint;
    v_rcpts bigint;
    v_bytes bigint;
    v_res   rate_reservations%ROWTYPE;
    v_old   rate_reservations%ROWTYPE;
    v_have  boolean;
BEGIN
    IF p_stage = 'check' THEN
        SELECT coalesce(sum(c.used) FILTER (WHERE c.kind = 'messages'), 0),
               coalesce(sum(c.used) FILTER (WHERE c.kind = 'recipients'), 0),
               coalesce(sum(c.used) FILTER (WHERE c.kind = 'bytes'), 0)
          INTO v_msgs, v_rcpts, v_bytes
          FROM rate_counters c
         WHERE c.org_id = p_org
           AND ((c.kind = 'messages' AND c.window_start = v_hour)
             OR (c.kind <> 'messages' AND c.window_start = v_day));
        IF p_lim_messages IS NOT NULL AND v_msgs + 1 > p_lim_messages THEN
            RETURN QUERY SELECT 'over', 'messages', v_msgs, p_lim_messages; RETURN;
        ELSIF p_lim_recipients IS NOT NULL AND v_rcpts + 1 > p_lim_recipients THEN
            RETURN QUERY SELECT 'over', 'recipients', v_rcpts, p_lim_recipients; RETURN;
        ELSIF p_lim_bytes IS NOT NULL AND v_bytes >= p_lim_bytes THEN
            RETURN QUERY SELECT 'over', 'bytes', v_bytes, p_lim_bytes; RETURN;
        END IF;
        RETURN QUERY SELECT 'ok', NULL::text, NULL::bigint, NULL::bigint; RETURN;
    END IF;

    -- Every writer of this organisation's counters locks the current windows'
    -- rows first, always in the same order: writers for one organisation run
    -- one after another, and never deadlock.
    INSERT INTO rate_counters (org_id, kind, window_start)
         VALUES (p_org, 'bytes', v_day), (p_org, 'messages', v_hour), (p_org, 'recipients', v_day)
    ON CONFLICT DO NOTHING;
    PERFORM 1 FROM rate_counters c
      WHERE c.org_id = p_org
        AND ((c.kind = 'messages' AND c.window_start = v_hour)
          OR (c.kind <> 'messages' AND c.window_start = v_day))
      ORDER BY c.kind FOR UPDATE;

    -- Give back what expired reservations of messages that never completed held.
    FOR v_old IN DELETE FROM rate_reservations r
                  WHERE r.org_id = p_org AND r.expires_at <= v_now RETURNING r.* LOOP
        IF NOT v_old.settled THEN
            UPDATE rate_counters c SET used = greatest(c.used - 1, 0)
             WHERE c.org_id = p_org AND c.kind = 'messages' AND c.window_start = v_old.hour_start;
            UPDATE rate_counters c SET used = greatest(c.used - v_old.recipients, 0)
             WHERE c.org_id = p_org AND c.kind = 'recipients' AND c.window_start = v_old.day_start;
        END IF;
    END LOOP;

    SELECT * INTO v_res FROM rate_reservations r
     WHERE r.org_id = p_org AND r.instance = p_instance;
    v_have := FOUND;

    IF v_have AND (p_stage = 'reserve' OR v_res.settled) THEN
        RETURN QUERY SELECT 'dup', NULL::text, NULL::bigint, NULL::bigint; RETURN;
    END IF;

    SELECT c.used INTO v_bytes FROM rate_counters c
     WHERE c.org_id = p_org AND c.kind = 'bytes'
       AND c.window_start = CASE WHEN v_have THEN v_res.day_start ELSE v_day END;
    v_bytes := coalesce(v_bytes, 0);

    IF v_have THEN
        -- settle: only the bytes remain to be counted
        IF p_lim_bytes IS NOT NULL AND v_bytes + p_size > p_lim_bytes THEN
            -- the message is refused: its reservation goes back
            DELETE FROM rate_reservations r WHERE r.org_id = p_org AND r.instance = p_instance;
            UPDATE rate_counters c SET used = greatest(c.used - 1, 0)
             WHERE c.org_id = p_org AND c.kind = 'messages' AND c.window_start = v_res.hour_start;
            UPDATE rate_counters c SET used = greatest(c.used - v_res.recipients, 0)
             WHERE c.org_id = p_org AND c.kind = 'recipients' AND c.window_start = v_res.day_start;
            RETURN QUERY SELECT 'over', 'bytes', v_bytes, p_lim_bytes; RETURN;
        END IF;
        INSERT INTO rate_counters (org_id, kind, window_start)
             VALUES (p_org, 'bytes', v_res.day_start) ON CONFLICT DO NOTHING;
        UPDATE rate_counters c SET used = c.used + p_size
         WHERE c.org_id = p_org AND c.kind = 'bytes' AND c.window_start = v_res.day_start;
        UPDATE rate_reservations r SET settled = true, bytes = p_size, expires_at = v_now + p_ttl
         WHERE r.org_id = p_org AND r.instance = p_instance;
        RETURN QUERY SELECT 'ok', NULL::text, NULL::bigint, NULL::bigint; RETURN;
    END IF;

    SELECT c.used INTO v_msgs FROM rate_counters c
     WHERE c.org_id = p_org AND c.kind = 'messages' AND c.window_start = v_hour;
    SELECT c.used INTO v_rcpts FROM rate_counters c
     WHERE c.org_id = p_org AND c.kind = 'recipients' AND c.window_start = v_day;
    IF p_lim_messages IS NOT NULL AND v_msgs + 1 > p_lim_messages THEN
        RETURN QUERY SELECT 'over', 'messages', v_msgs, p_lim_messages; RETURN;
    ELSIF p_lim_recipients IS NOT NULL AND v_rcpts + p_recipients > p_lim_recipients THEN
        RETURN QUERY SELECT 'over', 'recipients', v_rcpts, p_lim_recipients; RETURN;
    ELSIF p_lim_bytes IS NOT NULL AND v_bytes + p_size > p_lim_bytes THEN
        RETURN QUERY SELECT 'over', 'bytes', v_bytes, p_lim_bytes; RETURN;
    END IF;

    UPDATE rate_counters c SET used = c.used + 1
     WHERE c.org_id = p_org AND c.kind = 'messages' AND c.window_start = v_hour;
    UPDATE rate_counters c SET used = c.used + p_recipients
     WHERE c.org_id = p_org AND c.kind = 'recipients' AND c.window_start = v_day;
    IF p_stage = 'settle' THEN
        UPDATE rate_counters c SET used = c.used + p_size
         WHERE c.org_id = p_org AND c.kind = 'bytes' AND c.window_start = v_day;
    END IF;
    INSERT INTO rate_reservations (org_id, instance, hour_start, day_start, recipients,
                                   bytes, settled, expires_at)
         VALUES (p_org, p_instance, v_hour, v_day, p_recipients,
                 CASE WHEN p_stage = 'settle' THEN p_size ELSE 0 END,
                 p_stage = 'settle', v_now + p_ttl);
    RETURN QUERY SELECT 'ok', NULL::text, NULL::bigint, NULL::bigint;
END $$;


-- rate_consume_many(stages, org, instances, now, recipients, sizes, limits...):
-- rate_consume() for each element, in order, in one transaction (the counter
-- rows stay locked from the first to the last); one result row per element.
CREATE FUNCTION rate_consume_many(
    p_stages text[], p_org uuid, p_instances text[], p_now timestamptz,
    p_recipients integer[], p_sizes bigint[],
    p_lim_messages bigint, p_lim_recipients bigint, p_lim_bytes bigint,
    p_ttl interval, p_hour interval, p_day interval
) RETURNS TABLE (outcome text, kind text, used bigint, lim bigint)
LANGUAGE plpgsql AS $$
DECLARE
    v_i integer;
BEGIN
    FOR v_i IN 1 .. coalesce(array_length(p_stages, 1), 0) LOOP
        RETURN QUERY SELECT * FROM rate_consume(
            p_stages[v_i], p_org, p_instances[v_i], p_now, p_recipients[v_i], p_sizes[v_i],
            p_lim_messages, p_lim_recipients, p_lim_bytes, p_ttl, p_hour, p_day);
    END LOOP;
END $$;

-- rate_lease(org, kinds, windows, need, want, lim): for each kind (distinct,
-- any order), take `want` units of that window if the limit leaves that
-- many, else `need` if it leaves that many, else none.  Returns per kind the
-- units granted and the use before the grant.  Rows are locked in kind order,
-- as rate_consume() locks them.
CREATE FUNCTION rate_lease(
    p_org uuid, p_kinds text[], p_windows timestamptz[], p_need bigint[], p_want bigint[],
    p_lim bigint[]
) RETURNS TABLE (kind text, window_start timestamptz, granted bigint, used bigint)
LANGUAGE plpgsql AS $$
DECLARE
    v_i     integer;
    v_used  bigint;
    v_grant bigint;
BEGIN
    INSERT INTO rate_counters (org_id, kind, window_start)
         SELECT p_org, u.k, u.w FROM unnest(p_kinds, p_windows) AS u(k, w)
    ON CONFLICT DO NOTHING;
    PERFORM 1 FROM rate_counters c JOIN unnest(p_kinds, p_windows) AS u(k, w)
                ON c.kind = u.k AND c.window_start = u.w
      WHERE c.org_id = p_org ORDER BY c.kind FOR UPDATE OF c;
    FOR v_i IN 1 .. coalesce(array_length(p_kinds, 1), 0) LOOP
        SELECT c.used INTO v_used FROM rate_counters c
         WHERE c.org_id = p_org AND c.kind = p_kinds[v_i] AND c.window_start = p_windows[v_i];
        v_grant := CASE
            WHEN p_lim[v_i] IS NULL OR p_lim[v_i] - v_used >= p_want[v_i] THEN p_want[v_i]
            WHEN p_lim[v_i] - v_used >= p_need[v_i] THEN p_need[v_i]
            ELSE 0 END;
        IF v_grant > 0 THEN
            UPDATE rate_counters c SET used = c.used + v_grant
             WHERE c.org_id = p_org AND c.kind = p_kinds[v_i]
               AND c.window_start = p_windows[v_i];
        END IF;
        kind := p_kinds[v_i];
        window_start := p_windows[v_i];
        granted := v_grant;
        used := v_used;
        RETURN NEXT;
    END LOOP;
END $$;

-- rate_release(org, kinds, windows, n): give back unspent leased units.
CREATE FUNCTION rate_release(
    p_org uuid, p_kinds text[], p_windows timestamptz[], p_n bigint[]
) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM 1 FROM rate_counters c JOIN unnest(p_kinds, p_windows) AS u(k, w)
                ON c.kind = u.k AND c.window_start = u.w
      WHERE c.org_id = p_org ORDER BY c.kind FOR UPDATE OF c;
    UPDATE rate_counters c SET used = greatest(c.used - u.n, 0)
      FROM unnest(p_kinds, p_windows, p_n) AS u(k, w, n)
     WHERE c.org_id = p_org AND c.kind = u.k AND c.window_start = u.w;
END $$;
