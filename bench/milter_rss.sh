#!/bin/bash
# milter_rss.sh - postkeep-milter's RSS while 10 KB and 9.5 MB messages go through.
#
#   bench/milter_rss.sh [STACK_DIR]      (default: .stack, the `make run` stack)
#
# Against a running stack: creates a new organisation `rss-<random>` (its own
# domain and an active RSA key, so messages are captured AND signed; new, so
# no zstd dictionary has been trained for it yet), writes a 10 KB and a 9.5 MB message (base64 of random
# bytes: incompressible, and one large MIME leaf, so the part splitter runs
# too), and sends them with smtp-source while sampling the milter's VmRSS every
# 20 ms: 50 x 10 KB twice (the steady state), 3 x 9.5 MB twice, 20 x 10 KB,
# then 10 x 9.5 MB over 5 sessions.  Prints, per step, the RSS before, the
# peak and the RSS one second after.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DIR="${1:-$REPO/.stack}"
[ -f "$DIR/env" ] || { echo "milter_rss: no stack in $DIR (make run, or pass a stack dir)" >&2; exit 2; }
set -a; . "$DIR/env"; set +a
PK="$REPO/.venv/bin/postkeep"
PID=$(cat "$DIR/milter/milter.pid")
WORK=$(mktemp -d /tmp/milter-rss.XXXXXX)
trap 'rm -rf "$WORK"' EXIT

TAG=$(head -c4 /dev/urandom | od -An -tx1 | tr -d ' \n')
DOMAIN="rss-$TAG.bench.example"
(cd /tmp && "$PK" org add "rss-$TAG" --tier enterprise >/dev/null &&
    "$PK" domain add "rss-$TAG" "$DOMAIN" >/dev/null &&
    "$PK" dkim keygen "$DOMAIN" --selector rss --active-from now >/dev/null 2>&1)
sleep 6  # the milter's key refresh
"$REPO/.venv/bin/python" - "$WORK" "$DOMAIN" <<'PY'
import base64, os, sys
head = (b"From: app@" + sys.argv[2].encode() + b"\r\nTo: r@sink.test\r\nSubject: rss\r\nMIME-Version: 1.0\r\n"
        b"Content-Type: application/octet-stream\r\nContent-Transfer-Encoding: base64\r\n\r\n")
for name, n in (("10k.eml", 7_000), ("10m.eml", 7_000_000)):
    body = base64.encodebytes(os.urandom(n)).replace(b"\n", b"\r\n")
    open(os.path.join(sys.argv[1], name), "wb").write(head + body)
PY
rss() { awk '/VmRSS/{print $2}' "/proc/$PID/status"; }
step() {  # FILE COUNT SESSIONS
    local base peak r sp
    base=$(rss); peak=$base
    smtp-source -s "$3" -m "$2" -F "$WORK/$1" -f "app@$DOMAIN" -t r@sink.test \
        "$POSTKEEP_SMTP_HOST:$POSTKEEP_SMTP_PORT" &
    sp=$!
    while kill -0 "$sp" 2>/dev/null; do
        r=$(rss); [ "$r" -gt "$peak" ] && peak=$r; sleep 0.02
    done
    wait "$sp"
    sleep 1
    printf '| %s x %s | %s | %d | %d | %d |\n' "$2" "$1" "$3" $((base / 1024)) $((peak / 1024)) \
        $(($(rss) / 1024))
}
echo "| messages | sessions | RSS before MiB | peak MiB | 1 s after MiB |"
echo "|---|---:|---:|---:|---:|"
step 10k.eml 50 1; step 10k.eml 50 1; step 10m.eml 3 1; step 10m.eml 3 1
step 10k.eml 20 1; step 10m.eml 10 5
