-- 0013: the RCPT check no longer counts reservations that have expired.
--
-- rate_consume()'s 'check' stage (RCPT) read the counters as they were, but
-- units of a message that reserved at DATA and never completed go back to
-- them only when the next DATA or END-OF-MESSAGE of the organisation sweeps
-- the expired reservations.  Once such reservations held the rest of a limit,
-- every RCPT was deferred and no DATA came to sweep them: the organisation
-- stayed deferred until the window ended (for recipients, the rest of the
-- day), not for policyd.reservation_seconds.  The check now subtracts what
-- expired, unsettled reservations of the current windows hold (read only,
-- through the (org_id, expires_at) index).  Found by holding the in-memory
-- counters to rate_consume() (tests/test_policyd_lease_windows.py), which
-- expire before they check.  Same signature; the rest of the body is 0009's
-- (a PL/pgSQL function is only ever replaced whole).

CREATE OR REPLACE FUNCTION rate_consume(
    p_stage text, p_org uuid, p_instance text, p_now timestamptz,
    p_recipients integer, p_size bigint,
    p_lim_messages bigint, p_lim_recipients bigint, p_lim_bytes bigint,
    p_ttl interval,
    p_hour interval DEFAULT '1 hour', p_day interval DEFAULT '1 day'
) RETURNS TABLE (outcome text, kind text, used bigint, lim bigint)
LANGUAGE plpgsql
SET enable_seqscan = off  -- as 0010 set it: CREATE OR REPLACE resets it
AS $$
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
        -- Less what expired reservations of messages that never completed
        -- still hold: the next DATA gives it back (below), and this check
        -- must not refuse what that DATA would admit.
        SELECT greatest(v_msgs - count(*) FILTER (WHERE r.hour_start = v_hour), 0),
               greatest(v_rcpts - coalesce(sum(r.recipients) FILTER (WHERE r.day_start = v_day),
                                           0), 0)
          INTO v_msgs, v_rcpts
          FROM rate_reservations r
         WHERE r.org_id = p_org AND r.expires_at <= v_now AND NOT r.settled;
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
