-- 0009: window lengths as parameters, and leases for lease mode.
--
-- rate_consume() decides as in 0003, with the window lengths passed in
-- (default one hour and one day, aligned to the epoch: UTC hours and days, as
-- before), in about half the statements: the counter rows are locked and read
-- in one pass, and a new message's reservation insert doubles as the check
-- for a message already counted.
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
    v_now    timestamptz := coalesce(p_now, now());
    v_hour   timestamptz := date_bin(p_hour, v_now, 'epoch');
    v_day    timestamptz := date_bin(p_day, v_now, 'epoch');
    v_settle boolean := p_stage = 'settle';
    v_msgs   bigint := 0;
    v_rcpts  bigint := 0;
    v_bytes  bigint := 0;
    v_over   text;
    v_c      record;
    v_res    rate_reservations%ROWTYPE;
    v_old    rate_reservations%ROWTYPE;
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
        outcome := 'over';
        IF p_lim_messages IS NOT NULL AND v_msgs + 1 > p_lim_messages THEN
            kind := 'messages'; used := v_msgs; lim := p_lim_messages;
        ELSIF p_lim_recipients IS NOT NULL AND v_rcpts + 1 > p_lim_recipients THEN
            kind := 'recipients'; used := v_rcpts; lim := p_lim_recipients;
        ELSIF p_lim_bytes IS NOT NULL AND v_bytes >= p_lim_bytes THEN
            kind := 'bytes'; used := v_bytes; lim := p_lim_bytes;
        ELSE
            outcome := 'ok';
        END IF;
        RETURN NEXT;
        RETURN;
    END IF;

    -- Every writer of this organisation's counters locks the current windows'
    -- rows first (creating them the first time), always in the same order:
    -- writers for one organisation run one after another, and never
    -- deadlock.  FOR UPDATE returns each row as last committed, so the values
    -- read here are the ones the check below must use.
    INSERT INTO rate_counters (org_id, kind, window_start)
         VALUES (p_org, 'bytes', v_day), (p_org, 'messages', v_hour), (p_org, 'recipients', v_day)
    ON CONFLICT DO NOTHING;
    FOR v_c IN SELECT c.kind, c.used FROM rate_counters c
                WHERE c.org_id = p_org
                  AND ((c.kind = 'messages' AND c.window_start = v_hour)
                    OR (c.kind <> 'messages' AND c.window_start = v_day))
                ORDER BY c.kind FOR UPDATE LOOP
        IF v_c.kind = 'messages' THEN
            v_msgs := v_c.used;
        ELSIF v_c.kind = 'recipients' THEN
            v_rcpts := v_c.used;
        ELSE
            v_bytes := v_c.used;
        END IF;
    END LOOP;

    -- Give back what expired reservations of messages that never completed held.
    FOR v_old IN DELETE FROM rate_reservations r
                  WHERE r.org_id = p_org AND r.expires_at <= v_now RETURNING r.* LOOP
        IF NOT v_old.settled THEN
            UPDATE rate_counters c SET used = greatest(c.used - 1, 0)
             WHERE c.org_id = p_org AND c.kind = 'messages' AND c.window_start = v_old.hour_start;
            UPDATE rate_counters c SET used = greatest(c.used - v_old.recipients, 0)
             WHERE c.org_id = p_org AND c.kind = 'recipients' AND c.window_start = v_old.day_start;
            IF v_old.hour_start = v_hour THEN
                v_msgs := greatest(v_msgs - 1, 0);
            END IF;
            IF v_old.day_start = v_day THEN
                v_rcpts := greatest(v_rcpts - v_old.recipients, 0);
            END IF;
        END IF;
    END LOOP;

    -- Would it fit as a new message?
    IF p_lim_messages IS NOT NULL AND v_msgs + 1 > p_lim_messages THEN
        v_over := 'messages';
    ELSIF p_lim_recipients IS NOT NULL AND v_rcpts + p_recipients > p_lim_recipients THEN
        v_over := 'recipients';
    ELSIF p_lim_bytes IS NOT NULL AND v_bytes + p_size > p_lim_bytes THEN
        v_over := 'bytes';
    END IF;

    IF v_over IS NULL THEN
        -- yes: count it, unless it is counted already (the insert says which)
        INSERT INTO rate_reservations (org_id, instance, hour_start, day_start, recipients,
                                       bytes, settled, expires_at)
             VALUES (p_org, p_instance, v_hour, v_day, p_recipients,
                     CASE WHEN v_settle THEN p_size ELSE 0 END, v_settle, v_now + p_ttl)
        ON CONFLICT (org_id, instance) DO NOTHING;
        IF FOUND THEN
            UPDATE rate_counters c
               SET used = c.used + CASE c.kind WHEN 'messages' THEN 1
                                               WHEN 'recipients' THEN p_recipients
                                               ELSE p_size END
             WHERE c.org_id = p_org
               AND ((c.kind = 'messages' AND c.window_start = v_hour)
                 OR (c.kind = 'recipients' AND c.window_start = v_day)
                 OR (c.kind = 'bytes' AND c.window_start = v_day AND v_settle));
            outcome := 'ok';
            RETURN NEXT;
            RETURN;
        END IF;
    END IF;

    SELECT * INTO v_res FROM rate_reservations r
     WHERE r.org_id = p_org AND r.instance = p_instance;
    IF NOT FOUND THEN
        outcome := 'over';
        kind := v_over;
        used := CASE v_over WHEN 'messages' THEN v_msgs WHEN 'recipients' THEN v_rcpts
                            ELSE v_bytes END;
        lim := CASE v_over WHEN 'messages' THEN p_lim_messages
                           WHEN 'recipients' THEN p_lim_recipients ELSE p_lim_bytes END;
        RETURN NEXT;
        RETURN;
    END IF;
    IF NOT v_settle OR v_res.settled THEN
        outcome := 'dup';
        RETURN NEXT;
        RETURN;
    END IF;

    -- END-OF-MESSAGE of a message reserved at DATA: only its bytes remain,
    -- counted in the day it was reserved in
    IF v_res.day_start <> v_day THEN
        INSERT INTO rate_counters (org_id, kind, window_start)
             VALUES (p_org, 'bytes', v_res.day_start) ON CONFLICT DO NOTHING;
        SELECT c.used INTO v_bytes FROM rate_counters c
         WHERE c.org_id = p_org AND c.kind = 'bytes' AND c.window_start = v_res.day_start;
    END IF;
    IF p_lim_bytes IS NOT NULL AND v_bytes + p_size > p_lim_bytes THEN
        -- the message is refused: its reservation goes back
        DELETE FROM rate_reservations r WHERE r.org_id = p_org AND r.instance = p_instance;
        UPDATE rate_counters c SET used = greatest(c.used - 1, 0)
         WHERE c.org_id = p_org AND c.kind = 'messages' AND c.window_start = v_res.hour_start;
        UPDATE rate_counters c SET used = greatest(c.used - v_res.recipients, 0)
         WHERE c.org_id = p_org AND c.kind = 'recipients' AND c.window_start = v_res.day_start;
        outcome := 'over'; kind := 'bytes'; used := v_bytes; lim := p_lim_bytes;
        RETURN NEXT;
        RETURN;
    END IF;
    UPDATE rate_counters c SET used = c.used + p_size
     WHERE c.org_id = p_org AND c.kind = 'bytes' AND c.window_start = v_res.day_start;
    UPDATE rate_reservations r SET settled = true, bytes = p_size, expires_at = v_now + p_ttl
     WHERE r.org_id = p_org AND r.instance = p_instance;
    outcome := 'ok';
    RETURN NEXT;
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
