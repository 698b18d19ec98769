# Sourced by stack.sh: the cluster stack of issue 20.
#   stack.sh cluster-up DIR PORTBASE     everything below, made afresh or restarted
#   stack.sh cluster-down DIR            stops all of it (safe on a half-started cluster)
#   stack.sh cluster-kill DIR NODE       kill -9 one node: minio0..minio3, or a host (a, b):
#                                        its Postfix (every process), daemons and S3 balancer
#   stack.sh cluster-start DIR NODE      start that node again (same data, ports and keys)
#
# - Object storage: MinIO in distributed mode, 4 server processes with one drive each
#   (erasure 2+2: writes need 3 nodes, reads 2), S3 API on 127.0.0.1:PORTBASE+30+i,
#   console +40+i.
# - Two Postfix "hosts", a (ports PORTBASE..+12) and b (PORTBASE+15..+27): each a whole
#   stack.sh stack (its own Postfix, postkeep-milter, -policyd, -storage and next-hop sink)
#   in DIR/a and DIR/b. They share the PostgreSQL below (PK_EXTERNAL_PG_DSN), the
#   distributed MinIO (PK_EXTERNAL_S3_ENDPOINT) and the DKIM master, return-path and
#   content keys (DIR/b/dkim is a copy of DIR/a/dkim), so that either host signs any
#   organisation's mail, either sidecar reads any return path, either opens sealed
#   content.
# - Each host reaches MinIO through its own HAProxy (Debian's haproxy) on the host's S3
#   port (hostbase+3), balancing over the four nodes with health checks, as production
#   puts a load balancer (or MinIO's sidekick) beside each client: a single node's
#   address would make that node a single point of failure for the host.
# - PostgreSQL (CLUSTER_PG=patroni, the default): devstack/pgha.sh in DIR/pg, a primary
#   and a synchronous streaming replica under Patroni with etcd (ports PORTBASE+34..+39),
#   which both hosts reach with pgha.sh's libpq multi-host string
#   (target_session_attrs=read-write): a failover needs no reconfiguration, and a
#   committed capture survives the primary's loss.  CLUSTER_PG=single: host a's own
#   PostgreSQL, host b pointed at it (quicker, no failover).
# Layout: DIR/minio/credentials, DIR/minio/d<i>/ (drive), DIR/minio/node<i>.{pid,log};
# DIR/lb/<host>.{cfg,pid,log}; DIR/pg (pgha.sh's); DIR/a, DIR/b (stack dirs, each with
# its env); DIR/cluster.env names every node's ports and files.

CLUSTER_MINIO_NODES=4

cluster_load_state() {  # DIR [PORTBASE]
    DIR="$1"
    case "$DIR" in /*) ;; *) die "DIR must be an absolute path, got '$DIR'" ;; esac
    if [ -n "${2:-}" ]; then
        [[ "$2" =~ ^[0-9]+$ ]] || die "PORTBASE must be a number, got '$2'"
        PORTBASE="$2"
    else
        [ -f "$DIR/portbase" ] || die "$DIR/portbase missing: run 'stack.sh cluster-up $DIR PORTBASE' first"
        PORTBASE="$(cat "$DIR/portbase")"
    fi
    VENV="$(venv_dir)"
    PY="$VENV/bin/python"
}

CLUSTER_HOSTS=(a b)
# haproxy for the hosts' S3 balancers; its service is not started by the install
# (install_pgha's policy-rc.d refuses every start).
PGHA_PACKAGES+=(haproxy)

cluster_minio_port() { echo $((PORTBASE + 30 + $1)); }

cluster_host_base() {  # HOST: its stack's PORTBASE
    case "$1" in
        a) echo "$PORTBASE" ;;
        b) echo $((PORTBASE + 15)) ;;
        *) die "unknown cluster host '$1' (a, b)" ;;
    esac
}

cluster_minio_endpoints() {  # every node's drive, in node order: the same list for each process
    local i eps=""
    for ((i = 0; i < CLUSTER_MINIO_NODES; i++)); do
        eps="$eps http://127.0.0.1:$(cluster_minio_port "$i")$DIR/minio/d$i"
    done
    echo "$eps"
}

# One node. In a container MinIO sees every endpoint as remote (no orchestrator tells it which
# host it is) and waits for peers forever: _MINIO_SERVER_LOCAL=<host:port> marks the endpoint
# whose host equals it as this process's own (cmd/endpoint.go), and MINIO_CI_CD=1 lets it use
# drives on the root disk (cmd/xl-storage.go skips the root-drive check).
cluster_start_minio_node() {  # I
    local i="$1" port
    port="$(cluster_minio_port "$i")"
    mkdir -p "$DIR/minio/d$i"
    if pid_alive "$DIR/minio/node$i.pid"; then
        log "minio node $i already running"
        return 0
    fi
    require_free "$port" "MinIO node $i"
    require_free $((PORTBASE + 40 + i)) "MinIO node $i console"
    # word splitting of the endpoint list is wanted: one argument per drive
    # shellcheck disable=SC2046
    MINIO_ROOT_USER="$MINIO_ROOT_USER" MINIO_ROOT_PASSWORD="$MINIO_ROOT_PASSWORD" \
        MINIO_BROWSER=off MINIO_UPDATE=off MINIO_CI_CD=1 _MINIO_SERVER_LOCAL="127.0.0.1:$port" \
        setsid "$MINIO_BIN" server --quiet \
        --address "127.0.0.1:$port" --console-address "127.0.0.1:$((PORTBASE + 40 + i))" \
        $(cluster_minio_endpoints) \
        >>"$DIR/minio/node$i.log" 2>&1 </dev/null 9>&- &
    echo $! >"$DIR/minio/node$i.pid"
}

cluster_wait_minio() {  # until node 0 reports write quorum (health/cluster 200), 60 s
    local i
    for ((i = 0; i < 600; i++)); do
        curl -fsS -o /dev/null "http://127.0.0.1:$(cluster_minio_port 0)/minio/health/cluster" \
            2>/dev/null && return 0
        sleep 0.1
    done
    die "MinIO cluster without write quorum after 60 s, see $DIR/minio/node*.log"
}

cluster_up_minio() {
    [ -x "$MINIO_BIN" ] || die "$MINIO_BIN missing: run 'stack.sh install'"
    minio_keys
    local i
    for ((i = 0; i < CLUSTER_MINIO_NODES; i++)); do cluster_start_minio_node "$i"; done
    cluster_wait_minio
    make_bucket "127.0.0.1:$(cluster_minio_port 0)" "the MinIO cluster"
}

cluster_down_minio() {
    local i
    for ((i = 0; i < CLUSTER_MINIO_NODES; i++)); do stop_pid "$DIR/minio/node$i.pid" "minio node $i"; done
}

# ---- the hosts' S3 balancers
cluster_lb_config() {  # HOST: DIR/lb/HOST.cfg
    local h="$1" port i
    port=$(($(cluster_host_base "$h") + 3))
    mkdir -p "$DIR/lb"
    {
        cat <<EOF
# HAProxy in front of the cluster's MinIO nodes for host $h (devstack/cluster.sh).
global
    maxconn 1024
defaults
    mode http
    timeout connect 1s
    timeout client 60s
    timeout server 60s
    # A request whose node is down (refused) or dies before answering goes to
    # another node: requests are buffered so that they can be sent again, and
    # postkeep's writes are idempotent PUTs of content-addressed keys.
    option http-buffer-request
    retries 3
    option redispatch 1
    retry-on conn-failure empty-response
frontend s3
    bind 127.0.0.1:$port
    default_backend minio
backend minio
    balance leastconn
    # A node is used while it sees read quorum itself, not merely while it
    # runs: a node just restarted, not yet connected to its peers, cannot
    # serve.  (It does not stop MinIO from answering NoSuchKey now and then
    # through a node just back: tests/test_cluster.py reads again.)
    option httpchk GET /minio/health/cluster/read
    http-check expect status 200
    default-server inter 500ms fastinter 250ms fall 2 rise 2 on-marked-down shutdown-sessions
EOF
        for ((i = 0; i < CLUSTER_MINIO_NODES; i++)); do
            echo "    server node$i 127.0.0.1:$(cluster_minio_port "$i") check"
        done
    } >"$DIR/lb/$h.cfg.tmp"
    mv "$DIR/lb/$h.cfg.tmp" "$DIR/lb/$h.cfg"
    haproxy -c -q -f "$DIR/lb/$h.cfg" || die "haproxy rejects $DIR/lb/$h.cfg"
}

cluster_start_lb() {  # HOST
    local h="$1" port
    command -v haproxy >/dev/null || die "haproxy missing: run 'stack.sh install'"
    port=$(($(cluster_host_base "$h") + 3))
    if pid_alive "$DIR/lb/$h.pid"; then return 0; fi
    cluster_lb_config "$h"
    require_free "$port" "host $h's S3 balancer"
    setsid haproxy -db -f "$DIR/lb/$h.cfg" >>"$DIR/lb/$h.log" 2>&1 </dev/null 9>&- &
    echo $! >"$DIR/lb/$h.pid"
    wait_port "$port" 30 "$DIR/lb/$h.pid" \
        || die "haproxy for host $h not listening on 127.0.0.1:$port, see $DIR/lb/$h.log"
}

# ---- the hosts
cluster_pfdir() { echo "$DIR/$1/postfix/etc"; }

# Every process of host HOST's Postfix instance: master and its children carry
# MAIL_CONFIG (import_environment), which names the instance's config directory.
cluster_postfix_pids() {  # HOST
    local pf p
    pf="$(cluster_pfdir "$1")"
    for p in /proc/[0-9]*; do
        grep -qzxF "MAIL_CONFIG=$pf" "$p/environ" 2>/dev/null && proc_alive "${p#/proc/}" \
            && echo "${p#/proc/}"
    done
    return 0
}

cluster_pg() { echo "${CLUSTER_PG:-patroni}"; }

cluster_up_pg() {  # CLUSTER_PG=patroni: pgha.sh's two nodes and etcd in DIR/pg
    [ "$(cluster_pg)" = patroni ] || return 0
    bash "$REPO/devstack/pgha.sh" up "$DIR/pg" $((PORTBASE + 34)) \
        || die "pgha.sh up $DIR/pg $((PORTBASE + 34)) failed"
    echo patroni >"$DIR/pg-kind"
}

cluster_up_host() {  # HOST
    local h="$1" base pgvars
    base="$(cluster_host_base "$h")"
    local run=(env -u PK_EXTERNAL_PG_DSN -u S3_SERVER
               PK_EXTERNAL_S3_ENDPOINT="127.0.0.1:$((base + 3))"
               PK_EXTERNAL_S3_CREDENTIALS="$DIR/minio/credentials")
    if [ "$h" != a ]; then
        # The keys are host a's: either host signs, reads any return path and opens
        # any sealed content.
        mkdir -p "$DIR/$h/dkim"
        chmod 700 "$DIR/$h/dkim"
        cp -p "$DIR/a/dkim/master.key" "$DIR/a/dkim/return-path.key" "$DIR/a/dkim/system.pem" \
            "$DIR/a/dkim/content-master.key" \
            "$DIR/$h/dkim/"
    fi
    if [ -f "$DIR/pg-kind" ]; then
        # Patroni's PostgreSQL for every host: the multi-host DSN of pgha.sh's env.
        mapfile -t pgvars < <(sed -n "s/^export \(PK_EXTERNAL_PG_[A-Z_]*\)='\(.*\)'\$/\1=\2/p" \
                              "$DIR/pg/env")
        [ ${#pgvars[@]} -ge 2 ] || die "$DIR/pg/env names no PK_EXTERNAL_PG_DSN"
        run+=("${pgvars[@]}")
    elif [ "$h" != a ]; then
        # CLUSTER_PG=single: host a's PostgreSQL.
        run+=(PK_EXTERNAL_PG_DSN="host=127.0.0.1 port=$((PORTBASE + 2)) dbname=postkeep user=postkeep"
              PK_EXTERNAL_PG_PASSWORD_FILE="$DIR/a/secrets/pg-postkeep.password"
              PK_EXTERNAL_PG_PASSFILE="$DIR/a/secrets/pgpass")
    fi
    cluster_start_lb "$h"
    "${run[@]}" bash "$REPO/devstack/stack.sh" up "$DIR/$h" "$base" \
        || die "host $h: stack.sh up $DIR/$h $base failed"
}

cluster_kill() {  # NODE: kill -9, no clean shutdown
    local node="$1" pids=() f
    case "$node" in
        minio[0-9])
            f="$DIR/minio/node${node#minio}.pid"
            if pid_alive "$f"; then pids+=("$(cat "$f")"); fi ;;
        a|b)
            for f in "$DIR/lb/$node.pid" "$DIR/$node"/{milter/milter,policyd/policyd,storage/storage}.pid; do
                if pid_alive "$f"; then pids+=("$(cat "$f")"); fi
            done
            mapfile -t -O "${#pids[@]}" pids < <(cluster_postfix_pids "$node") ;;
        *) die "unknown cluster node '$node' (minio0..minio$((CLUSTER_MINIO_NODES - 1)), a, b)" ;;
    esac
    if [ ${#pids[@]} -eq 0 ]; then log "$node: nothing running"; return 0; fi
    kill -KILL "${pids[@]}" 2>/dev/null || true
    log "$node: killed ${pids[*]}"
}

cluster_start() {  # NODE
    local node="$1" s i
    case "$node" in
        minio[0-9])
            i="${node#minio}"
            cluster_start_minio_node "$i"
            wait_port "$(cluster_minio_port "$i")" 60 "$DIR/minio/node$i.pid" \
                || die "MinIO node $i did not come back, see $DIR/minio/node$i.log" ;;
        a|b)
            cluster_start_lb "$node"
            for s in milter policyd storage postfix; do
                bash "$REPO/devstack/stack.sh" start "$DIR/$node" "$s" \
                    || die "host $node: starting $s failed"
            done ;;
        *) die "unknown cluster node '$node' (minio0..minio$((CLUSTER_MINIO_NODES - 1)), a, b)" ;;
    esac
}

cluster_write_env() {  # DIR/cluster.env: what tests need to find and kill the nodes
    local i h f="$DIR/cluster.env"
    {
        echo "export POSTKEEP_CLUSTER_DIR='$DIR'"
        echo "export POSTKEEP_CLUSTER_MINIO_NODES='$CLUSTER_MINIO_NODES'"
        for ((i = 0; i < CLUSTER_MINIO_NODES; i++)); do
            echo "export POSTKEEP_CLUSTER_MINIO_PORT_$i='$(cluster_minio_port "$i")'"
            echo "export POSTKEEP_CLUSTER_MINIO_PIDFILE_$i='$DIR/minio/node$i.pid'"
        done
        echo "export POSTKEEP_CLUSTER_HOSTS='${CLUSTER_HOSTS[*]}'"
        for h in "${CLUSTER_HOSTS[@]}"; do
            echo "export POSTKEEP_CLUSTER_HOST_${h^^}_ENV='$DIR/$h/env'"
        done
        if [ -f "$DIR/pg-kind" ]; then echo "export POSTKEEP_CLUSTER_PG_DIR='$DIR/pg'"; fi
        echo "export POSTKEEP_S3_ACCESS_KEY='$MINIO_ROOT_USER'"
        echo "export POSTKEEP_S3_SECRET_KEY='$MINIO_ROOT_PASSWORD'"
    } >"$f.tmp"
    chmod 600 "$f.tmp"
    mv "$f.tmp" "$f"
}

cmd_cluster_up() {
    [ $# -eq 2 ] || die "usage: stack.sh cluster-up DIR PORTBASE"
    cluster_load_state "$1" "$2"
    [ -x "$PY" ] || die "venv $VENV missing: run 'stack.sh install' first"
    mkdir -p "$DIR"
    open_parents "$DIR"
    chmod o+x "$DIR"
    echo "$PORTBASE" >"$DIR/portbase"
    cluster_up_minio
    cluster_up_pg
    local h
    for h in "${CLUSTER_HOSTS[@]}"; do cluster_up_host "$h"; done
    cluster_write_env
    log "cluster up in $DIR: hosts a (smtpd 127.0.0.1:$PORTBASE) and b (127.0.0.1:$((PORTBASE + 15))), MinIO nodes 127.0.0.1:$(cluster_minio_port 0).., PostgreSQL $(cluster_pg); env: $DIR/cluster.env"
}

cmd_cluster_node() {  # kill|start DIR NODE
    [ $# -eq 3 ] || die "usage: stack.sh cluster-$1 DIR NODE"
    cluster_load_state "$2"
    minio_keys
    "cluster_$1" "$3"
}

cmd_cluster_down() {
    [ $# -eq 1 ] || die "usage: stack.sh cluster-down DIR"
    [ -f "$1/portbase" ] || { log "nothing to stop in $1"; return 0; }
    cluster_load_state "$1"
    local h pids
    # b first: it uses a's PostgreSQL.  Each step whatever the last one did.
    for h in b a; do
        if [ -f "$DIR/$h/portbase" ]; then
            bash "$REPO/devstack/stack.sh" down "$DIR/$h" || warn "host $h: down failed"
        fi
        # A Postfix whose master was killed -9 leaves no master to stop the rest.
        mapfile -t pids < <(cluster_postfix_pids "$h")
        if [ ${#pids[@]} -gt 0 ]; then kill -KILL "${pids[@]}" 2>/dev/null || true; fi
        stop_pid "$DIR/lb/$h.pid" "haproxy for host $h"
    done
    cluster_down_minio
    if [ -f "$DIR/pg/portbase" ]; then
        bash "$REPO/devstack/pgha.sh" down "$DIR/pg" || warn "pgha.sh down $DIR/pg failed"
    fi
    rm -f "$DIR/pg-kind"
    log "cluster in $DIR stopped"
}
