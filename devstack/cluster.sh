# Sourced by stack.sh: the cluster stack of issue 20 (first step: the object store).
#   stack.sh cluster-up DIR PORTBASE    4 MinIO server processes, one drive each, erasure 2+2
#   stack.sh cluster-down DIR
# Ports on 127.0.0.1: PORTBASE+30+i MinIO S3 API of node i (0..3), PORTBASE+40+i its console.
# Layout: DIR/minio/credentials, DIR/minio/d<i>/ (drive), DIR/minio/node<i>.{pid,log}; DIR/cluster.env.
# Not yet here: PostgreSQL and the two Postfix hosts (see BENCHMARKS.md / the issue).

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

cluster_minio_port() { echo $((PORTBASE + 30 + $1)); }

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
    "$PY" - "127.0.0.1:$(cluster_minio_port 0)" "$MINIO_ROOT_USER" "$MINIO_ROOT_PASSWORD" <<'PYEOF' \
        || die "creating bucket postkeep failed"
import sys
from minio import Minio
c = Minio(sys.argv[1], access_key=sys.argv[2], secret_key=sys.argv[3], secure=False)
if not c.bucket_exists("postkeep"):
    c.make_bucket("postkeep")
PYEOF
}

cluster_down_minio() {
    local i
    for ((i = 0; i < CLUSTER_MINIO_NODES; i++)); do stop_pid "$DIR/minio/node$i.pid" "minio node $i"; done
}

cluster_write_env() {  # DIR/cluster.env: what tests need to find and kill the nodes
    local i f="$DIR/cluster.env"
    {
        echo "export POSTKEEP_CLUSTER_DIR='$DIR'"
        echo "export POSTKEEP_CLUSTER_MINIO_NODES=$CLUSTER_MINIO_NODES"
        for ((i = 0; i < CLUSTER_MINIO_NODES; i++)); do
            echo "export POSTKEEP_CLUSTER_MINIO_PORT_$i=$(cluster_minio_port "$i")"
            echo "export POSTKEEP_CLUSTER_MINIO_PIDFILE_$i='$DIR/minio/node$i.pid'"
        done
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
    echo "$PORTBASE" >"$DIR/portbase"
    cluster_up_minio
    cluster_write_env
    log "cluster up in $DIR (MinIO nodes on 127.0.0.1:$(cluster_minio_port 0)..); env: $DIR/cluster.env"
}

cmd_cluster_down() {
    [ $# -eq 1 ] || die "usage: stack.sh cluster-down DIR"
    [ -f "$1/portbase" ] || { log "nothing to stop in $1"; return 0; }
    cluster_load_state "$1"
    cluster_down_minio
    log "cluster in $DIR stopped"
}
