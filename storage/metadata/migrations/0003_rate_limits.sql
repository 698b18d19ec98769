-- 0003: rate-limit counters and reservations for postkeep-policyd.
--
-- Counters are fixed windows: one row per (organisation, kind, window start),
-- messages per UTC hour, recipients and bytes per UTC day.  A message is
-- reserved once, at DATA (or at END-OF-MESSAGE if DATA never asked), keyed by
-- Postfix's `instance` attribute; END-OF-MESSAGE settles its bytes.  A
-- reservation never settled gives its counts back when it expires.
-- rate_consume() does all of it in one call, so a decision is one round trip;
-- see storage/limits.py for why it is exact.

ALTER TABLE tiers ADD COLUMN rate_shadow boolean NOT NULL DEFAULT false;
ALTER TABLE organisations ADD COLUMN rate_shadow boolean;   -- NULL: the tier's

CREATE TABLE rate_counters (
    org_id        uuid NOT NULL,
    kind          text NOT NULL CHECK (kind IN ('messages', 'recipients', 'bytes')),
    window_start  timestamptz NOT NULL,
    used          bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (org_id, kind, window_start)
);

CREATE TABLE rate_reservations (
    org_id        uuid NOT NULL,
    instance      text NOT NULL,
    hour_start    timestamptz NOT NULL,
    day_start     timestamptz NOT NULL,
    recipients    integer NOT NULL,
    bytes         bigint NOT NULL DEFAULT 0,
    settled       boolean NOT NULL DEFAULT false,
    expires_at    timestamptz NOT NULL,
    PRIMARY KEY (org_id, instance)
);
CREATE INDEX rate_reservations_expiry_idx ON rate_reservations (org_id, expires_at);

ALTER TABLE rate_counters ENABLE ROW LEVEL SECURITY;
ALTER TABLE rate_reservations ENABLE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON rate_counters
    USING (org_id = nullif(current_setting('postkeep.org_id', true), '')::uuid);
CREATE POLICY tenant_isolation ON rate_reservations
    USING (org_id = nullif(current_setting('postkeep.org_id', true), '')::uuid);

-- rate_consume(stage, org, instance, now, recipients, size, limits, ttl):
--   stage 'check'   (RCPT) reads only: is there room for one more message?
--   stage 'reserve' (DATA) counts 1 message and `recipients` recipients, and
--                   checks `size` (the client's SIZE=, 0 if none) against bytes
--   stage 'settle'  (END-OF-MESSAGE) adds `size` bytes to the reservation, or
--                   reserves everything at once if there is none
-- Returns (outcome, kind, used, lim): outcome 'ok', 'dup' (already counted),
-- or 'over' with the kind exceeded, its use before this message and limit.
-- A NULL limit is unlimited.  p_now NULL: the database clock (one clock for
-- every host).
CREATE FUNCTION rate_consume(
    p_stage text, p_org uuid, p_instance text, p_now timestamptz,
    p_recipients integer, p_size bigint,
    p_lim_messages bigint, p_lim_recipients bigint, p_lim_bytes bigint,
    p_ttl interval
) RETURNS TABLE (outcome text, kind text, used bigint, lim bigint)
LANGUAGE plpgsql AS $$
DECLARE
    v_now   timestamptz := coalesce(p_now, now());
    v_hour  timestamptz := date_trunc('hour', v_now AT TIME ZONE 'UTC') AT TIME ZONE 'UTC';
    v_day   timestamptz := date_trunc('day', v_now AT TIME ZONE 'UTC') AT TIME ZONE 'UTC';
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
