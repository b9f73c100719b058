#!/usr/bin/env bash
# tally scaled out on this machine: PostgreSQL + Redis (scripts/services.sh), N instances
# of `tally serve --store postgres://.../tally --bus redis://...` sharing one secret, and
# nginx load-balancing over them. Everything listens on 127.0.0.1 only.
#
#   scripts/cluster.sh up            make cluster: a new mktemp directory, nginx on
#                                    127.0.0.1:${CLUSTER_PORT:-8090}; the directory is kept
#                                    in .cluster/state (repo root)
#   scripts/cluster.sh down          make cluster-stop: stops exactly what `up` started
#   scripts/cluster.sh start DIR [-- ARGS...]
#                                    the same in DIR (for tests): nginx on a free port unless
#                                    CLUSTER_PORT is set; ARGS go to every `tally serve`;
#                                    prints one JSON line on stdout (URLs, ports, PIDs, secret)
#   scripts/cluster.sh stop DIR      stops what `start DIR` started and removes DIR
#                                    (TALLY_KEEP_DIR=1 keeps it, with the logs)
#   scripts/cluster.sh kill DIR NAME [SIGNAL]
#                                    stops one member (tally-N, pg, redis, nginx) and waits
#                                    until it is gone: TERM (default) cleanly, KILL as a crash
#   scripts/cluster.sh start-one DIR NAME
#                                    starts it again on the same port with the same data
#
# Environment: TALLY_BIN (build/tally), TALLY_WEB_ROOT (web), CLUSTER_INSTANCES (3),
# CLUSTER_PORT, and any TALLY_* option, which every instance reads (e.g.
# TALLY_RATE_LIMITS=off). Logs: DIR/tally-N.log, DIR/nginx-error.log, DIR/nginx-access.log,
# DIR/pg.log, DIR/redis.log. PIDs and ports: DIR/env.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/.." && pwd)
SERVICES="$here/services.sh"
STATE_DIR="$root/.cluster"
STATE="$STATE_DIR/state"
TALLY_BIN=${TALLY_BIN:-$root/build/tally}
WEB_ROOT=${TALLY_WEB_ROOT:-$root/web}
N=${CLUSTER_INSTANCES:-3}

PROG=cluster
# shellcheck source=scripts/proc.sh
. "$here/proc.sh"
# http_status URL: the status code of a GET (000 when nothing answers)
http_status() { curl -s -o /dev/null -m 2 -w '%{http_code}' "$1" 2>/dev/null || true; }

# upstream_servers: the instances, as the server lines of an nginx upstream block
upstream_servers() {
    local i
    for i in $(seq 1 "$N"); do
        echo "        server 127.0.0.1:$(getenv "TALLY_${i}_PORT") max_fails=1 fail_timeout=2s;"
    done
}

write_nginx_conf() {
    local port=$1
    {
        cat <<EOF
# written by scripts/cluster.sh; run as: nginx -c $DIR/nginx.conf -p $DIR/
daemon off;
worker_processes auto;
pid $DIR/nginx.pid;
error_log $DIR/nginx-error.log warn;

events {
    worker_connections 8192;
}

http {
    log_format tally '\$remote_addr [\$time_local] "\$request" \$status \$body_bytes_sent \$request_time '
                     'upstream=\$upstream_addr \$upstream_status \$upstream_response_time';
    access_log $DIR/nginx-access.log tally;
    client_body_temp_path $DIR/nginx-tmp/body;
    proxy_temp_path $DIR/nginx-tmp/proxy;
    fastcgi_temp_path $DIR/nginx-tmp/fastcgi;
    uwsgi_temp_path $DIR/nginx-tmp/uwsgi;
    scgi_temp_path $DIR/nginx-tmp/scgi;
    server_tokens off;

    upstream tally {
$(upstream_servers)
        # idle upstream connections kept open; closed before tally's own 60 s idle
        # timeout so nginx never reuses one tally is closing (a POST on it would be a 502)
        keepalive 128;
        keepalive_timeout 50s;
        keepalive_requests 100000;
    }

    # The ballots of one poll go to one instance (a consistent hash of the poll id; the
    # next one while it is down): its writer then commits them in large batches, where
    # ballots of one poll spread over every instance would contend for the poll's counter
    # rows in PostgreSQL, one small batch at a time. Correctness does not depend on it:
    # any instance takes any ballot exactly once (UNIQUE(poll_id, voter_id)).
    upstream tally_votes {
        hash \$poll consistent;
$(upstream_servers)
        keepalive 128;
        keepalive_timeout 50s;
        keepalive_requests 100000;
    }

    # "Connection: upgrade" for WebSocket, an empty Connection (keep-alive) otherwise
    map \$http_upgrade \$connection_upgrade {
        default upgrade;
        ''      '';
    }

    server {
        listen 127.0.0.1:$port;
        server_name _;

        # tally enforces its own body limit (413); stream bodies to it unbuffered
        client_max_body_size 64m;
        proxy_request_buffering off;

        proxy_http_version 1.1;
        proxy_set_header Host \$http_host;
        proxy_set_header Upgrade \$http_upgrade;
        proxy_set_header Connection \$connection_upgrade;
        proxy_set_header X-Forwarded-For \$proxy_add_x_forwarded_for;
        proxy_set_header X-Forwarded-Proto \$scheme;

        # pass every byte on as it comes (SSE, exports); no response buffering
        proxy_buffering off;
        proxy_cache off;
        proxy_connect_timeout 2s;
        proxy_read_timeout 60s;
        proxy_send_timeout 60s;
        # another instance when one cannot be reached; never a non-idempotent request
        # that was sent (nginx's default; non_idempotent is deliberately not listed)
        proxy_next_upstream error timeout;
        proxy_next_upstream_tries 3;
        proxy_next_upstream_timeout 10s;

        # live results: Server-Sent Events and WebSocket stay open for hours
        location ~ ^/v1/polls/[^/]+/(live|ws)\$ {
            proxy_pass http://tally;
            proxy_read_timeout 24h;
            proxy_send_timeout 24h;
            add_header X-Accel-Buffering no always;
        }

        location ~ ^/v1/polls/(?<poll>[^/]+)/votes\$ {
            proxy_pass http://tally_votes;
        }

        location / {
            proxy_pass http://tally;
        }
    }
}
EOF
    } >"$DIR/nginx.conf"
}

# launch_tally I PORT: starts instance I (tally-I) on PORT (empty: a free one, retried if
# taken) with the cluster's store, bus and secret and DIR/tally-args; waits for /healthz.
launch_tally() {
    local i=$1 want=$2 p pid ok="" try store bus secret
    local extra=()
    store=$(getenv CLUSTER_STORE)
    bus=$(getenv CLUSTER_BUS)
    secret=$(cat "$DIR/secret")
    if [ -s "$DIR/tally-args" ]; then mapfile -t extra <"$DIR/tally-args"; fi
    mkdir -p "$DIR/$i"
    for try in 1 2 3 4 5; do
        if [ -n "$want" ]; then p=$want; else p=$(free_port); fi
        "$TALLY_BIN" serve --listen "127.0.0.1:$p" --data-dir "$DIR/$i" --secret "$secret" \
            --store "$store" --bus "$bus" --instance-id "tally-$i" --web-root "$WEB_ROOT" \
            --trusted-proxies 127.0.0.1 \
            ${extra[@]+"${extra[@]}"} </dev/null >>"$DIR/tally-$i.log" 2>&1 &
        pid=$!
        setenv "TALLY_${i}_PID" "$pid"
        setenv "TALLY_${i}_PORT" "$p"
        for _ in $(seq 1 300); do
            if [ "$(http_status "http://127.0.0.1:$p/healthz")" = 200 ]; then ok=1; break; fi
            alive "$pid" || break
            sleep 0.1
        done
        [ -z "$ok" ] || break
        stop_pid "tally-$i" "$pid" TERM "$DIR/"
        tail -n 5 "$DIR/tally-$i.log" | grep -qi "address already in use" || break
        if [ -n "$want" ]; then
            log "port $p is still held; retrying (try $try)"
            sleep 1
        else
            log "port $p was taken, trying another (try $try)"
        fi
    done
    if [ -z "$ok" ]; then
        tail -n 25 "$DIR/tally-$i.log" >&2 || true
        die "tally-$i did not answer GET /healthz on 127.0.0.1:$p within 30 s (log: $DIR/tally-$i.log)"
    fi
    log "tally-$i on 127.0.0.1:$p (pid $pid)"
}

# start DIR [ARGS...]: everything; on failure stops what it started (keeps DIR's logs)
cluster_start() {
    local port=${CLUSTER_PORT:-}
    [ "$port" != 0 ] || port=""   # 0 or empty: a free port
    [ -x "$TALLY_BIN" ] || die "no tally binary at $TALLY_BIN (run make first)"
    [ -d "$WEB_ROOT" ] || die "no web root at $WEB_ROOT"
    command -v curl >/dev/null || die "needs curl (make deps-test)"
    mkdir -p "$DIR"
    DIR=$(cd "$DIR" && pwd)
    [ ! -f "$DIR/env" ] || die "$DIR/env exists: a cluster already ran there ('$0 stop $DIR' first)"
    # shellcheck disable=SC2154
    trap 'rc=$?; if [ $rc -ne 0 ]; then log "start failed; stopping what runs (logs kept in $DIR)"; export TALLY_KEEP_DIR=1; cluster_stop >&2 || true; [ -z "${FAIL_RM:-}" ] || rm -f "$FAIL_RM"; fi' EXIT

    "$SERVICES" start "$DIR" pg redis
    local pg redis store bus secret i
    pg=$(getenv TALLY_TEST_PG)
    redis=$(getenv TALLY_TEST_REDIS)
    psql -X -q -v ON_ERROR_STOP=1 -d "$pg" -c 'CREATE DATABASE tally' >&2
    store="postgres://postgres@127.0.0.1:$(getenv PG_PORT)/tally"
    bus=$redis
    secret=$(node -e 'console.log(require("crypto").randomBytes(32).toString("hex"))')
    (umask 077 && printf '%s\n' "$secret" >"$DIR/secret")
    setenv CLUSTER_STORE "$store"
    setenv CLUSTER_BUS "$bus"
    setenv CLUSTER_INSTANCES "$N"

    # the extra `tally serve` arguments, kept for start-one (one per line)
    : >"$DIR/tally-args"
    local a
    for a in "$@"; do printf '%s\n' "$a" >>"$DIR/tally-args"; done
    # one at a time, so the first creates the schema before the others look for it
    for i in $(seq 1 "$N"); do
        launch_tally "$i" ""
    done

    [ -n "$port" ] || port=$(free_port)
    write_nginx_conf "$port"
    "$SERVICES" start "$DIR" nginx
    local url="http://127.0.0.1:$port" st=""
    for _ in $(seq 1 100); do
        st=$(http_status "$url/healthz")
        [ "$st" = 200 ] && break
        sleep 0.1
    done
    [ "$st" = 200 ] || die "GET $url/healthz through nginx answered ${st:-nothing}, not 200 (log: $DIR/nginx-error.log)"
    setenv CLUSTER_URL "$url"
    trap - EXIT

    # one JSON line for tests (stdout); everything else went to stderr
    # shellcheck disable=SC2016
    DIR="$DIR" N="$N" SECRET="$secret" node -e '
        const fs = require("fs");
        const env = Object.fromEntries(fs.readFileSync(process.env.DIR + "/env", "utf8").trim().split("\n")
            .map((l) => [l.slice(0, l.indexOf("=")), l.slice(l.indexOf("=") + 1)]));
        const n = Number(process.env.N);
        const instances = [];
        for (let i = 1; i <= n; i++) {
            instances.push({ name: `tally-${i}`, id: `tally-${i}`, url: `http://127.0.0.1:${env[`TALLY_${i}_PORT`]}`,
                port: Number(env[`TALLY_${i}_PORT`]), pid: Number(env[`TALLY_${i}_PID`]),
                data_dir: `${process.env.DIR}/${i}`, log: `${process.env.DIR}/tally-${i}.log` });
        }
        console.log(JSON.stringify({
            dir: process.env.DIR, url: env.CLUSTER_URL, secret: process.env.SECRET,
            store: env.CLUSTER_STORE, bus: env.CLUSTER_BUS, pg: env.TALLY_TEST_PG, redis: env.TALLY_TEST_REDIS,
            instances,
            nginx: { port: Number(env.NGINX_PORT), pid: Number(env.NGINX_PID) },
            postgres: { port: Number(env.PG_PORT), pid: Number(env.PG_PID) },
            redis_server: { port: Number(env.REDIS_PORT), pid: Number(env.REDIS_PID) },
        }));'
}

# stop: nginx first (no new requests), then the instances (each answers what is in flight
# and commits its queue), then Redis and PostgreSQL (scripts/services.sh stop, which
# also removes DIR)
cluster_stop() {
    [ -d "$DIR" ] || { log "no $DIR: nothing to stop"; return 0; }
    if [ -f "$DIR/env" ]; then
        local i pid n
        stop_pid nginx "$(getenv NGINX_PID)" TERM "$DIR/"
        n=$(getenv CLUSTER_INSTANCES)
        for i in $(seq 1 "${n:-$N}"); do
            pid=$(getenv "TALLY_${i}_PID")
            [ -n "$pid" ] || continue
            stop_pid "tally-$i" "$pid" TERM "$DIR/"
        done
    fi
    "$SERVICES" stop "$DIR"
}

# kill NAME [SIGNAL]: one instance (tally-N) or service (pg, redis, nginx), waiting
# until it is gone; TERM (the default) is a clean stop, KILL a crash
cluster_kill() {
    local name=$1 sig=${2:-TERM} i pid
    sig=${sig#SIG}
    case "$name" in
    tally-[0-9]*)
        i=${name#tally-}
        pid=$(getenv "TALLY_${i}_PID")
        [ -n "$pid" ] || die "no instance $name in $DIR"
        if ! { alive "$pid" && ours "$pid" "$DIR/"; }; then die "$name does not run (pid $pid)"; fi
        kill "-$sig" "$pid"
        for _ in $(seq 1 150); do
            # gone: its PID is forgotten, so that start-one never mistakes the PID's next
            # owner (or its unreaped zombie) for it
            alive "$pid" || { setenv "TALLY_${i}_PID" ""; log "$name (pid $pid) is gone (SIG$sig)"; return 0; }
            sleep 0.1
        done
        log "$name (pid $pid) still runs 15 s after SIG$sig; killing it"
        kill -KILL "$pid" 2>/dev/null || true
        for _ in $(seq 1 50); do alive "$pid" || { setenv "TALLY_${i}_PID" ""; return 0; }; sleep 0.1; done
        die "$name (pid $pid) does not die"
        ;;
    pg | postgres | redis | nginx) "$SERVICES" kill "$DIR" "$name" "$sig" ;;
    *) die "kill: no such member: $name (tally-1..tally-$(getenv CLUSTER_INSTANCES), pg, redis, nginx)" ;;
    esac
}

# start-one NAME: starts again what kill stopped, on the same port with the same data
cluster_start_one() {
    local name=$1 i pid
    case "$name" in
    tally-[0-9]*)
        i=${name#tally-}
        [ -n "$(getenv "TALLY_${i}_PORT")" ] || die "no instance $name in $DIR"
        pid=$(getenv "TALLY_${i}_PID")
        if alive "$pid" && ours "$pid" "$DIR/"; then die "$name already runs (pid $pid)"; fi
        launch_tally "$i" "$(getenv "TALLY_${i}_PORT")"
        ;;
    pg | postgres | redis | nginx) "$SERVICES" start "$DIR" "$name" ;;
    *) die "start-one: no such member: $name" ;;
    esac
}

cmd=${1:-}
case "$cmd" in
kill | start-one)
    DIR=${2:-}
    name=${3:-}
    { [ -n "$DIR" ] && [ -n "$name" ]; } || die "usage: $0 kill DIR NAME [SIGNAL] | start-one DIR NAME"
    [ -f "$DIR/env" ] || die "no $DIR/env: no cluster there"
    DIR=$(cd "$DIR" && pwd)
    if [ "$cmd" = kill ]; then cluster_kill "$name" "${4:-TERM}"; else cluster_start_one "$name"; fi
    ;;
start)
    DIR=${2:-}
    [ -n "$DIR" ] || die "usage: $0 start DIR [-- TALLY-SERVE-ARGS...]"
    shift 2
    [ "${1:-}" != -- ] || shift
    cluster_start "$@"
    ;;
stop)
    DIR=${2:-}
    [ -n "$DIR" ] || die "usage: $0 stop DIR"
    if [ -d "$DIR" ]; then DIR=$(cd "$DIR" && pwd); fi
    cluster_stop
    ;;
up)
    if [ -f "$STATE" ]; then
        DIR=$(sed -n 's/^dir=//p' "$STATE")
        if [ -n "$DIR" ] && [ -f "$DIR/env" ] && alive "$(getenv NGINX_PID)"; then
            die "a cluster already runs ($(getenv CLUSTER_URL), $DIR): make cluster-stop first"
        fi
        die "$STATE names a cluster that is not (fully) running: make cluster-stop first"
    fi
    export CLUSTER_PORT=${CLUSTER_PORT:-8090}
    if (exec 3<>"/dev/tcp/127.0.0.1/$CLUSTER_PORT") 2>/dev/null; then
        die "127.0.0.1:$CLUSTER_PORT is in use (CLUSTER_PORT=... make cluster picks another)"
    fi
    DIR=$(mktemp -d /tmp/tally-cluster.XXXXXX)
    mkdir -p "$STATE_DIR"
    printf 'dir=%s\n' "$DIR" >"$STATE"
    FAIL_RM=$STATE   # a failed start removes the state file (and keeps DIR's logs)
    cluster_start >/dev/null
    printf 'dir=%s\nurl=%s\n' "$DIR" "$(getenv CLUSTER_URL)" >"$STATE"
    cat <<EOF

tally cluster: $(getenv CLUSTER_URL)   ($N instances behind nginx)
  instances:  $(for i in $(seq 1 "$N"); do printf 'tally-%s 127.0.0.1:%s (pid %s)  ' "$i" "$(getenv "TALLY_${i}_PORT")" "$(getenv "TALLY_${i}_PID")"; done)
  store:      $(getenv CLUSTER_STORE)
  bus:        $(getenv CLUSTER_BUS)
  secret:     $DIR/secret   (a token: build/tally token --sub NAME --secret \$(cat $DIR/secret))
  logs:       $DIR/tally-N.log, nginx-error.log, nginx-access.log, pg.log, redis.log
  stop:       make cluster-stop
EOF
    ;;
down)
    [ -f "$STATE" ] || { log "no cluster running (no $STATE)"; exit 0; }
    DIR=$(sed -n 's/^dir=//p' "$STATE")
    [ -n "$DIR" ] || die "$STATE names no directory"
    cluster_stop
    rm -f "$STATE"
    rmdir "$STATE_DIR" 2>/dev/null || true
    log "stopped; removed $DIR"
    ;;
*)
    die "usage: $0 up | down | start DIR [-- ARGS...] | stop DIR"
    ;;
esac
