#!/bin/bash
# pgha.sh - a PostgreSQL that fails over, on loopback: one etcd member and two
# PostgreSQL 15 nodes managed by Patroni (primary + synchronous streaming replica).
#
# Usage:
#   pgha.sh up DIR PORTBASE     start etcd and both nodes, bootstrap postkeep's
#                               database and roles, migrate; DIR/env has the DSN
#   pgha.sh down DIR            stop everything started under DIR (safe half-started)
#   pgha.sh kill DIR NODE       kill -9 NODE's Patroni and PostgreSQL (a lost host)
#   pgha.sh start DIR NODE      start NODE's Patroni again (it rejoins as it can)
#   pgha.sh leader DIR          the node holding the leader key (node1|node2)
#   pgha.sh sync DIR            the synchronous standby (node1|node2), if any
#   pgha.sh switchover DIR      patronictl switchover to the replica, waited for
#   pgha.sh status DIR          patronictl list
#
# Ports (127.0.0.1): PORTBASE etcd client, +1 etcd peer, +2 PostgreSQL node1,
# +3 PostgreSQL node2, +4 Patroni REST node1, +5 Patroni REST node2.
#
# Replication is synchronous by configuration (Patroni's synchronous_mode): a
# COMMIT returns once the replica has flushed it, so a committed capture
# survives the loss of the primary, and Patroni only promotes the synchronous
# replica.  synchronous_mode_strict is false: with the replica gone, Patroni
# drops it from synchronous_standby_names and the primary keeps accepting
# alone; what it commits then is on one node only until the replica is back
# and has caught up (losing the primary in that window loses those commits,
# and Patroni does not fail over to a replica that was not synchronous).
#
# PID 1 is not systemd here: etcd and each Patroni run in the background with
# pid files; Patroni runs PostgreSQL as its child.  DIR/env: PK_EXTERNAL_PG_DSN
# (libpq multi-host, target_session_attrs=read-write) and
# PK_EXTERNAL_PG_PASSWORD_FILE for `stack.sh up`, and PG* for psql.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PG_BIN=/usr/lib/postgresql/15/bin
NODES=(node1 node2)

log() { printf 'pgha: %s\n' "$*" >&2; }
die() { printf 'pgha: ERROR: %s\n' "$*" >&2; exit 1; }

load_state() {
    DIR="$1"
    case "$DIR" in /*) ;; *) die "DIR must be an absolute path, got '$DIR'" ;; esac
    if [ -z "${PORTBASE:-}" ]; then
        [ -f "$DIR/portbase" ] || die "$DIR/portbase missing: run 'pgha.sh up $DIR PORTBASE' first"
        PORTBASE="$(cat "$DIR/portbase")"
    fi
    ETCD_PORT=$PORTBASE
    ETCD_PEER_PORT=$((PORTBASE + 1))
    SCOPE="postkeep-pgha-$PORTBASE"
}

node_index() { case "$1" in node1) echo 0 ;; node2) echo 1 ;; *) die "unknown node '$1' (node1|node2)" ;; esac; }
pg_port() { echo $((PORTBASE + 2 + $(node_index "$1"))); }
rest_port() { echo $((PORTBASE + 4 + $(node_index "$1"))); }

pid_alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }
port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
require_free() { if port_open "$1"; then die "127.0.0.1:$1 ($2) is already in use; pick another PORTBASE"; fi; }

until_ok() {  # SECONDS WHAT COMMAND...: poll COMMAND every 0.2 s until it succeeds
    local secs="$1" what="$2" i
    shift 2
    for ((i = 0; i < secs * 5; i++)); do
        "$@" >/dev/null 2>&1 && return 0
        sleep 0.2
    done
    die "$what not reached after ${secs}s (logs in $DIR)"
}

rest_ok() { curl -fsS -o /dev/null --max-time 2 "http://127.0.0.1:$(rest_port "$1")/$2" 2>/dev/null; }

secret_file() {  # FILE: made once, 48 hex digits
    [ -s "$1" ] && return 0
    (umask 077 && head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$1")
}

# ---------------------------------------------------------------- etcd
start_etcd() {
    mkdir -p "$DIR/etcd"
    chmod 700 "$DIR/etcd"
    if pid_alive "$DIR/etcd/etcd.pid"; then return 0; fi
    require_free "$ETCD_PORT" "etcd client"
    require_free "$ETCD_PEER_PORT" "etcd peer"
    local state=new
    [ -d "$DIR/etcd/data/member" ] && state=existing
    setsid etcd --name pgha --data-dir "$DIR/etcd/data" \
        --listen-client-urls "http://127.0.0.1:$ETCD_PORT" \
        --advertise-client-urls "http://127.0.0.1:$ETCD_PORT" \
        --listen-peer-urls "http://127.0.0.1:$ETCD_PEER_PORT" \
        --initial-advertise-peer-urls "http://127.0.0.1:$ETCD_PEER_PORT" \
        --initial-cluster "pgha=http://127.0.0.1:$ETCD_PEER_PORT" \
        --initial-cluster-token "$SCOPE" --initial-cluster-state "$state" \
        >>"$DIR/etcd/etcd.log" 2>&1 </dev/null 9>&- &
    echo $! >"$DIR/etcd/etcd.pid"
    until_ok 30 "etcd health on 127.0.0.1:$ETCD_PORT" \
        curl -fsS --max-time 2 "http://127.0.0.1:$ETCD_PORT/health"
}

# ---------------------------------------------------------------- patroni
write_patroni_config() {  # NODE
    local node="$1" nd="$DIR/$1"
    local pgp rp
    pgp="$(pg_port "$node")"
    rp="$(rest_port "$node")"
    mkdir -p "$nd/run"
    chown postgres:postgres "$nd" "$nd/run"
    chmod 700 "$nd"
    chmod o+x "$nd"  # (the socket directory below it)
    # Unix socket paths are limited to 107 bytes: long DIRs get TCP only
    # (as in stack.sh; Patroni itself connects over TCP).
    local sockdir="$nd/run"
    [ "${#sockdir}" -gt 90 ] && sockdir=""
    (umask 077 && : >"$nd/patroni.yml.tmp")
    cat >"$nd/patroni.yml.tmp" <<EOF
# Written by devstack/pgha.sh for $DIR ($node).
scope: $SCOPE
namespace: /postkeep/
name: $node
restapi:
  listen: 127.0.0.1:$rp
  connect_address: 127.0.0.1:$rp
etcd3:
  hosts: 127.0.0.1:$ETCD_PORT
log:
  dir: $nd
  file_size: 10000000
  file_num: 2
bootstrap:
  dcs:
    # A failover starts once the leader key (ttl) expires: ~ttl s after the
    # primary's host is lost.  loop_wait + 2 * retry_timeout <= ttl.
    ttl: 10
    loop_wait: 1
    retry_timeout: 4
    maximum_lag_on_failover: 1048576
    synchronous_mode: true
    synchronous_mode_strict: false
    postgresql:
      use_pg_rewind: true
      use_slots: true
      parameters:
        wal_level: replica
        hot_standby: "on"
        wal_log_hints: "on"
        max_wal_senders: 5
        max_replication_slots: 5
        synchronous_commit: "on"
        # as devstack/stack.sh (long retentions' partitions in one transaction)
        max_locks_per_transaction: 1024
  initdb:
    - encoding: UTF8
    - locale: C.UTF-8
    - auth-local: peer
    - auth-host: scram-sha-256
postgresql:
  listen: 127.0.0.1:$pgp
  connect_address: 127.0.0.1:$pgp
  data_dir: $nd/data
  bin_dir: $PG_BIN
  pgpass: $nd/pgpass
  authentication:
    superuser:
      username: postgres
      password: $(cat "$DIR/secrets/pg-postgres.password")
    replication:
      username: replicator
      password: $(cat "$DIR/secrets/pg-replicator.password")
    rewind:
      username: postgres
      password: $(cat "$DIR/secrets/pg-postgres.password")
  parameters:
    unix_socket_directories: '$sockdir'
  pg_hba:
    - local all postgres peer
    - local all all scram-sha-256
    - host all all 127.0.0.1/32 scram-sha-256
    - host replication replicator 127.0.0.1/32 scram-sha-256
tags:
  nofailover: false
  noloadbalance: false
  clonefrom: false
  nosync: false
EOF
    chown postgres:postgres "$nd/patroni.yml.tmp"
    mv "$nd/patroni.yml.tmp" "$nd/patroni.yml"
}

start_node() {  # NODE
    local node="$1" nd="$DIR/$1"
    if pid_alive "$nd/patroni.pid"; then return 0; fi
    # A PostgreSQL left by a killed Patroni: Patroni would adopt it, but a
    # stale postmaster.pid of a dead one must go.
    if [ -f "$nd/data/postmaster.pid" ] && ! kill -0 "$(head -1 "$nd/data/postmaster.pid")" 2>/dev/null; then
        rm -f "$nd/data/postmaster.pid"
    fi
    postmaster_pid "$node" >/dev/null || require_free "$(pg_port "$node")" "PostgreSQL $node"
    require_free "$(rest_port "$node")" "Patroni REST $node"
    write_patroni_config "$node"
    (umask 077 && : >>"$nd/patroni.out")
    chown postgres:postgres "$nd/patroni.out"
    # setpriv execs (no forking su): the pid file names Patroni itself.
    HOME=/var/lib/postgresql setsid setpriv --reuid=postgres --regid=postgres --init-groups \
        patroni "$nd/patroni.yml" >>"$nd/patroni.out" 2>&1 </dev/null 9>&- &
    echo $! >"$nd/patroni.pid"
    until_ok 60 "Patroni REST API of $node" rest_ok "$node" health
}

postmaster_pid() {  # NODE: the live postmaster's pid, if any
    local f="$DIR/$1/data/postmaster.pid" pid
    [ -f "$f" ] || return 1
    pid="$(head -1 "$f")"
    kill -0 "$pid" 2>/dev/null && echo "$pid"
}

kill_node() {  # NODE: kill -9 Patroni, the postmaster and every child of it
    local node="$1" nd="$DIR/$1" pm pids p
    pm="$(postmaster_pid "$node" || true)"
    pids=()
    if pid_alive "$nd/patroni.pid"; then pids+=("$(cat "$nd/patroni.pid")"); fi
    if [ -n "$pm" ]; then
        pids+=("$pm")
        for p in /proc/[0-9]*; do
            [ "$(awk '{print $4}' "$p/stat" 2>/dev/null)" = "$pm" ] && pids+=("${p#/proc/}")
        done
    fi
    [ ${#pids[@]} -gt 0 ] && kill -KILL "${pids[@]}" 2>/dev/null || true
    for p in "${pids[@]}"; do
        for ((i = 0; i < 100; i++)); do
            [ -d "/proc/$p" ] || break
            [ "$(awk '{print $3}' "/proc/$p/stat" 2>/dev/null)" = Z ] && break
            sleep 0.1
        done
    done
    rm -f "$nd/patroni.pid"
}

stop_node() {  # NODE: SIGTERM Patroni (it stops PostgreSQL), then make sure
    local node="$1" nd="$DIR/$1" pid i pm
    if pid_alive "$nd/patroni.pid"; then
        pid="$(cat "$nd/patroni.pid")"
        kill -TERM "$pid" 2>/dev/null || true
        for ((i = 0; i < 300; i++)); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -0 "$pid" 2>/dev/null && { log "Patroni $node ignored SIGTERM for 30 s: SIGKILL"; kill -KILL "$pid" 2>/dev/null || true; }
    fi
    rm -f "$nd/patroni.pid"
    if pm="$(postmaster_pid "$node")"; then
        runuser -u postgres -- "$PG_BIN/pg_ctl" -D "$nd/data" -m fast -w -t 30 stop >/dev/null 2>&1 \
            || kill -KILL "$pm" 2>/dev/null || true
    fi
}

leader() {  # the node holding the leader key, or nothing
    local node
    for node in "${NODES[@]}"; do
        if rest_ok "$node" primary; then echo "$node"; return 0; fi
    done
    return 1
}

# ---------------------------------------------------------------- bootstrap
secrets() {
    mkdir -p "$DIR/secrets"
    chmod 700 "$DIR/secrets"
    secret_file "$DIR/secrets/pg-postgres.password"
    secret_file "$DIR/secrets/pg-replicator.password"
    secret_file "$DIR/secrets/pg-postkeep.password"
    local p1 p2
    p1="$(pg_port node1)"
    p2="$(pg_port node2)"
    (umask 077
     printf '127.0.0.1:%s:*:%s:%s\n' \
         "$p1" postgres "$(cat "$DIR/secrets/pg-postgres.password")" \
         "$p2" postgres "$(cat "$DIR/secrets/pg-postgres.password")" \
         "$p1" postkeep "$(cat "$DIR/secrets/pg-postkeep.password")" \
         "$p2" postkeep "$(cat "$DIR/secrets/pg-postkeep.password")" >"$DIR/secrets/pgpass.tmp")
    mv "$DIR/secrets/pgpass.tmp" "$DIR/secrets/pgpass"
}

dsn() {
    echo "host=127.0.0.1,127.0.0.1 port=$(pg_port node1),$(pg_port node2) dbname=postkeep user=postkeep target_session_attrs=read-write"
}

bootstrap_roles() {  # as in stack.sh start_postgres: postkeep (superuser, password), its database
    local psql=(env PGPASSFILE="$DIR/secrets/pgpass" PGHOST=127.0.0.1,127.0.0.1
                PGPORT="$(pg_port node1),$(pg_port node2)" PGTARGETSESSIONATTRS=read-write
                "$PG_BIN/psql" -U postgres -d postgres -qAtXw -v ON_ERROR_STOP=1)
    if [ "$("${psql[@]}" -c "select 1 from pg_roles where rolname='postkeep'")" != 1 ]; then
        "${psql[@]}" -c "create role postkeep login superuser" || die "creating role postkeep failed"
    fi
    printf "alter role postkeep password '%s';\n" "$(cat "$DIR/secrets/pg-postkeep.password")" \
        | "${psql[@]}" || die "setting the postkeep role's password failed"
    if [ "$("${psql[@]}" -c "select 1 from pg_database where datname='postkeep'")" != 1 ]; then
        "${psql[@]}" -c "create database postkeep owner postkeep" || die "creating database postkeep failed"
    fi
}

write_env() {
    (umask 077 && : >"$DIR/env.tmp")
    cat >"$DIR/env.tmp" <<EOF
# postkeep pgha in $DIR (written by devstack/pgha.sh up); source this file.
export PK_EXTERNAL_PG_DSN='$(dsn)'
export PK_EXTERNAL_PG_PASSWORD_FILE='$DIR/secrets/pg-postkeep.password'
export PK_EXTERNAL_PG_PASSFILE='$DIR/secrets/pgpass'
export PK_PGHA_DIR='$DIR'
EOF
    mv "$DIR/env.tmp" "$DIR/env"
    # Only [postgres]: what `postkeep db migrate` needs.
    (umask 077 && cat >"$DIR/postkeep.toml" <<EOF
[postgres]
host = "127.0.0.1,127.0.0.1"
ports = "$(pg_port node1),$(pg_port node2)"
target_session_attrs = "read-write"
dbname = "postkeep"
user = "postkeep"
password_file = "$DIR/secrets/pg-postkeep.password"
EOF
    )
}

migrate() {
    local venv="$REPO/.venv"
    [ -x "$venv/bin/postkeep" ] || die "$venv/bin/postkeep missing: run 'stack.sh install' first"
    (cd / && "$venv/bin/postkeep" --config "$DIR/postkeep.toml" db migrate) >"$DIR/migrate.log" 2>&1 \
        || { cat "$DIR/migrate.log" >&2; die "'postkeep db migrate' failed"; }
}

open_parents() {  # postgres must traverse every parent of DIR
    local d="$1"
    while [ "$d" != "/" ]; do
        d="$(dirname "$d")"
        [ -d "$d" ] || continue
        if [ "$(( $(stat -c '%#a' "$d") & 1 ))" -eq 0 ]; then chmod o+x "$d"; fi
    done
}

# ---------------------------------------------------------------- commands
cmd_up() {
    [ $# -eq 2 ] || die "usage: pgha.sh up DIR PORTBASE"
    [[ "$2" =~ ^[0-9]+$ ]] || die "PORTBASE must be a number, got '$2'"
    command -v patroni >/dev/null && command -v etcd >/dev/null \
        || die "patroni or etcd missing: run 'devstack/stack.sh install'"
    PORTBASE="$2"
    load_state "$1"
    mkdir -p "$DIR"
    if [ -f "$DIR/portbase" ] && [ "$(cat "$DIR/portbase")" != "$PORTBASE" ]; then
        die "$DIR was made with PORTBASE $(cat "$DIR/portbase"): 'pgha.sh down $DIR' and remove it first"
    fi
    echo "$PORTBASE" >"$DIR/portbase"
    open_parents "$DIR"
    chmod 711 "$DIR"
    secrets
    start_etcd
    # The first node bootstraps (initdb) and leads; the second clones from it.
    start_node node1
    until_ok 120 "a leader" leader
    start_node node2
    # Both streaming, one synchronous: only then is a commit on two nodes.
    until_ok 180 "a synchronous replica" bash -c \
        "curl -fsS -o /dev/null --max-time 2 http://127.0.0.1:$(rest_port node1)/sync \
         || curl -fsS -o /dev/null --max-time 2 http://127.0.0.1:$(rest_port node2)/sync"
    bootstrap_roles
    write_env
    migrate
    log "pgha up in $DIR (leader $(leader)); DSN: $(dsn); env: $DIR/env"
    dsn
}

cmd_down() {
    [ $# -eq 1 ] || die "usage: pgha.sh down DIR"
    [ -f "$1/portbase" ] || { log "nothing to stop in $1"; return 0; }
    load_state "$1"
    # The replica first: stopping the leader first would make it promote.
    local first
    first="$(leader || true)"
    local node
    for node in "${NODES[@]}"; do [ "$node" = "$first" ] || stop_node "$node"; done
    [ -n "$first" ] && stop_node "$first"
    if pid_alive "$DIR/etcd/etcd.pid"; then
        local pid i
        pid="$(cat "$DIR/etcd/etcd.pid")"
        kill -TERM "$pid" 2>/dev/null || true
        for ((i = 0; i < 100; i++)); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$pid" 2>/dev/null || true
    fi
    rm -f "$DIR/etcd/etcd.pid"
    log "pgha in $DIR stopped"
}

sync_standby() {  # the node Patroni holds as synchronous standby, or nothing
    local node
    for node in "${NODES[@]}"; do
        if rest_ok "$node" sync; then echo "$node"; return 0; fi
    done
    return 1
}

cmd_switchover() {
    local from to i
    from="$(leader)" || die "no leader"
    to=node1
    [ "$from" = node1 ] && to=node2
    # In synchronous mode Patroni switches over to the synchronous standby
    # only (412 otherwise), and patronictl exits 0 when it refuses: retry
    # until the leader changed.
    for ((i = 0; i < 10; i++)); do
        until_ok 120 "$to as synchronous standby" rest_ok "$to" sync
        patronictl -c "$DIR/$from/patroni.yml" switchover "$SCOPE" --leader "$from" \
            --candidate "$to" --force >>"$DIR/switchover.log" 2>&1 || true
        if grep -q "Switchover failed" "$DIR/switchover.log"; then
            mv "$DIR/switchover.log" "$DIR/switchover-failed.log"
            sleep 1
            continue
        fi
        until_ok 120 "$to leading" rest_ok "$to" primary
        echo "$to"
        return 0
    done
    cat "$DIR/switchover-failed.log" >&2
    die "switchover from $from to $to failed 10 times"
}

main() {
    local cmd="${1:-}"
    shift || true
    case "$cmd" in
        up) cmd_up "$@" ;;
        down) cmd_down "$@" ;;
        kill) [ $# -eq 2 ] || die "usage: pgha.sh kill DIR NODE"; load_state "$1"; node_index "$2" >/dev/null; kill_node "$2" ;;
        start) [ $# -eq 2 ] || die "usage: pgha.sh start DIR NODE"; load_state "$1"; node_index "$2" >/dev/null; start_node "$2" ;;
        leader) [ $# -eq 1 ] || die "usage: pgha.sh leader DIR"; load_state "$1"; leader ;;
        sync) [ $# -eq 1 ] || die "usage: pgha.sh sync DIR"; load_state "$1"; sync_standby ;;
        switchover) [ $# -eq 1 ] || die "usage: pgha.sh switchover DIR"; load_state "$1"; cmd_switchover ;;
        status) [ $# -eq 1 ] || die "usage: pgha.sh status DIR"; load_state "$1"
                patronictl -c "$DIR/node1/patroni.yml" list ;;
        *) die "usage: pgha.sh up DIR PORTBASE | down DIR | kill|start DIR NODE | leader|sync|switchover|status DIR" ;;
    esac
}

main "$@"
