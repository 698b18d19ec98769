#!/bin/bash
# stack.sh - install and run postkeep's local stack on loopback.
#
# Usage:
#   stack.sh install                 packages, MinIO (built from source), venv
#   stack.sh up DIR PORTBASE         start everything under DIR (absolute path)
#   stack.sh down DIR                stop everything started under DIR
#   stack.sh stop DIR SERVICE        stop one service  (postgres|minio|milter|policyd|storage|postfix|sink)
#   stack.sh start DIR SERVICE       start it again with the same data, ports and keys
#   stack.sh status DIR              one line per service
#
# S3_SERVER=versitygw stack.sh up DIR PORTBASE runs versitygw (posix backend,
# bucket versioning and Object Lock available) instead of MinIO on the same
# port; the choice is kept in DIR/s3server, and the service keeps the name
# `minio` (stop/start DIR minio act on whichever S3 server the stack runs).
#
# Daemons are started with fd 9 closed: `make test` holds its lock there.
# Ports (all on 127.0.0.1): PORTBASE smtpd, +1 sink, +2 PostgreSQL, +3 MinIO S3,
# +4 MinIO console, +5 milter, +6 milter metrics, +7 policyd, +8 policyd metrics,
# +9 postkeep-storage LMTP, +10 its metrics, +11 left free for a test's fake remote MX
# (mail to mx.test is routed there), +12 a Postfix listener without milter or
# policy for postkeep-storage's forwarded failure notices.
# `up` records PORTBASE in DIR so
# that `start`/`stop` reuse it.  DIR/env is a shell file with everything tests need.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CACHE=/var/cache/postkeep
# MinIO's community edition is source-only (archived 2026): pin the last source.
MINIO_VERSION=v0.0.0-20260212201848-7aac2a2c5b7c
MINIO_DIR="$CACHE/minio-$(echo "$MINIO_VERSION" | cut -d- -f2 | cut -c1-8)"
MINIO_BIN="$MINIO_DIR/minio"
# versitygw (issue 19): a maintained S3 server, built from its public module.
VERSITYGW_VERSION=v1.8.0
VERSITYGW_DIR="$CACHE/versitygw-$VERSITYGW_VERSION"
VERSITYGW_BIN="$VERSITYGW_DIR/versitygw"
PG_BIN=/usr/lib/postgresql/15/bin
APT_PACKAGES=(openssl postfix postfix-pcre postgresql-15 libmilter-dev build-essential python3-dev
              opendkim opendkim-tools postfwd)
# make deb (Debian's python3 with venv) and tests/test_package.py (systemd-analyze), and the daemon tests
# (systemd-analyze security --offline=true; systemd need not be PID 1).
APT_PACKAGES+=(python3-venv systemd)
# Log retention and unit tests (issue 16): a private rsyslogd and logrotate
# run the shipped fragments; systemd-analyze verifies the units (not PID 1).
APT_PACKAGES+=(rsyslog logrotate)
SERVICES=(postgres minio sink milter policyd storage postfix)

log() { printf 'stack: %s\n' "$*" >&2; }
die() { printf 'stack: ERROR: %s\n' "$*" >&2; exit 1; }
warn() { printf 'stack: WARNING: %s\n' "$*" >&2; }
# die_log LOG MESSAGE: die, after the last lines of LOG (a daemon that did not
# start says why there; the caller's output, CI's included, then shows it).
die_log() {
    if [ -s "$1" ]; then
        printf 'stack: the last lines of %s:\n' "$1" >&2
        tail -n 20 "$1" | sed 's/^/    /' >&2
    fi
    die "$2"
}

venv_dir() {
    # Keyed by the dependencies AND the clone: the project is installed
    # editable, so two clones sharing a venv would run each other's code.
    # Dependencies come from pip's wheel cache, so a new clone's venv is quick.
    local h
    h="$( (cat "$REPO/pyproject.toml"; echo "$REPO") | sha256sum | cut -c1-12)"
    echo "$CACHE/venv-$h"
}

# ---------------------------------------------------------------- install
install_apt() {
    local missing=() p
    for p in "${APT_PACKAGES[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' \
            || missing+=("$p")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    log "installing Debian packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q || die "apt-get update failed"
    apt-get install -y -q --no-install-recommends "${missing[@]}" \
        || die "apt-get install ${missing[*]} failed"
}

install_minio() {
    [ -x "$MINIO_BIN" ] && return 0
    command -v go >/dev/null || [ -x /usr/local/go/bin/go ] || die "go is needed to build MinIO"
    local go; go="$(command -v go || echo /usr/local/go/bin/go)"
    log "building MinIO $MINIO_VERSION from source into $MINIO_DIR (a few minutes)"
    mkdir -p "$MINIO_DIR" "$CACHE/gopath"
    GOBIN="$MINIO_DIR" GOPATH="$CACHE/gopath" GOFLAGS=-modcacherw \
        "$go" install "github.com/minio/minio@$MINIO_VERSION" \
        || die "building MinIO failed"
    [ -x "$MINIO_BIN" ] || die "MinIO build produced no $MINIO_BIN"
}

# versitygw: `go install` of the pinned module (about a minute, once), cached
# outside the clone by version like MinIO.
install_versitygw() {
    [ -x "$VERSITYGW_BIN" ] && return 0
    command -v go >/dev/null || [ -x /usr/local/go/bin/go ] || die "go is needed to build versitygw"
    local go; go="$(command -v go || echo /usr/local/go/bin/go)"
    log "building versitygw $VERSITYGW_VERSION into $VERSITYGW_DIR (about a minute)"
    rm -rf "$VERSITYGW_DIR.tmp"
    mkdir -p "$VERSITYGW_DIR.tmp" "$CACHE/gopath"
    GOBIN="$VERSITYGW_DIR.tmp" GOPATH="$CACHE/gopath" GOFLAGS=-modcacherw \
        "$go" install "github.com/versity/versitygw/cmd/versitygw@$VERSITYGW_VERSION" \
        || die "building versitygw failed"
    [ -x "$VERSITYGW_DIR.tmp/versitygw" ] || die "versitygw build produced no binary"
    mkdir -p "$VERSITYGW_DIR"
    mv "$VERSITYGW_DIR.tmp/versitygw" "$VERSITYGW_BIN"
    rmdir "$VERSITYGW_DIR.tmp"
}

install_venv() {
    local venv; venv="$(venv_dir)"
    if [ ! -f "$venv/.postkeep-complete" ]; then
        log "creating venv $venv"
        rm -rf "$venv"
        python3 -m venv "$venv" || die "python3 -m venv $venv failed"
        "$venv/bin/pip" install -q --upgrade pip "setuptools>=68" wheel \
            || die "installing pip, setuptools and wheel into $venv failed"
        (cd "$REPO" && "$venv/bin/pip" install -q -e '.[dev]') \
            || die "pip install -e '.[dev]' failed in $venv"
        touch "$venv/.postkeep-complete"
    fi
    # Cheap, and points the editable install at this clone (a new clone path).
    if ! (cd "$REPO" && "$venv/bin/pip" install -q --no-deps --no-build-isolation -e .) \
            >"$venv/.editable.log" 2>&1; then
        cat "$venv/.editable.log" >&2
        die "pip install --no-deps -e . failed in $venv"
    fi
    ln -sfn "$venv" "$REPO/.venv"
    # pymilter's C extension must win over the repository's milter/ folder.
    local where
    where="$(cd / && "$venv/bin/python" -c 'import milter, Milter; print(milter.__file__)')" \
        || die "import milter, Milter fails in $venv"
    case "$where" in
        *.so) ;;
        *) die "'milter' resolves to $where, not pymilter's C extension" ;;
    esac
}

# promtool (tests/test_monitoring.py checks monitoring/ with it) ships in Debian's
# prometheus package, whose postinst would start a Prometheus server on :9090 and
# enable it at boot: a test machine wants the tool, not the server.  A
# policy-rc.d that refuses every start is in place during the install only (unless
# the machine has one already), and the unit is disabled where systemd runs.
install_promtool() {
    command -v promtool >/dev/null && return 0
    log "installing Debian's prometheus for promtool (the server is not started)"
    local policy=/usr/sbin/policy-rc.d own_policy=0
    if [ ! -e "$policy" ]; then
        printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod 0755 "$policy" && own_policy=1
    fi
    export DEBIAN_FRONTEND=noninteractive
    local rc=0
    apt-get install -y -q --no-install-recommends prometheus \
        || { apt-get update -q && apt-get install -y -q --no-install-recommends prometheus; } \
        || rc=$?
    [ "$own_policy" = 1 ] && rm -f "$policy"
    [ "$rc" = 0 ] || die "apt-get install prometheus failed"
    if [ -d /run/systemd/system ]; then
        systemctl disable --now prometheus.service >/dev/null 2>&1 || true
    fi
    command -v promtool >/dev/null || die "promtool missing after installing prometheus"
}

# ---- PostgreSQL that fails over (issue 20; devstack/pgha.sh): Debian's patroni
# and etcd.  etcd-server's postinst would start a system etcd on :2379 (and
# patroni's a service): as for prometheus, a policy-rc.d refuses every start
# during the install only; pgha.sh runs its own etcd and Patroni per stack.
PGHA_PACKAGES=(patroni etcd-server etcd-client)
install_pgha() {
    local missing=() p
    for p in "${PGHA_PACKAGES[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' \
            || missing+=("$p")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    log "installing Debian packages for pgha.sh: ${missing[*]} (their services are not started)"
    local policy=/usr/sbin/policy-rc.d own_policy=0
    if [ ! -e "$policy" ]; then
        printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod 0755 "$policy" && own_policy=1
    fi
    export DEBIAN_FRONTEND=noninteractive
    local rc=0
    apt-get install -y -q --no-install-recommends "${missing[@]}" \
        || { apt-get update -q && apt-get install -y -q --no-install-recommends "${missing[@]}"; } \
        || rc=$?
    [ "$own_policy" = 1 ] && rm -f "$policy"
    [ "$rc" = 0 ] || die "apt-get install ${missing[*]} failed"
    if [ -d /run/systemd/system ]; then
        systemctl disable --now etcd.service patroni.service haproxy.service >/dev/null 2>&1 || true
    fi
}

cmd_install() {
    install_apt
    install_promtool
    install_pgha
    install_minio
    install_versitygw
    install_venv
    log "install complete (venv $(venv_dir))"
}

# ---------------------------------------------------------------- helpers
load_state() {
    DIR="$1"
    case "$DIR" in /*) ;; *) die "DIR must be an absolute path, got '$DIR'" ;; esac
    if [ -z "${PORTBASE:-}" ]; then
        [ -f "$DIR/portbase" ] || die "$DIR/portbase missing: run 'stack.sh up $DIR PORTBASE' first"
        PORTBASE="$(cat "$DIR/portbase")"
    fi
    SMTP_PORT=$PORTBASE
    SINK_PORT=$((PORTBASE + 1))
    PG_PORT=$((PORTBASE + 2))
    S3_PORT=$((PORTBASE + 3))
    S3_CONSOLE_PORT=$((PORTBASE + 4))
    MILTER_PORT=$((PORTBASE + 5))
    METRICS_PORT=$((PORTBASE + 6))
    POLICYD_PORT=$((PORTBASE + 7))
    POLICYD_METRICS_PORT=$((PORTBASE + 8))
    STORAGE_PORT=$((PORTBASE + 9))
    STORAGE_METRICS_PORT=$((PORTBASE + 10))
    FAKE_MX_PORT=$((PORTBASE + 11))
    REINJECT_PORT=$((PORTBASE + 12))
    # The S3 server: what `up` chose (S3_SERVER, default minio), else DIR/s3server.
    if [ -n "${S3_SERVER_CHOSEN:-}" ]; then
        S3_SERVER="$S3_SERVER_CHOSEN"
    elif [ -f "$DIR/s3server" ]; then
        S3_SERVER="$(cat "$DIR/s3server")"
    else
        S3_SERVER=minio
    fi
    case "$S3_SERVER" in
        minio|versitygw) ;;
        *) die "S3_SERVER must be minio or versitygw, got '$S3_SERVER'" ;;
    esac
    VENV="$(venv_dir)"
    PY="$VENV/bin/python"
    PFDIR="$DIR/postfix/etc"
    # One log per stack directory; /var/log is in maillog_file_prefixes by default.
    PFLOG="/var/log/postkeep-$(echo -n "$DIR" | sha256sum | cut -c1-10).log"
}

# A process killed -9 stays a zombie where PID 1 does not reap (containers):
# kill -0 still succeeds for it, so a zombie counts as dead here.
proc_alive() {  # PID
    kill -0 "$1" 2>/dev/null || return 1
    local stat
    stat="$(cat "/proc/$1/stat" 2>/dev/null)" || return 0
    stat="${stat##*) }"
    [ "${stat:0:1}" != Z ]
}

pid_alive() { [ -f "$1" ] && proc_alive "$(cat "$1")"; }

# private_log FILE: FILE exists, mode 0600, before a daemon appends to it: the
# daemons' and the sink's logs name senders and recipients.  chmod too, for a
# log an older stack left readable (appended to, never recreated).  Only the
# log: the daemon keeps its own umask for what it creates.
private_log() {
    (umask 077 && : >>"$1")
    chmod 600 "$1"
}

smtp_banner() {  # PORT: print the server's first line, if any
    timeout 6 bash -c 'exec 3<>"/dev/tcp/127.0.0.1/$1" || exit 0
        read -r -t 5 line <&3 || true; printf "QUIT\r\n" >&3 || true; echo "$line"' _ "$1" \
        2>/dev/null || true
}

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

wait_port() {  # PORT SECONDS [PIDFILE]: until PORT accepts, SECONDS pass or PIDFILE's process dies
    local i
    for ((i = 0; i < $2 * 10; i++)); do
        port_open "$1" && return 0
        if [ -n "${3:-}" ] && ! pid_alive "$3"; then return 1; fi
        sleep 0.1
    done
    return 1
}

require_free() {  # PORT WHAT: die naming the port if something else listens there
    if port_open "$1"; then
        die "127.0.0.1:$1 ($2) is already in use by another process; pick another PORTBASE"
    fi
}

stop_pid() {  # PIDFILE NAME
    local pidfile="$1" pid i
    [ -f "$pidfile" ] || return 0
    pid="$(cat "$pidfile")"
    if proc_alive "$pid"; then
        kill -TERM "$pid" 2>/dev/null || true
        for ((i = 0; i < 100; i++)); do proc_alive "$pid" || break; sleep 0.1; done
        if proc_alive "$pid"; then
            warn "$2 (pid $pid) ignored SIGTERM for 10 s; sending SIGKILL"
            kill -KILL "$pid" 2>/dev/null || true
        fi
    fi
    rm -f "$pidfile"
}

# Every parent of DIR needs o+x so that postgres and postfix can reach their dirs.
open_parents() {
    local d="$1"
    while [ "$d" != "/" ]; do
        d="$(dirname "$d")"
        [ -d "$d" ] || continue
        if [ "$(( $(stat -c '%#a' "$d") & 1 ))" -eq 0 ]; then
            log "chmod o+x $d (postgres/postfix must traverse it)"
            chmod o+x "$d"
        fi
    done
}

# ---------------------------------------------------------------- secrets
# Every file holding a secret is 0600 (root) in a 0700 directory: DIR/env,
# DIR/postkeep.toml, DIR/minio/credentials, DIR/dkim/*, DIR/secrets/*.
# Secrets never go on a command line (other users see those in ps): they
# are written with printf, a shell builtin, to files or to psql's stdin.
secret_file() {  # FILE: made once, 48 hex digits from /dev/urandom
    [ -s "$1" ] && { chmod 600 "$1"; return 0; }
    (umask 077 && head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$1")
}

# PostgreSQL's passwords, made once per stack: postgres (the stack's own
# administration, in start_postgres) and postkeep (daemons, CLI, tests and
# psql: postkeep.toml's password_file, and DIR/secrets/pgpass, which DIR/env
# names as PGPASSFILE).
pg_secrets() {
    mkdir -p "$DIR/secrets"
    chmod 700 "$DIR/secrets"
    secret_file "$DIR/secrets/pg-postgres.password"
    secret_file "$DIR/secrets/pg-postkeep.password"
    PGPASS_FILE="$DIR/secrets/pgpass"
    (umask 077
     printf '*:%s:*:postgres:%s\n*:%s:*:postkeep:%s\n' \
         "$PG_PORT" "$(cat "$DIR/secrets/pg-postgres.password")" \
         "$PG_PORT" "$(cat "$DIR/secrets/pg-postkeep.password")" >"$PGPASS_FILE.tmp")
    mv "$PGPASS_FILE.tmp" "$PGPASS_FILE"
}

# Content and secrets of the stack's own (root) processes: no other user
# lists or reads them (stacks made before this get their modes fixed here).
# DIR itself, DIR/pg and DIR/postfix stay traversable for postgres and postfix.
close_dirs() {
    local d
    for d in "$DIR/minio" "$DIR/milter" "$DIR/sink" "$DIR/dkim" "$DIR/secrets"; do
        if [ -d "$d" ]; then chmod 700 "$d"; fi
    done
    for d in "$DIR/env" "$DIR/postkeep.toml" "$DIR/minio/credentials" "$DIR"/dkim/*; do
        if [ -f "$d" ]; then chmod 600 "$d"; fi
    done
}

# ---------------------------------------------------------------- postgres
# Authentication: a password (scram-sha-256) for every role, over TCP and
# over the socket; only the postgres OS user gets in without one, as the
# postgres role on the socket (peer).  Rewritten at every start, so a stack
# made before this (trust) is switched over at its next start.
write_pg_hba() {
    local hba="$DIR/pg/data/pg_hba.conf"
    cat >"$hba.tmp" <<EOF
# postkeep dev stack (written by devstack/stack.sh at every start).
local all postgres peer
local all all scram-sha-256
host  all all 127.0.0.1/32 scram-sha-256
host  all all ::1/128 scram-sha-256
EOF
    chown postgres:postgres "$hba.tmp"
    chmod 600 "$hba.tmp"
    mv "$hba.tmp" "$hba"
}

start_postgres() {
    if pg_external; then log "PostgreSQL is external (DIR/external-pg): not started"; return 0; fi
    local data="$DIR/pg/data" run="$DIR/pg/run"
    mkdir -p "$DIR/pg" "$run"
    chown postgres:postgres "$DIR/pg" "$run"
    chmod 700 "$DIR/pg"
    chmod o+x "$DIR/pg"
    pg_secrets
    if [ ! -f "$data/PG_VERSION" ]; then
        log "initdb $data"
        rm -rf "$data"
        # initdb (as postgres) reads the superuser's password from a file it owns
        local pwfile="$DIR/pg/initdb.pw"
        (umask 077 && cat "$DIR/secrets/pg-postgres.password" >"$pwfile")
        chown postgres:postgres "$pwfile"
        runuser -u postgres -- "$PG_BIN/initdb" -D "$data" -U postgres \
            --auth-local=peer --auth-host=scram-sha-256 --pwfile="$pwfile" \
            -E UTF8 --locale=C.UTF-8 >"$DIR/pg/initdb.log" 2>&1 \
            || { rm -f "$pwfile"; die "initdb failed, see $DIR/pg/initdb.log"; }
        rm -f "$pwfile"
        write_pg_hba
    fi
    # Unix socket paths are limited to 107 bytes: long DIRs get TCP only.
    local sockdir="$run"
    if [ "${#run}" -gt 90 ]; then
        warn "$run is too long for a Unix socket; PostgreSQL listens on TCP only"
        sockdir=""
    fi
    # A statement over every partition of a long retention (an organisation's
    # removal, the parts sweep) locks each partition and its indexes until
    # commit: with the ten years some tests keep, PostgreSQL's default lock
    # table (64 per connection) runs out ("out of shared memory").  Partitions
    # are created in batches (migrate.ensure_partitions); the rest needs room.
    grep -q '^max_locks_per_transaction' "$data/postgresql.conf" \
        || echo 'max_locks_per_transaction = 1024' >>"$data/postgresql.conf"
    if runuser -u postgres -- "$PG_BIN/pg_ctl" -D "$data" status >/dev/null 2>&1; then
        log "postgres already running"
    else
        rm -f "$data/postmaster.pid"
        require_free "$PG_PORT" "PostgreSQL"
        runuser -u postgres -- "$PG_BIN/pg_ctl" -D "$data" -l "$DIR/pg/postgres.log" -w -t 60 \
            -o "-c listen_addresses=127.0.0.1 -p $PG_PORT -k '$sockdir'" start >/dev/null 9>&- \
            || die "postgres failed to start on 127.0.0.1:$PG_PORT, see $DIR/pg/postgres.log"
    fi
    local psql=(env PGPASSFILE="$PGPASS_FILE" "$PG_BIN/psql" -h 127.0.0.1 -p "$PG_PORT"
                -U postgres -d postgres -qAtXw -v ON_ERROR_STOP=1)
    # The postgres password first: a stack made before passwords still trusts
    # loopback until the reload below; one made since asks for it.
    printf "alter role postgres password '%s';\n" "$(cat "$DIR/secrets/pg-postgres.password")" \
        | "${psql[@]}" || die "setting the postgres role's password failed, see $DIR/pg/postgres.log"
    write_pg_hba
    "${psql[@]}" -c "select pg_reload_conf()" >/dev/null || die "reloading pg_hba.conf failed"
    if [ "$("${psql[@]}" -c "select 1 from pg_roles where rolname='postkeep'")" != 1 ]; then
        "${psql[@]}" -c "create role postkeep login superuser" || die "creating role postkeep failed"
    fi
    printf "alter role postkeep password '%s';\n" "$(cat "$DIR/secrets/pg-postkeep.password")" \
        | "${psql[@]}" || die "setting the postkeep role's password failed"
    if [ "$("${psql[@]}" -c "select 1 from pg_database where datname='postkeep'")" != 1 ]; then
        "${psql[@]}" -c "create database postkeep owner postkeep" || die "creating database postkeep failed"
    fi
}

stop_postgres() {
    if pg_external; then return 0; fi
    local data="$DIR/pg/data"
    [ -f "$data/postmaster.pid" ] || return 0
    runuser -u postgres -- "$PG_BIN/pg_ctl" -D "$data" -m fast -w -t 60 stop >/dev/null 2>&1 \
        || warn "pg_ctl stop failed for $data"
}

# ---------------------------------------------------------------- external PostgreSQL
# PK_EXTERNAL_PG_DSN (libpq keyword=value, no password: host, port, dbname,
# user, target_session_attrs; multi-host lists as libpq takes them, e.g. from
# devstack/pgha.sh) and PK_EXTERNAL_PG_PASSWORD_FILE (the role's password)
# at `up`: the stack starts no PostgreSQL of its own and the daemons, the CLI
# and DIR/env use that one; PK_EXTERNAL_PG_PASSFILE (a pgpass file) for psql.
# Recorded in DIR/external-pg, so that start/stop/down leave it alone; an `up`
# without them goes back to the stack's own PostgreSQL.
pg_external() { [ -f "$DIR/external-pg" ]; }

pg_external_record() {  # at up: DIR/external-pg from the environment, or none
    if [ -z "${PK_EXTERNAL_PG_DSN:-}" ]; then
        rm -f "$DIR/external-pg"
        return 0
    fi
    [ -s "${PK_EXTERNAL_PG_PASSWORD_FILE:-}" ] \
        || die "PK_EXTERNAL_PG_DSN needs PK_EXTERNAL_PG_PASSWORD_FILE (the role's password)"
    local word key value
    local -A kv=()
    for word in $PK_EXTERNAL_PG_DSN; do
        key="${word%%=*}" value="${word#*=}"
        case "$key" in
            host|port|dbname|user|target_session_attrs) kv[$key]="$value" ;;
            *) die "PK_EXTERNAL_PG_DSN: '$key' not taken (host, port, dbname, user, target_session_attrs)" ;;
        esac
    done
    [ -n "${kv[host]:-}" ] && [ -n "${kv[port]:-}" ] || die "PK_EXTERNAL_PG_DSN needs host and port"
    (umask 077
     printf "PGX_HOST='%s'\nPGX_PORT='%s'\nPGX_DBNAME='%s'\nPGX_USER='%s'\nPGX_TSA='%s'\nPGX_PASSWORD_FILE='%s'\nPGX_PASSFILE='%s'\n" \
        "${kv[host]}" "${kv[port]}" "${kv[dbname]:-postkeep}" "${kv[user]:-postkeep}" \
        "${kv[target_session_attrs]:-read-write}" "$PK_EXTERNAL_PG_PASSWORD_FILE" \
        "${PK_EXTERNAL_PG_PASSFILE:-}" >"$DIR/external-pg")
    log "PostgreSQL: external (${kv[host]} ports ${kv[port]})"
}

pg_external_config() {  # FILE: its [postgres] table (up to the first blank line) for the external one
    # shellcheck disable=SC1091
    . "$DIR/external-pg"
    local tmp="$1.pg"
    (umask 077 && awk -v host="$PGX_HOST" -v ports="$PGX_PORT" -v db="$PGX_DBNAME" \
        -v user="$PGX_USER" -v tsa="$PGX_TSA" -v pw="$PGX_PASSWORD_FILE" '
        $0 == "[postgres]" { print; skip = 1
            printf "host = \"%s\"\nports = \"%s\"\ntarget_session_attrs = \"%s\"\n", host, ports, tsa
            printf "dbname = \"%s\"\nuser = \"%s\"\npassword_file = \"%s\"\n", db, user, pw
            next }
        skip && $0 == "" { skip = 0 }
        !skip { print }' "$1" >"$tmp")
    mv "$tmp" "$1"
}

pg_external_env() {  # DIR/env's PG* for the external one
    # shellcheck disable=SC1091
    . "$DIR/external-pg"
    local passfile="$PGX_PASSFILE"
    if [ -z "$passfile" ]; then
        passfile="$DIR/secrets/pgpass-external"
        mkdir -p "$DIR/secrets" && chmod 700 "$DIR/secrets"
        (umask 077 && printf '*:*:*:%s:%s\n' "$PGX_USER" "$(cat "$PGX_PASSWORD_FILE")" >"$passfile")
    fi
    sed -i -e "s|^export PGHOST=.*|export PGHOST='$PGX_HOST'|" \
        -e "s|^export PGPORT=.*|export PGPORT='$PGX_PORT'\nexport PGTARGETSESSIONATTRS='$PGX_TSA'|" \
        -e "s|^export PGDATABASE=.*|export PGDATABASE='$PGX_DBNAME'|" \
        -e "s|^export PGUSER=.*|export PGUSER='$PGX_USER'|" \
        -e "s|^export PGPASSFILE=.*|export PGPASSFILE='$passfile'|" "$DIR/env"
}

# ---------------------------------------------------------------- external S3
# PK_EXTERNAL_S3_ENDPOINT (HOST:PORT, plain HTTP) and PK_EXTERNAL_S3_CREDENTIALS
# (a file of MINIO_ROOT_USER=... and MINIO_ROOT_PASSWORD=... lines, as
# DIR/minio/credentials) at `up`: the stack starts no S3 server of its own and
# the daemons, the CLI and DIR/env use that one, whose bucket `postkeep` must
# exist (devstack/cluster.sh: distributed MinIO).  Recorded in DIR/external-s3
# like DIR/external-pg, so that start/stop/down leave it alone.
s3_external() { [ -f "$DIR/external-s3" ]; }

s3_external_record() {  # at up: DIR/external-s3 from the environment, or none
    if [ -z "${PK_EXTERNAL_S3_ENDPOINT:-}" ]; then
        rm -f "$DIR/external-s3"
        return 0
    fi
    [[ "$PK_EXTERNAL_S3_ENDPOINT" =~ ^[A-Za-z0-9.-]+:[0-9]+$ ]] \
        || die "PK_EXTERNAL_S3_ENDPOINT must be HOST:PORT, got '$PK_EXTERNAL_S3_ENDPOINT'"
    [ -s "${PK_EXTERNAL_S3_CREDENTIALS:-}" ] \
        || die "PK_EXTERNAL_S3_ENDPOINT needs PK_EXTERNAL_S3_CREDENTIALS (a credentials file)"
    (umask 077
     printf "S3X_ENDPOINT='%s'\nS3X_CREDENTIALS='%s'\n" "$PK_EXTERNAL_S3_ENDPOINT" \
         "$PK_EXTERNAL_S3_CREDENTIALS" >"$DIR/external-s3")
    log "S3: external ($PK_EXTERNAL_S3_ENDPOINT)"
}

s3_external_keys() {  # MINIO_ROOT_USER/PASSWORD from the external server's credentials file
    # shellcheck disable=SC1091
    . "$DIR/external-s3"
    # shellcheck disable=SC1090
    . "$S3X_CREDENTIALS"
}

s3_endpoint() {  # HOST:PORT of the stack's S3 server
    if s3_external; then
        # shellcheck disable=SC1091
        (. "$DIR/external-s3" && echo "$S3X_ENDPOINT")
    else
        echo "127.0.0.1:$S3_PORT"
    fi
}

# ---------------------------------------------------------------- minio
minio_keys() {
    if s3_external; then s3_external_keys; return 0; fi
    local f="$DIR/minio/credentials"
    mkdir -p "$DIR/minio"
    chmod 700 "$DIR/minio"  # the credentials and every stored object
    if [ ! -f "$f" ]; then
        (umask 077
         printf 'MINIO_ROOT_USER=postkeep%s\nMINIO_ROOT_PASSWORD=%s\n' \
             "$(head -c 4 /dev/urandom | od -An -tx1 | tr -d ' \n')" \
             "$(head -c 18 /dev/urandom | od -An -tx1 | tr -d ' \n')" >"$f")
    fi
    # shellcheck disable=SC1090
    . "$f"
}

# make_bucket HOST:PORT SERVER: the bucket postkeep on that S3 server, made if missing.
make_bucket() {
    "$PY" - "$1" "$MINIO_ROOT_USER" "$MINIO_ROOT_PASSWORD" <<'EOF' \
        || die "creating bucket postkeep on $2 ($1) failed"
import sys
from minio import Minio
c = Minio(sys.argv[1], access_key=sys.argv[2], secret_key=sys.argv[3], secure=False)
if not c.bucket_exists("postkeep"):
    c.make_bucket("postkeep")
EOF
}

start_minio() {
    if s3_external; then log "the S3 server is external (DIR/external-s3): not started"; return 0; fi
    if [ "$S3_SERVER" = versitygw ]; then start_versitygw; return; fi
    minio_keys
    mkdir -p "$DIR/minio/data"
    if pid_alive "$DIR/minio/minio.pid"; then
        log "minio already running"
    else
        [ -x "$MINIO_BIN" ] || die "$MINIO_BIN missing: run 'stack.sh install'"
        require_free "$S3_PORT" "MinIO"
        require_free "$S3_CONSOLE_PORT" "MinIO console"
        MINIO_ROOT_USER="$MINIO_ROOT_USER" MINIO_ROOT_PASSWORD="$MINIO_ROOT_PASSWORD" \
            MINIO_BROWSER=off MINIO_UPDATE=off \
            setsid "$MINIO_BIN" server "$DIR/minio/data" --quiet \
            --address "127.0.0.1:$S3_PORT" --console-address "127.0.0.1:$S3_CONSOLE_PORT" \
            >>"$DIR/minio/minio.log" 2>&1 </dev/null 9>&- &
        echo $! >"$DIR/minio/minio.pid"
    fi
    local i
    for ((i = 0; i < 300; i++)); do
        curl -fsS -o /dev/null "http://127.0.0.1:$S3_PORT/minio/health/live" 2>/dev/null && break
        pid_alive "$DIR/minio/minio.pid" || die "minio exited at start, see $DIR/minio/minio.log"
        sleep 0.1
    done
    [ "$i" -lt 300 ] || die "minio not ready on 127.0.0.1:$S3_PORT after 30 s, see $DIR/minio/minio.log"
    make_bucket "127.0.0.1:$S3_PORT" minio
}

stop_minio() { s3_external || stop_pid "$DIR/minio/minio.pid" "$S3_SERVER"; }

# versitygw in MinIO's place (S3_SERVER=versitygw): same port, credentials and
# pid file; posix backend under DIR/minio/vgw-data, with a versioning directory
# so that buckets can have versioning and Object Lock (it has no lifecycle).
start_versitygw() {
    minio_keys
    mkdir -p "$DIR/minio/vgw-data" "$DIR/minio/vgw-versions"
    if pid_alive "$DIR/minio/minio.pid"; then
        log "versitygw already running"
    else
        [ -x "$VERSITYGW_BIN" ] || die "$VERSITYGW_BIN missing: run 'stack.sh install'"
        require_free "$S3_PORT" "versitygw"
        private_log "$DIR/minio/versitygw.log"
        ROOT_ACCESS_KEY="$MINIO_ROOT_USER" ROOT_SECRET_KEY="$MINIO_ROOT_PASSWORD" \
            setsid "$VERSITYGW_BIN" --port "127.0.0.1:$S3_PORT" --quiet \
            posix --versioning-dir "$DIR/minio/vgw-versions" "$DIR/minio/vgw-data" \
            >>"$DIR/minio/versitygw.log" 2>&1 </dev/null 9>&- &
        echo $! >"$DIR/minio/minio.pid"
    fi
    wait_port "$S3_PORT" 30 "$DIR/minio/minio.pid" \
        || die "versitygw not listening on 127.0.0.1:$S3_PORT, see $DIR/minio/versitygw.log"
    make_bucket "127.0.0.1:$S3_PORT" versitygw
}

# ---------------------------------------------------------------- sink
start_sink() {
    mkdir -p "$DIR/sink"
    chmod 700 "$DIR/sink"  # the messages it received
    if pid_alive "$DIR/sink.pid"; then
        log "sink already running"
        return 0
    fi
    require_free "$SINK_PORT" "sink"
    private_log "$DIR/sink.log"
    setsid "$PY" "$REPO/devstack/sink.py" --host 127.0.0.1 --port "$SINK_PORT" --dir "$DIR/sink" \
        >>"$DIR/sink.log" 2>&1 </dev/null 9>&- &
    echo $! >"$DIR/sink.pid"
    wait_port "$SINK_PORT" 30 "$DIR/sink.pid" \
        || die "sink not listening on 127.0.0.1:$SINK_PORT, see $DIR/sink.log"
}

stop_sink() { stop_pid "$DIR/sink.pid" sink; }

# ---------------------------------------------------------------- milter
milter_importable() { (cd / && "$PY" -c 'import postkeep.milter.daemon') >/dev/null 2>&1; }

# start_daemon NAME BINARY PORT METRICS_PORT: one postkeep daemon in the
# background, logging to DIR/NAME/NAME.log, ready once PORT answers (60 s: a
# daemon probes S3 before it listens, and a distributed MinIO whose nodes just
# came back answers slowly while it heals).
start_daemon() {
    local name="$1" binary="$2" port="$3" mport="$4"
    mkdir -p "$DIR/$name"
    if pid_alive "$DIR/$name/$name.pid"; then
        log "$name already running"
        return 0
    fi
    require_free "$port" "$name"
    require_free "$mport" "$name metrics"
    private_log "$DIR/$name/$name.log"
    setsid "$VENV/bin/$binary" --config "$DIR/postkeep.toml" \
        >>"$DIR/$name/$name.log" 2>&1 </dev/null 9>&- &
    echo $! >"$DIR/$name/$name.pid"
    wait_port "$port" 60 "$DIR/$name/$name.pid" \
        || die_log "$DIR/$name/$name.log" \
                   "$binary not listening on 127.0.0.1:$port, see $DIR/$name/$name.log"
}

start_milter() {
    mkdir -p "$DIR/milter/tmp"
    chmod 700 "$DIR/milter"  # messages being captured, and the outage spool
    if ! pid_alive "$DIR/milter/milter.pid" && ! milter_importable; then
        (cd / && "$PY" -c 'import postkeep.milter.daemon') || true
        die "postkeep.milter.daemon does not import in $VENV (see above)"
    fi
    start_daemon milter postkeep-milter "$MILTER_PORT" "$METRICS_PORT"
}

stop_milter() { stop_pid "$DIR/milter/milter.pid" postkeep-milter; }

# ---------------------------------------------------------------- policyd
start_policyd() {
    start_daemon policyd postkeep-policyd "$POLICYD_PORT" "$POLICYD_METRICS_PORT"
}

stop_policyd() { stop_pid "$DIR/policyd/policyd.pid" postkeep-policyd; }

# ---------------------------------------------------------------- storage sidecar
start_storage() {
    start_daemon storage postkeep-storage "$STORAGE_PORT" "$STORAGE_METRICS_PORT"
}

stop_storage() { stop_pid "$DIR/storage/storage.pid" postkeep-storage; }

# ---------------------------------------------------------------- postkeep config
dkim_keys() {  # the DKIM master key, the system-mail key and the return-path key, made once per stack
    mkdir -p "$DIR/dkim"
    chmod 700 "$DIR/dkim"
    if [ ! -s "$DIR/dkim/master.key" ]; then
        (umask 077 && head -c 32 /dev/urandom | base64 >"$DIR/dkim/master.key")
    fi
    if [ ! -s "$DIR/dkim/return-path.key" ]; then
        (umask 077 && head -c 32 /dev/urandom | base64 >"$DIR/dkim/return-path.key")
    fi
    # Sealed content (issue 19): the master key wrapping every organisation's content key.
    if [ ! -s "$DIR/dkim/content-master.key" ]; then
        (umask 077 && head -c 32 /dev/urandom | base64 >"$DIR/dkim/content-master.key")
    fi
    if [ ! -s "$DIR/dkim/system.pem" ]; then
        (umask 077 && openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 \
            -out "$DIR/dkim/system.pem" 2>/dev/null) || die "openssl could not make the system DKIM key"
    fi
}

write_config() {
    minio_keys
    dkim_keys
    (umask 077 && : >"$DIR/postkeep.toml.tmp")
    cat >"$DIR/postkeep.toml.tmp" <<EOF
# Written by devstack/stack.sh for the stack in $DIR.
[postgres]
host = "127.0.0.1"
port = $PG_PORT
dbname = "postkeep"
user = "postkeep"
password_file = "$DIR/secrets/pg-postkeep.password"

[s3]
endpoint = "$(s3_endpoint)"
secure = false
bucket = "postkeep"
access_key = "$MINIO_ROOT_USER"
secret_key = "$MINIO_ROOT_PASSWORD"

[milter]
listen = "inet:$MILTER_PORT@127.0.0.1"
metrics_listen = "127.0.0.1:$METRICS_PORT"
spool_directory = "$DIR/milter/tmp"
outage_spool_directory = "$DIR/milter/spool"
# 192.0.2.0/24 (TEST-NET-1): tests appear from there with XCLIENT as a trusted
# client that Postfix does not treat as local (no headers added for it).
trusted_networks = ["127.0.0.0/8", "192.0.2.0/24"]
bounce_domain = "bounces.postkeep.test"

[policyd]
listen_host = "127.0.0.1"
listen_port = $POLICYD_PORT
metrics_listen = "127.0.0.1:$POLICYD_METRICS_PORT"

[postfix]
config_directory = "$PFDIR"
milter_address = "inet:127.0.0.1:$MILTER_PORT"
policy_address = "inet:127.0.0.1:$POLICYD_PORT"
storage_lmtp_address = "inet:127.0.0.1:$STORAGE_PORT"
# The system mail lane leaves from its own loopback address and name
# (tests/test_system_lane_stack.py tells the lanes apart by them).
system_bind_address = "127.0.0.2"
system_helo_name = "system-lane.postkeep-stack.localdomain"

[storage]
lmtp_host = "127.0.0.1"
lmtp_port = $STORAGE_PORT
metrics_listen = "127.0.0.1:$STORAGE_METRICS_PORT"
forward_relay = "127.0.0.1:$REINJECT_PORT"
spool_drain_interval_seconds = 1
# Sealed content (issue 19): every packed message encrypted under its own key.
master_key_file = "$DIR/dkim/content-master.key"

[dkim]
master_key_file = "$DIR/dkim/master.key"
system_domains = ["system.postkeep.test"]
system_selector = "sys"
system_key_file = "$DIR/dkim/system.pem"

[return_path]
key_file = "$DIR/dkim/return-path.key"

# Application tags (issue 17): tests/test_tags_stack.py.
[tags]
headers = { "X-Campaign-Id" = "campaign_id", "X-Template-Id" = "template_id", "X-Lead-Id" = "lead_id" }
strip = true

# Webhooks (issue 18): quick retries and polls for tests/test_webhooks_*.py.
[webhooks]
retry_initial_seconds = 0.2
retry_max_seconds = 2.0
poll_seconds = 1.0
request_timeout_seconds = 30.0
EOF
    if pg_external; then pg_external_config "$DIR/postkeep.toml.tmp"; fi
    mv "$DIR/postkeep.toml.tmp" "$DIR/postkeep.toml"
}

postkeep_cli() {  # the `postkeep` CLI
    (cd / && "$VENV/bin/postkeep" --config "$DIR/postkeep.toml" "$@")
}

migrate_db() {
    postkeep_cli db migrate >"$DIR/migrate.log" 2>&1 \
        || { cat "$DIR/migrate.log" >&2; die "'postkeep db migrate' failed"; }
}

# ---------------------------------------------------------------- postfix
configure_postfix() {
    local spool="$DIR/postfix/spool" data="$DIR/postfix/data"
    mkdir -p "$PFDIR" "$spool" "$data"
    chown postfix:postfix "$data"
    chmod 755 "$DIR/postfix"
    cp /etc/postfix/master.cf "$PFDIR/master.cf"
    # A minimal main.cf; the product bundle is applied on top, then loopback overrides.
    cat >"$PFDIR/main.cf" <<EOF
# Private Postfix instance of the postkeep dev stack in $DIR.
compatibility_level = 3.6
queue_directory = $spool
data_directory = $data
mail_owner = postfix
setgid_group = postdrop
syslog_name = postfix-postkeep-$PORTBASE
maillog_file = $PFLOG
EOF
    # 1. The product bundle, exactly as production gets it.
    postkeep_cli postfix apply >"$DIR/postfix/apply.log" 2>&1 \
        || { cat "$DIR/postfix/apply.log" >&2; die "'postkeep postfix apply' failed"; }
    # 2. Loopback/test overrides: only what a private loopback instance needs.
    local pc=(postconf -c "$PFDIR")
    "${pc[@]}" -e \
        "inet_interfaces = loopback-only" \
        "inet_protocols = ipv4" \
        "myhostname = postkeep-stack.localdomain" \
        "mydestination =" \
        "mynetworks = 127.0.0.0/8" \
        "relayhost = [127.0.0.1]:$SINK_PORT" \
        "smtp_tls_security_level = none" \
        "smtpd_tls_security_level = none" \
        "alias_maps =" \
        "alias_database =" \
        "local_recipient_maps =" \
        "smtpd_relay_restrictions = permit_mynetworks, reject_unauth_destination" \
        "relay_domains = texthash:$PFDIR/postkeep-inbound-domains, sink.test, mx.test, bounces.postkeep.test" \
        "transport_maps = pcre:$PFDIR/postkeep-transport.pcre, texthash:$PFDIR/postkeep-inbound-transport, texthash:$PFDIR/stack-transport" \
        "smtpd_authorized_xclient_hosts = 127.0.0.0/8" \
        || die "postconf overrides failed for $PFDIR"
    # mx.test: a test's fake remote MX (answers per recipient; see tests).
    printf 'mx.test\tsmtp:[127.0.0.1]:%s\n' "$FAKE_MX_PORT" >"$PFDIR/stack-transport"
    # lane.test: the same fake MX, but a next hop only and outside relay_domains,
    # so the sender picks the transport (smtp, or postkeep-system for the
    # system domains; tests/test_system_lane_stack.py).
    printf 'lane.test\t:[127.0.0.1]:%s\n' "$FAKE_MX_PORT" >>"$PFDIR/stack-transport"
    # Inbound domains (issue 17): the bundle names these tables first in
    # relay_domains and transport_maps (kept so above, so `postkeep postfix
    # check` matches); `postkeep domain set-inbound` rewrites them.
    : >"$PFDIR/postkeep-inbound-domains"
    : >"$PFDIR/postkeep-inbound-transport"
    # (Tests speak XCLIENT to appear as a client off the trusted networks, and
    # mail to sink.test is relayed for such clients too.  The bounce domain is
    # in relay_domains as the README asks of a production host, so remote
    # servers' late bounces, and forgeries, come in over SMTP as they would.)
    "${pc[@]}" -F '*/*/chroot = n' || die "postconf -F chroot failed"
    "${pc[@]}" -MX smtp/inet || true
    "${pc[@]}" -M "127.0.0.1:$SMTP_PORT/inet = 127.0.0.1:$SMTP_PORT inet n - n - - smtpd" \
        || die "postconf -M smtpd failed"
    # Forwarded failure notices re-enter here: no capture, no rate limit.
    "${pc[@]}" -M "127.0.0.1:$REINJECT_PORT/inet = 127.0.0.1:$REINJECT_PORT inet n - n - - smtpd -o smtpd_milters= -o smtpd_command_filter= -o smtpd_recipient_restrictions= -o smtpd_data_restrictions= -o smtpd_end_of_data_restrictions=" \
        || die "postconf -M reinjection smtpd failed"
    # Postfix starts a private instance only if the default instance lists it.
    local alt
    alt="$(postconf -h alternate_config_directories)"
    case " ${alt//,/ } " in
        *" $PFDIR "*) ;;
        *) postconf -e "alternate_config_directories = ${alt:+$alt, }$PFDIR" \
               || die "registering $PFDIR in /etc/postfix/main.cf failed" ;;
    esac
    touch "$PFLOG"
}

start_postfix() {
    [ -f "$PFDIR/main.cf" ] || configure_postfix
    private_log "$PFLOG"  # Postfix's log, written by postlogd as root
    if postfix -c "$PFDIR" status >/dev/null 2>&1; then
        log "postfix already running"
    else
        require_free "$SMTP_PORT" "Postfix smtpd"
        postfix -c "$PFDIR" check || die "postfix -c $PFDIR check failed (see $PFLOG)"
        postfix -c "$PFDIR" start >/dev/null 2>&1 9>&- \
            || die "postfix -c $PFDIR start failed (see $PFLOG; is $PFDIR in /etc/postfix alternate_config_directories?)"
    fi
    local i banner
    for ((i = 0; i < 300; i++)); do
        banner="$(smtp_banner "$SMTP_PORT")"
        case "$banner" in 220*) return 0 ;; esac
        sleep 0.1
    done
    die "Postfix smtpd does not answer 220 on 127.0.0.1:$SMTP_PORT after 30 s (see $PFLOG)"
}

stop_postfix() {
    [ -f "$PFDIR/main.cf" ] || return 0
    if postfix -c "$PFDIR" status >/dev/null 2>&1; then
        postfix -c "$PFDIR" stop >/dev/null 2>&1 || warn "postfix -c $PFDIR stop failed"
        local i
        for ((i = 0; i < 100; i++)); do
            postfix -c "$PFDIR" status >/dev/null 2>&1 || break
            sleep 0.1
        done
    fi
}

# ---------------------------------------------------------------- env
write_env() {
    minio_keys
    (umask 077 && : >"$DIR/env.tmp")
    cat >"$DIR/env.tmp" <<EOF
# postkeep dev stack in $DIR (written by devstack/stack.sh up); source this file.
export POSTKEEP_STACK_DIR='$DIR'
export POSTKEEP_STACK_VENV='$VENV'
export POSTKEEP_CONFIG='$DIR/postkeep.toml'
export POSTKEEP_SMTP_HOST='127.0.0.1'
export POSTKEEP_SMTP_PORT='$SMTP_PORT'
export POSTKEEP_SINK_DIR='$DIR/sink'
export POSTKEEP_POSTFIX_CONFIG_DIR='$PFDIR'
export POSTKEEP_POSTFIX_LOG='$PFLOG'
export POSTKEEP_MILTER_METRICS='http://127.0.0.1:$METRICS_PORT/metrics'
export POSTKEEP_POLICYD_HOST='127.0.0.1'
export POSTKEEP_POLICYD_PORT='$POLICYD_PORT'
export POSTKEEP_POLICYD_METRICS='http://127.0.0.1:$POLICYD_METRICS_PORT/metrics'
export POSTKEEP_STORAGE_LMTP_PORT='$STORAGE_PORT'
export POSTKEEP_STORAGE_METRICS='http://127.0.0.1:$STORAGE_METRICS_PORT/metrics'
export POSTKEEP_FAKE_MX_PORT='$FAKE_MX_PORT'
export POSTKEEP_BOUNCE_DOMAIN='bounces.postkeep.test'
export PGHOST='127.0.0.1'
export PGPORT='$PG_PORT'
export PGDATABASE='postkeep'
export PGUSER='postkeep'
export PGPASSFILE='$DIR/secrets/pgpass'
export POSTKEEP_S3_ENDPOINT='$(s3_endpoint)'
export POSTKEEP_S3_BUCKET='postkeep'
export POSTKEEP_S3_ACCESS_KEY='$MINIO_ROOT_USER'
export POSTKEEP_S3_SECRET_KEY='$MINIO_ROOT_PASSWORD'
export POSTKEEP_S3_SERVER='$S3_SERVER'
EOF
    mv "$DIR/env.tmp" "$DIR/env"
    if pg_external; then pg_external_env; fi
}

# ---------------------------------------------------------------- commands
start_service() {
    case "$1" in
        postgres) start_postgres ;;
        minio) start_minio ;;
        sink) start_sink ;;
        milter) start_milter ;;
        policyd) start_policyd ;;
        storage) start_storage ;;
        postfix) start_postfix ;;
        *) die "unknown service '$1' (postgres|minio|milter|policyd|storage|postfix|sink)" ;;
    esac
}

stop_service() {
    case "$1" in
        postgres) stop_postgres ;;
        minio) stop_minio ;;
        sink) stop_sink ;;
        milter) stop_milter ;;
        policyd) stop_policyd ;;
        storage) stop_storage ;;
        postfix) stop_postfix ;;
        *) die "unknown service '$1' (postgres|minio|milter|policyd|storage|postfix|sink)" ;;
    esac
}

cmd_up() {
    [ $# -eq 2 ] || die "usage: stack.sh up DIR PORTBASE"
    [[ "$2" =~ ^[0-9]+$ ]] || die "PORTBASE must be a number, got '$2'"
    PORTBASE="$2"
    load_state "$1"
    [ -x "$PY" ] || die "venv $VENV missing: run 'stack.sh install' first"
    mkdir -p "$DIR"
    if [ -f "$DIR/portbase" ] && [ "$(cat "$DIR/portbase")" != "$PORTBASE" ]; then
        log "PORTBASE changed: stopping the old stack in $DIR"
        (PORTBASE="$(cat "$DIR/portbase")"; load_state "$DIR"; cmd_down_loaded)
    fi
    echo "$PORTBASE" >"$DIR/portbase"
    # S3_SERVER (minio by default): switching a stack's server stops the old one.
    local want="${S3_SERVER_REQUESTED:-minio}"
    if [ -f "$DIR/s3server" ] && [ "$(cat "$DIR/s3server")" != "$want" ]; then
        log "S3 server changed to $want: stopping $S3_SERVER"
        stop_minio
    fi
    echo "$want" >"$DIR/s3server"
    S3_SERVER_CHOSEN="$want"
    S3_SERVER="$want"
    open_parents "$DIR"
    chmod o+x "$DIR"
    pg_external_record
    s3_external_record
    start_postgres
    start_minio
    start_sink
    write_config
    migrate_db
    # Restart the daemons and Postfix so that code and bundle changes are picked up.
    stop_milter
    start_milter
    stop_policyd
    start_policyd
    stop_storage
    start_storage
    stop_postfix
    configure_postfix
    start_postfix
    write_env
    close_dirs
    log "stack up in $DIR (smtpd 127.0.0.1:$SMTP_PORT); env: $DIR/env"
}

cmd_down_loaded() {
    stop_postfix
    stop_storage
    stop_policyd
    stop_milter
    stop_sink
    stop_minio
    stop_postgres
}

cmd_down() {
    [ $# -eq 1 ] || die "usage: stack.sh down DIR"
    [ -f "$1/portbase" ] || { log "nothing to stop in $1"; return 0; }
    load_state "$1"
    cmd_down_loaded
    log "stack in $DIR stopped"
}

cmd_status() {
    load_state "$1"
    local s
    if s3_external; then echo "minio external ($(s3_endpoint))"; else
    pid_alive "$DIR/minio/minio.pid" && s=up || s=down; echo "minio $s ($S3_SERVER)"
    fi
    pid_alive "$DIR/sink.pid" && s=up || s=down; echo "sink $s"
    pid_alive "$DIR/milter/milter.pid" && s=up || s=down; echo "milter $s"
    pid_alive "$DIR/policyd/policyd.pid" && s=up || s=down; echo "policyd $s"
    pid_alive "$DIR/storage/storage.pid" && s=up || s=down; echo "storage $s"
    if pg_external; then echo "postgres external"; else
    runuser -u postgres -- "$PG_BIN/pg_ctl" -D "$DIR/pg/data" status >/dev/null 2>&1 \
        && s=up || s=down; echo "postgres $s"
    fi
    postfix -c "$PFDIR" status >/dev/null 2>&1 && s=up || s=down; echo "postfix $s"
}

# ---------------------------------------------------------------- cluster (issue 20)
# shellcheck source=devstack/cluster.sh
. "$(dirname "${BASH_SOURCE[0]}")/cluster.sh"
# S3_SERVER from the caller's environment is read by `up` only.
S3_SERVER_REQUESTED="${S3_SERVER:-}"
unset S3_SERVER

main() {
    local cmd="${1:-}"
    shift || true
    case "$cmd" in
        install) cmd_install ;;
        up) cmd_up "$@" ;;
        down) cmd_down "$@" ;;
        start) [ $# -eq 2 ] || die "usage: stack.sh start DIR SERVICE"
               load_state "$1"; start_service "$2" ;;
        stop) [ $# -eq 2 ] || die "usage: stack.sh stop DIR SERVICE"
              load_state "$1"; stop_service "$2" ;;
        cluster-up) cmd_cluster_up "$@" ;;
        cluster-down) cmd_cluster_down "$@" ;;
        cluster-kill) cmd_cluster_node kill "$@" ;;
        cluster-start) cmd_cluster_node start "$@" ;;
        status) [ $# -eq 1 ] || die "usage: stack.sh status DIR"; cmd_status "$1" ;;
        *) die "usage: stack.sh install | up DIR PORTBASE | down DIR | start|stop DIR SERVICE | status DIR" ;;
    esac
}

main "$@"
