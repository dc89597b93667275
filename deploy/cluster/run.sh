#!/usr/bin/env bash
# Local beach-road cluster: one redis-server, N beach-road instances sharing it, HAProxy in front.
# Everything binds 127.0.0.1 on free ports; Ctrl-C (or any exit) stops all that this script started.
#
#   deploy/cluster/run.sh [-n N] [--no-build] [--smoke]
#
#   -n N        number of beach-road instances (default 3, or $INSTANCES)
#   --no-build  skip `cargo build --release` (also implied by BEACH_ROAD_BIN=/path/to/beach-road)
#   --smoke     start everything, run a few requests through the load balancer, stop, exit 0/1
#
# Environment: LB_PORT (fixed load balancer port), CLUSTER_DIR (work dir for configs and logs,
# default a new mktemp dir), CLUSTER_DRAIN_DELAY / CLUSTER_DRAIN_JITTER (default 3s / 1s),
# CLUSTER_REDIS_MAXMEMORY (default 256mb), CARGO_TARGET_DIR (where the build puts the binary),
# BEACH_ROAD_BIN.
# Requires: cargo (unless a binary is given), redis-server, haproxy, curl.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/../.." && pwd)

instances=${INSTANCES:-3}
build=1
smoke=0
while (($#)); do
    case $1 in
        -n) instances=${2:?-n needs a number}; shift 2 ;;
        --no-build) build=0; shift ;;
        --smoke) smoke=1; shift ;;
        -h|--help) sed -n '2,/^# Requires/p' "$0"; exit 0 ;;
        *) echo "run.sh: unknown argument: $1" >&2; exit 2 ;;
    esac
done
[[ $instances =~ ^[1-9][0-9]*$ ]] || { echo "run.sh: -n wants a positive number" >&2; exit 2; }

for tool in redis-server haproxy curl; do
    command -v "$tool" >/dev/null || { echo "run.sh: $tool not found (apt-get install redis-server haproxy curl)" >&2; exit 1; }
done

# --- state and cleanup ------------------------------------------------------------------------
road_pids=()
haproxy_pid=
redis_pid=
workdir=${CLUSTER_DIR:-$(mktemp -d "${TMPDIR:-/tmp}/beach-road-cluster.XXXXXX")}
mkdir -p "$workdir"
drain_delay=${CLUSTER_DRAIN_DELAY:-3s}
drain_jitter=${CLUSTER_DRAIN_JITTER:-1s}

# Wait up to $1 seconds for pid $2 to exit.
wait_gone() {
    local deadline=$((SECONDS + $1))
    while kill -0 "$2" 2>/dev/null && ((SECONDS < deadline)); do sleep 0.2; done
    ! kill -0 "$2" 2>/dev/null
}

stop() {
    local pid name=$1 grace=$2
    shift 2
    for pid in "$@"; do kill -TERM "$pid" 2>/dev/null || true; done
    for pid in "$@"; do
        if ! wait_gone "$grace" "$pid"; then
            echo "run.sh: $name $pid did not stop within ${grace}s, killing it" >&2
            kill -KILL "$pid" 2>/dev/null || true
        fi
    done
}

cleaned=0
cleanup() {
    ((cleaned)) && return
    cleaned=1
    trap '' INT TERM
    echo "run.sh: stopping cluster" >&2
    # Order matters: instances first (they drain, and need Redis to leave their rooms properly),
    # then the load balancer, then Redis.
    if ((${#road_pids[@]})); then
        stop beach-road $(( ${drain_delay%s} + ${drain_jitter%s} + 10 )) "${road_pids[@]}"
    fi
    [[ -n $haproxy_pid ]] && stop haproxy 5 "$haproxy_pid"
    [[ -n $redis_pid ]] && stop redis-server 5 "$redis_pid"
    echo "run.sh: stopped; configs and logs kept in $workdir" >&2
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# Children run in their own session (setsid, which execs in place so $! is the real pid): a
# Ctrl-C in the terminal then reaches only this script, which stops them in the right order.
spawn() {
    local log=$1
    shift
    setsid "$@" >"$log" 2>&1 </dev/null &
}

# --- free loopback ports ----------------------------------------------------------------------
taken=" "
port_busy() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
free_port() {
    local p
    while :; do
        p=$((20000 + (RANDOM * 32768 + RANDOM) % 40000))
        [[ $taken == *" $p "* ]] && continue
        port_busy "$p" && continue
        taken+="$p "
        echo "$p"
        return
    done
}

# Wait until command "$@" succeeds, for at most $1 seconds.
wait_for() {
    local secs=$1 deadline
    shift
    deadline=$((SECONDS + secs))
    until "$@" >/dev/null 2>&1; do
        ((SECONDS < deadline)) || return 1
        sleep 0.2
    done
}

# --- (a) build --------------------------------------------------------------------------------
if [[ -n ${BEACH_ROAD_BIN:-} ]]; then
    bin=$BEACH_ROAD_BIN
else
    if ((build)); then
        echo "run.sh: cargo build --release" >&2
        (cd "$root" && cargo build --release)
    fi
    bin=${CARGO_TARGET_DIR:-$root/target}/release/beach-road
    [[ $bin == /* ]] || bin=$root/$bin
fi
[[ -x $bin ]] || { echo "run.sh: no executable at $bin" >&2; exit 1; }

# --- (b) redis --------------------------------------------------------------------------------
if [[ -n ${LB_PORT:-} ]]; then
    lb_port=$LB_PORT
    taken+="$lb_port "
else
    lb_port=$(free_port)
fi
redis_port=$(free_port)
redis_ping() { (exec 3<>"/dev/tcp/127.0.0.1/$redis_port" && printf 'PING\r\n' >&3 && read -r -t 1 reply <&3 && [[ $reply == +PONG* ]]); }
# noeviction, as beach-road requires: a full Redis refuses new writes (new sessions get 503)
# instead of evicting other users' sessions and rooms.
spawn "$workdir/redis.log" redis-server --bind 127.0.0.1 --port "$redis_port" \
    --save '' --appendonly no --dir "$workdir" \
    --maxmemory "${CLUSTER_REDIS_MAXMEMORY:-256mb}" --maxmemory-policy noeviction
redis_pid=$!
wait_for 10 redis_ping || { echo "run.sh: redis did not start, see $workdir/redis.log" >&2; exit 1; }

# --- (c) beach-road instances -----------------------------------------------------------------
# One server secret for all instances (HMAC key of join codes): with one each, a code registered
# through one instance would fail on the others. A file, so that it shows in no process listing.
secret_file=$workdir/secret
(umask 077 && head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$secret_file")
ports=()
for ((i = 1; i <= instances; i++)); do
    port=$(free_port)
    ports+=("$port")
    spawn "$workdir/road$i.log" env \
        BEACH_ROAD_BIND=127.0.0.1 \
        BEACH_ROAD_PORT="$port" \
        REDIS_URL="redis://127.0.0.1:$redis_port" \
        BEACH_SESSION_SERVER="http://127.0.0.1:$lb_port" \
        BEACH_ROAD_SECRET_FILE="$secret_file" \
        BEACH_ROAD_TRUSTED_PROXIES=127.0.0.1 \
        BEACH_ROAD_DRAIN_DELAY="$drain_delay" \
        BEACH_ROAD_DRAIN_JITTER="$drain_jitter" \
        BEACH_ROAD_TRUSTED_PROXIES=127.0.0.1 \
        "$bin"
    road_pids+=("$!")
done
for ((i = 1; i <= instances; i++)); do
    wait_for 20 curl -fsS --max-time 1 "http://127.0.0.1:${ports[i - 1]}/health" ||
        { echo "run.sh: instance road$i did not come up, see $workdir/road$i.log" >&2; exit 1; }
done

# --- (d) haproxy ------------------------------------------------------------------------------
stats_port=$(free_port)
servers=
for ((i = 1; i <= instances; i++)); do
    servers+="    server road$i 127.0.0.1:${ports[i - 1]} check"$'\n'
done
template=$(<"$here/haproxy.cfg.template")
template=${template//@LB_PORT@/$lb_port}
template=${template//@STATS_PORT@/$stats_port}
template=${template//@WORKDIR@/$workdir}
template=${template//@SERVERS@/${servers%$'\n'}}
printf '%s\n' "$template" >"$workdir/haproxy.cfg"
haproxy -c -q -f "$workdir/haproxy.cfg" || { echo "run.sh: bad $workdir/haproxy.cfg" >&2; exit 1; }
spawn "$workdir/haproxy.log" haproxy -db -f "$workdir/haproxy.cfg"
haproxy_pid=$!
wait_for 10 curl -fsS --max-time 1 "http://127.0.0.1:$lb_port/health" ||
    { echo "run.sh: haproxy does not answer, see $workdir/haproxy.log" >&2; exit 1; }

# --- (e) URLs ---------------------------------------------------------------------------------
cat <<INFO
beach-road cluster is up ($instances instances, Redis, HAProxy)
  load balancer  http://127.0.0.1:$lb_port        (BEACH_SESSION_SERVER of every instance)
  WebSockets     ws://127.0.0.1:$lb_port/ws/{id}
  HAProxy stats  http://127.0.0.1:$stats_port/
  redis          redis://127.0.0.1:$redis_port     (pid $redis_pid)
INFO
for ((i = 1; i <= instances; i++)); do
    echo "  road$i          http://127.0.0.1:${ports[i - 1]}  (pid ${road_pids[i - 1]})"
done
cat <<INFO
  logs, config   $workdir
Point beach clients at http://127.0.0.1:$lb_port; kill -9 or kill -STOP an instance pid
to watch failover; Ctrl-C stops everything.
INFO

# --- smoke test -------------------------------------------------------------------------------
if ((smoke)); then
    lb=http://127.0.0.1:$lb_port
    fail() { echo "smoke: FAIL: $*" >&2; exit 1; }
    # /ready through the LB goes 200 once HAProxy has marked the instances up (rise 2 x 1s).
    wait_for 15 curl -fsS --max-time 2 "$lb/ready" || fail "/ready through the load balancer"
    id=$(</proc/sys/kernel/random/uuid)
    reply=$(curl -fsS --max-time 5 -H 'content-type: application/json' \
        -d "{\"session_id\":\"$id\"}" "$lb/sessions") || fail "POST /sessions"
    [[ $reply == *'"success":true'* ]] || fail "POST /sessions answered: $reply"
    [[ $reply == *"ws://127.0.0.1:$lb_port/ws/"* ]] || fail "websocket_url is not the load balancer's: $reply"
    # Round robin sends consecutive requests to different instances: each must see the session.
    for ((k = 0; k < 2 * instances; k++)); do
        reply=$(curl -fsS --max-time 5 "$lb/sessions/$id") || fail "GET /sessions/$id"
        [[ $reply == *'"exists":true'* ]] || fail "request $k did not see the session: $reply"
    done
    # The whole flow (register, two sockets, relays both ways, the mailbox) through the balancer.
    "$bin" check --url "$lb" || fail "beach-road check through the load balancer"
    echo "smoke: OK (session registered through the LB and seen by $((2 * instances)) round-robin requests; check passed)"
    exit 0
fi

# --- (f) run until Ctrl-C or until haproxy exits ----------------------------------------------
wait "$haproxy_pid" || true
echo "run.sh: haproxy exited" >&2
