#!/bin/bash
# outcome_variants.sh - T (capture + outcome tracking) under different
# postkeep-storage batch writers and Postfix LMTP concurrency, alternated.
#
# Needs a bench stack left up by `BENCH_KEEP_STACK=1 BENCH_CONFIGS=T make bench`
# (Postfix relaying to smtp-sink on 12045, the command filter on).  Each
# argument is WRITERS,LMTP_CONCURRENCY; each rep runs every variant once:
#   bench/outcome_variants.sh 1,20 4,20 1,64
# For each run: 2500 x 5 KB from smtp-source -s 20 (closed loop, as make bench),
# throughput until every outcome row is recorded, and the p50/p99 seconds from
# acceptance to the outcome row.  Leaves storage.batch_writers unset and the
# bundle's LMTP concurrency (64) back in place.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DIR="$REPO/.stack-bench"
# shellcheck disable=SC1091
. "$DIR/env"
export PATH="$PATH:/usr/sbin"
P="$POSTKEEP_POSTFIX_CONFIG_DIR"
CFG="$POSTKEEP_CONFIG"
REPS="${REPS:-3}"
N="${N:-2500}"

variant() {  # WRITERS CONCURRENCY
    sed -i '/^batch_writers/d' "$CFG"
    [ "$1" = default ] || sed -i "/^\[storage\]/a batch_writers = $1" "$CFG"
    postconf -c "$P" -e "lmtp_destination_concurrency_limit = $2"
    postfix -c "$P" reload >/dev/null 2>&1
    "$REPO/devstack/stack.sh" stop "$DIR" storage >/dev/null
    "$REPO/devstack/stack.sh" start "$DIR" storage >/dev/null
    sleep 2
}
trap 'variant default 64' EXIT

outcomes() {
    psql -Atc "SELECT count(*) FROM message_recipients r JOIN messages m ON m.id = r.message_id
               AND m.metadata_expires_at = r.metadata_expires_at
               WHERE m.created_at >= to_timestamp($1) AND m.envelope_from = 'sender@capture.example'
               AND r.status <> 'queued'"
}

Q="$(postconf -c "$P" -h queue_directory)"
for rep in $(seq 1 "$REPS"); do
    for v in "$@"; do
        variant "${v%,*}" "${v#*,}"
        since="$(date +%s.%N)"
        smtp-source -s 20 -m "$N" -l 5120 -f sender@capture.example -t rcpt@sink.example \
            "$POSTKEEP_SMTP_HOST:$POSTKEEP_SMTP_PORT"
        while [ "$(outcomes "$since")" -lt "$N" ]; do sleep 0.1; done
        done_at="$(date +%s.%N)"
        lag="$(psql -Atc "SELECT round(percentile_cont(0.5) WITHIN GROUP (ORDER BY lag)::numeric, 2),
                 round(percentile_cont(0.99) WITHIN GROUP (ORDER BY lag)::numeric, 2) FROM (
                 SELECT extract(epoch FROM min(e.recorded_at) - m.accepted_at) AS lag
                 FROM recipient_events e JOIN messages m ON m.id = e.message_id
                 AND m.metadata_expires_at = e.metadata_expires_at
                 WHERE m.created_at >= to_timestamp($since)
                 AND m.envelope_from = 'sender@capture.example'
                 GROUP BY e.message_id, e.recipient, m.accepted_at) x")"
        printf 'rep %s writers,lmtp=%s: %s msg/s, accepted->row p50|p99 %s s\n' "$rep" "$v" \
            "$(echo "scale=1; $N / ($done_at - $since)" | bc)" "$lag"
        while [ "$(find "$Q/incoming" "$Q/active" -type f | wc -l)" -gt 0 ]; do sleep 0.2; done
    done
done
