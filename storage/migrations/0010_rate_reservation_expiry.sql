-- 0010: rate_consume() gives back expired reservations without a scan of
-- the whole table.
--
-- The reservations table churns (a row per message, deleted once its time to
-- live is over), so its statistics always lag: the planner estimated that
-- nearly every row of the organisation had expired and deleted them with a
-- sequential scan, on every decision.  On a stack that had taken 200,000
-- messages in a quarter of an hour that scan was 8-11 ms of PostgreSQL CPU per
-- decision, three decisions a message.  The expired rows are now picked
-- oldest first through the (org_id, expires_at) index and deleted by row
-- address, 500 at a time until none is left.  Decisions are unchanged: every expired reservation is still
-- given back by the call that finds it.

CREATE OR REPLACE FUNCTION rate_consume(
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
    v_gone   integer;
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
    -- Every expired one, oldest first through the (org_id, expires_at) index
    -- in chunks of 500, deleted by row address (a TID scan): no plan here
    -- depends on how stale the statistics are.  The counter rows locked above
    -- keep this organisation's other writers out meanwhile.
    LOOP
        v_gone := 0;
        FOR v_old IN DELETE FROM rate_reservations r
                      WHERE r.ctid = ANY (ARRAY(
                            SELECT x.ctid FROM rate_reservations x
                             WHERE x.org_id = p_org AND x.expires_at <= v_now
                             ORDER BY x.expires_at LIMIT 500))
                      RETURNING r.* LOOP
            v_gone := v_gone + 1;
            IF NOT v_old.settled THEN
                UPDATE rate_counters c SET used = greatest(c.used - 1, 0)
                 WHERE c.org_id = p_org AND c.kind = 'messages'
                   AND c.window_start = v_old.hour_start;
                UPDATE rate_counters c SET used = greatest(c.used - v_old.recipients, 0)
                 WHERE c.org_id = p_org AND c.kind = 'recipients'
                   AND c.window_start = v_old.day_start;
                IF v_old.hour_start = v_hour THEN
                    v_msgs := greatest(v_msgs - 1, 0);
                END IF;
                IF v_old.day_start = v_day THEN
                    v_rcpts := greatest(v_rcpts - v_old.recipients, 0);
                END IF;
            END IF;
        END LOOP;
        EXIT WHEN v_gone < 500;
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
