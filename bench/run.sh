#!/bin/bash
# run.sh - the capture benchmark behind `make bench`.
#
# Brings up a private stack in $REPO/.stack-bench (port base 12025, never the
# dev or test stacks), adds an OpenDKIM signer and an smtp-sink relay target,
# then lets bench/capture_bench.py alternate the configurations run by run:
#   A  bare Postfix (no milter)
#   B  Postfix + OpenDKIM signing (RSA-2048, relaxed/relaxed), the usual peer
#   C  Postfix + postkeep-milter capturing and signing (zstd, MinIO, rows, DKIM)
#   D  Postfix + a do-nothing pymilter (the floor of any Python milter)
#   E  Postfix + postkeep-milter capturing only (a domain without a DKIM key)
#   T  E with outcome tracking: the bundle's NOTIFY command filter on, so every
#      message's success DSN goes back to postkeep-storage (only T and U have it on)
#   U  T with the notices discarded by Postfix (transport discard:): what the
#      notices cost Postfix itself, apart from LMTP, postkeep-storage and PostgreSQL
#   J  C with [milter] accept_after = "journal": a second postkeep-milter on its
#      own port answers once the message is fsync'd in the spool; the stack's
#      postkeep-storage drains it into packs (the run ends when the spool is empty)
#   K  E through that journaling milter (capture only)
# and measure throughput end to end, milter CPU, end-of-message latency and
# peak RSS.  bench/profile_capture.py then times the capture path's parts
# (compress, S3 PUT, PostgreSQL insert) in-process.  The stack is torn down on
# exit, whatever happens.
#
# Environment knobs (defaults give a ~10-minute run on 2 cores):
#   BENCH_REPS=5  BENCH_N_SMALL=2500  BENCH_N_LARGE=1500  BENCH_SKIP_RSS=0
#   BENCH_SKIP_PROFILE=0  BENCH_PROFILE_CONFIG=C (or J)
#   BENCH_REUSE_CONNECTIONS=0 (1: smtp-source -d, one connection per session, not per message)
#   BENCH_PERF=0 (1: perf record one 5 KB run of each of BENCH_PERF_CONFIGS=BJ: the
#   filters' CPU by shared object, kernel and Python interpreter included)
#   BENCH_KEEP_STACK=0 (leave the stack up to poke at it)
#   BENCH_SKIP_WEBHOOKS=0 BENCH_WEBHOOKS_ARGS= (bench/webhook_lag.py, ~5 minutes)
#   BENCH_LAG_LOADS=0.5,0.8,0.9 (T's open-loop lag passes, as fractions of T's
#   5 KB median throughput; empty: none)  BENCH_LAG_SECONDS=30
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
STACK="$REPO/devstack/stack.sh"
DIR="$REPO/.stack-bench"
PORTBASE=12025
# Past the stack's own PORTBASE..PORTBASE+12.
SINK_PORT=$((PORTBASE + 20))
DKIM_PORT=$((PORTBASE + 21))
NULL_MILTER_PORT=$((PORTBASE + 22))
JOURNAL_MILTER_PORT=$((PORTBASE + 23))
JOURNAL_METRICS_PORT=$((PORTBASE + 24))
RESULTS="$REPO/bench/results"
STAMP="$(date -u +%Y%m%dT%H%M%SZ)"
OUT="$RESULTS/$STAMP.md"

log() { printf 'bench: %s\n' "$*" >&2; }
die() { printf 'bench: ERROR: %s\n' "$*" >&2; exit 1; }

BENCH_PIDS=()
cleanup() {
    local rc=$? pid
    for pid in "${BENCH_PIDS[@]}"; do
        kill "$pid" 2>/dev/null || true
    done
    if [ "${BENCH_KEEP_STACK:-0}" = 1 ]; then
        log "BENCH_KEEP_STACK=1: stack left running in $DIR (stop: devstack/stack.sh down $DIR)"
    else
        "$STACK" down "$DIR" >/dev/null 2>&1 || log "stack down failed for $DIR"
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

for tool in smtp-source smtp-sink opendkim opendkim-genkey; do
    command -v "$tool" >/dev/null || [ -x "/usr/sbin/$tool" ] || die "$tool missing (stack.sh install)"
done
export PATH="$PATH:/usr/sbin"

# ---------------------------------------------------------------- stack
log "bringing up the bench stack in $DIR (port base $PORTBASE)"
"$STACK" up "$DIR" "$PORTBASE"
# shellcheck disable=SC1091
. "$DIR/env"
PY="$POSTKEEP_STACK_VENV/bin/python"
postkeep() { (cd / && "$POSTKEEP_STACK_VENV/bin/postkeep" --config "$POSTKEEP_CONFIG" "$@"); }

# The sender domain must belong to an organisation, or C refuses the mail.
if ! postkeep org list 2>/dev/null | grep -qw bench; then
    postkeep org add bench --tier enterprise >/dev/null || die "postkeep org add bench failed"
fi
postkeep domain add bench bench.example >/dev/null 2>&1 \
    || postkeep org list | grep -qw bench || die "postkeep domain add bench bench.example failed"

# C must sign like B does: an active RSA-2048 key for bench.example (if the
# milter's CLI has DKIM keys yet; without one C captures but does not sign).
if postkeep dkim --help >/dev/null 2>&1; then
    if ! postkeep dkim list 2>/dev/null | grep -q 'bench.example'; then
        postkeep dkim keygen bench.example --selector bench --algorithm rsa --active-from now \
            >/dev/null || die "postkeep dkim keygen bench.example failed"
    fi
fi

# E captures without signing: capture.example belongs to another organisation
# that has no DKIM key and sends unsigned (the spine's "capture alone" figure).
if ! postkeep org list 2>/dev/null | grep -qw bench-capture; then
    postkeep org add bench-capture --tier enterprise >/dev/null \
        || die "postkeep org add bench-capture failed"
    postkeep domain add bench-capture capture.example >/dev/null \
        || die "postkeep domain add bench-capture capture.example failed"
fi
postkeep dkim missing-key bench-capture unsigned >/dev/null \
    || die "postkeep dkim missing-key bench-capture unsigned failed"

# ---------------------------------------------------------------- opendkim
DKIM="$DIR/opendkim"
mkdir -p "$DKIM"
if [ ! -f "$DKIM/bench.private" ]; then
    opendkim-genkey -b 2048 -d bench.example -s bench -D "$DKIM" \
        || die "opendkim-genkey failed"
fi
chown -R opendkim:opendkim "$DKIM"
chmod 700 "$DKIM"
chmod 600 "$DKIM/bench.private"
cat >"$DKIM/opendkim.conf" <<EOF
# OpenDKIM for the postkeep benchmark: sign bench.example like an admin would.
Mode                    s
Canonicalization        relaxed/relaxed
SignatureAlgorithm      rsa-sha256
Domain                  bench.example
Selector                bench
KeyFile                 $DKIM/bench.private
Socket                  inet:$DKIM_PORT@127.0.0.1
InternalHosts           127.0.0.1
UserID                  opendkim:opendkim
Background              no
Syslog                  no
RequireSafeKeys         no
EOF
opendkim -f -x "$DKIM/opendkim.conf" >"$DKIM/opendkim.log" 2>&1 &
DKIM_PID=$!
BENCH_PIDS+=("$DKIM_PID")

# ---------------------------------------------------------------- relay sink
# smtp-sink -c prints a running "mesg=N" counter: the driver reads it to know
# when every message has been delivered.
SINK_OUT="$DIR/smtp-sink.out"
: >"$SINK_OUT"
smtp-sink -c -u postfix "127.0.0.1:$SINK_PORT" 1000 >"$SINK_OUT" 2>&1 &
BENCH_PIDS+=($!)

# A do-nothing pymilter (same callbacks, no work): the floor for any Python milter.
"$PY" "$REPO/bench/null_milter.py" "inet:$NULL_MILTER_PORT@127.0.0.1" "$DIR/null-milter.pid" \
    >"$DIR/null-milter.log" 2>&1 &
BENCH_PIDS+=($!)

# J and K: the stack's postkeep-milter configuration with accept_after =
# "journal", on ports of its own; same spool, drained by the stack's sidecar.
JOURNAL_CONFIG="$DIR/journal.toml"
sed -e "/^\[milter\]\$/,/^\[/ s|^listen = .*|listen = \"inet:$JOURNAL_MILTER_PORT@127.0.0.1\"|" \
    -e "/^\[milter\]\$/,/^\[/ s|^metrics_listen = .*|metrics_listen = \"127.0.0.1:$JOURNAL_METRICS_PORT\"|" \
    -e 's|^\[milter\]$|[milter]\naccept_after = "journal"|' "$POSTKEEP_CONFIG" >"$JOURNAL_CONFIG"
chmod 600 "$JOURNAL_CONFIG"
grep -q "inet:$JOURNAL_MILTER_PORT@" "$JOURNAL_CONFIG" && grep -q '^accept_after = "journal"' "$JOURNAL_CONFIG" \
    || die "could not derive $JOURNAL_CONFIG from $POSTKEEP_CONFIG"
(cd / && exec setsid "$POSTKEEP_STACK_VENV/bin/postkeep-milter" --config "$JOURNAL_CONFIG") \
    >"$DIR/journal-milter.log" 2>&1 </dev/null &
JOURNAL_PID=$!
BENCH_PIDS+=("$JOURNAL_PID")
echo "$JOURNAL_PID" >"$DIR/journal-milter.pid"

for port in "$SINK_PORT" "$DKIM_PORT" "$NULL_MILTER_PORT" "$JOURNAL_MILTER_PORT"; do
    for _ in $(seq 100); do
        (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break
        sleep 0.1
    done
    (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null || die "nothing listens on 127.0.0.1:$port"
done

postconf -c "$POSTKEEP_POSTFIX_CONFIG_DIR" -e "relayhost = [127.0.0.1]:$SINK_PORT" \
    || die "postconf relayhost failed"
postfix -c "$POSTKEEP_POSTFIX_CONFIG_DIR" reload >/dev/null 2>&1 || die "postfix reload failed"
# Leftovers of an interrupted run would sit deferred and stall every drain.
postsuper -c "$POSTKEEP_POSTFIX_CONFIG_DIR" -d ALL 2>/dev/null || true

# py-spy (PyPI) samples the running milter; kept in its own venv, not the project's.
PYSPY=/var/cache/postkeep/bench-tools/bin/py-spy
if [ "${BENCH_SKIP_PROFILE:-0}" != 1 ] && [ ! -x "$PYSPY" ]; then
    log "installing py-spy into /var/cache/postkeep/bench-tools (profile only)"
    { python3 -m venv /var/cache/postkeep/bench-tools \
        && /var/cache/postkeep/bench-tools/bin/pip install -q py-spy; } >&2 \
        || log "py-spy not installable: the profile falls back to bench/profile_capture.py only"
fi
[ -x "$PYSPY" ] && [ "${BENCH_SKIP_PROFILE:-0}" != 1 ] || PYSPY=""

# The venv is shared by every clone (stack.sh re-points its editable install):
# record which tree the milter actually runs.
CODE="$(cd / && "$PY" -c 'import os, postkeep.milter as m; print(os.path.dirname(os.path.dirname(os.path.realpath(m.__file__))))')"
REV="$(git -C "$CODE" rev-parse --short HEAD 2>/dev/null || echo '?')"
DIRTY="$(git -C "$CODE" status --porcelain -- milter storage postkeep 2>/dev/null | wc -l)"

# ---------------------------------------------------------------- measure
mkdir -p "$RESULTS"
log "running; results go to $OUT"
(cd / && "$PY" "$REPO/bench/capture_bench.py" \
    --env "$DIR/env" --out "$OUT" \
    --sink-out "$SINK_OUT" --sink-port "$SINK_PORT" \
    --milter-pidfile "$DIR/milter/milter.pid" \
    --dkim-milter "inet:127.0.0.1:$DKIM_PORT" \
    --dkim-pid "$DKIM_PID" \
    --null-milter "inet:127.0.0.1:$NULL_MILTER_PORT" --null-milter-pidfile "$DIR/null-milter.pid" \
    --journal-milter "inet:127.0.0.1:$JOURNAL_MILTER_PORT" --journal-milter-pidfile "$DIR/journal-milter.pid" \
    --journal-metrics "http://127.0.0.1:$JOURNAL_METRICS_PORT/metrics" \
    --configs "${BENCH_CONFIGS:-ABCDETUJK}" --reps "${BENCH_REPS:-5}" --n-small "${BENCH_N_SMALL:-2500}" \
    --n-large "${BENCH_N_LARGE:-1500}" --py-spy "$PYSPY" --profile-config "${BENCH_PROFILE_CONFIG:-C}" \
    --perf "$([ "${BENCH_PERF:-0}" = 1 ] && command -v perf)" --perf-configs "${BENCH_PERF_CONFIGS:-BJ}" \
    --lag-loads "${BENCH_LAG_LOADS-0.5,0.8,0.9}" --lag-seconds "${BENCH_LAG_SECONDS:-30}" \
    --code "$CODE at $REV ($DIRTY uncommitted files under milter/ storage/ postkeep/)" \
    $([ "${BENCH_SKIP_RSS:-0}" = 1 ] && echo --skip-rss) \
    $([ "${BENCH_REUSE_CONNECTIONS:-0}" = 1 ] && echo --reuse-connections))

# Webhook events (issue 18): the outcome path's reports/s with and without a
# webhook endpoint, then the DSN-to-2xx lag at 80 % of it (bench/webhook_lag.py,
# bounded by --max-seconds).  BENCH_SKIP_WEBHOOKS=1 leaves it out;
# BENCH_WEBHOOKS_ARGS='--n 500 --reps 2' runs it shorter.
if [ "${BENCH_SKIP_WEBHOOKS:-0}" != 1 ]; then
    log "webhook events: cost and lag (bench/webhook_lag.py)"
    # shellcheck disable=SC2086
    (set -a && . "$DIR/env" && set +a && cd / && \
        timeout 1200 "$PY" "$REPO/bench/webhook_lag.py" ${BENCH_WEBHOOKS_ARGS:-}) >>"$OUT" \
        || log "bench/webhook_lag.py failed (see above); the other results are still in $OUT"
fi

if [ "${BENCH_SKIP_PROFILE:-0}" != 1 ]; then
    log "profiling the capture path in-process (bench/profile_capture.py)"
    # Follows the milter's internals, which move fast: a failure here must not
    # throw away the measurements above.
    (cd / && "$PY" "$REPO/bench/profile_capture.py" --config "$POSTKEEP_CONFIG") >>"$OUT" \
        || log "bench/profile_capture.py failed (see above); throughput results are still in $OUT"
fi

cat "$OUT"
log "results written to $OUT"
