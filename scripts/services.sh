#!/usr/bin/env bash
# Throwaway PostgreSQL 15, Redis 7 and nginx for tests and `make cluster`, all in one
# directory, all on 127.0.0.1 only.
#
#   scripts/services.sh start DIR [pg] [redis] [nginx]   (no names: pg and redis)
#   scripts/services.sh env DIR                           (prints `export K=V` lines)
#   scripts/services.sh stop DIR                          (stops what start started, removes DIR)
#   scripts/services.sh kill DIR pg|redis|nginx [SIGNAL]  (one of them, for outage tests; waits
#                                                          until it is gone; TERM by default)
#
# A second `start DIR pg` (or redis, nginx) after a kill starts that service again on the
# same port with the same data (PostgreSQL's data directory, Redis's append-only file).
#
# start writes DIR/env (KEY=value lines, appended to by each start on the same DIR):
#   TALLY_TEST_PG=postgres://postgres@127.0.0.1:PORT/postgres   (trust auth, superuser)
#   TALLY_TEST_REDIS=redis://127.0.0.1:PORT
#   PG_PORT PG_PID PG_SOCKET_DIR REDIS_PORT REDIS_PID NGINX_PORT NGINX_PID
# nginx runs DIR/nginx.conf (written by the caller, e.g. scripts/cluster.sh) with prefix
# DIR; its listen addresses must all be 127.0.0.1:PORT.
#
# PostgreSQL: initdb + postgres from /usr/lib/postgresql/15/bin (PG_BIN overrides), run as
# the `postgres` user (runuser) when root. Redis: redis-server with the append-only file
# fsynced on every write (--appendonly yes --appendfsync always), no RDB snapshots.
# Ports are picked free by binding 127.0.0.1:0; a start that loses a race retries.
#
# stop signals exactly the PIDs in DIR/env: TERM (SIGINT, PostgreSQL's fast shutdown, for
# postgres, whose TERM waits for every client to disconnect), waits, then KILL.
# TALLY_KEEP_DIR=1 keeps DIR (its logs) after stop.
set -euo pipefail

PG_BIN=${PG_BIN:-/usr/lib/postgresql/15/bin}
REDIS_SERVER=${REDIS_SERVER:-redis-server}
NGINX=${NGINX:-/usr/sbin/nginx}

PROG=services
# shellcheck source=scripts/proc.sh
. "$(dirname "$0")/proc.sh"
usage() { die "usage: $0 start|stop|env DIR [pg] [redis] [nginx] | kill DIR pg|redis|nginx [SIGNAL]"; }

# as_pg CMD...: runs CMD as the postgres user when root (root cannot run PostgreSQL).
as_pg() {
    if [ "$(id -u)" -eq 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

start_pg() {
    [ -x "$PG_BIN/postgres" ] || die "no $PG_BIN/postgres (apt-get install postgresql, or make deps-test)"
    if alive "$(getenv PG_PID)"; then die "PostgreSQL already runs for $DIR (pid $(getenv PG_PID))"; fi
    local pgdir="$DIR/pg"
    mkdir -p "$pgdir"
    if [ "$(id -u)" -eq 0 ]; then
        chown postgres: "$pgdir"
        as_pg test -w "$pgdir" || die "the postgres user cannot write $pgdir (a parent directory is not searchable by it; use a DIR under /tmp)"
    fi
    chmod 700 "$pgdir"
    local port pid ok again=""
    if [ -f "$pgdir/data/PG_VERSION" ]; then
        again=1 # started before in DIR (then killed): same data, same port
    else
        # trust for the superuser on the socket and on 127.0.0.1 only; nothing else may connect
        as_pg "$PG_BIN/initdb" -D "$pgdir/data" -U postgres -E UTF8 --locale=C.UTF-8 \
            --auth-local=trust --auth-host=reject >"$DIR/pg-initdb.log" 2>&1 \
            || { cat "$DIR/pg-initdb.log" >&2; die "initdb failed"; }
        as_pg sh -c "cat >'$pgdir/data/pg_hba.conf'" <<'EOF'
# TYPE  DATABASE  USER      ADDRESS        METHOD
local   all       postgres                 trust
host    all       postgres  127.0.0.1/32   trust
EOF
    fi
    for _try in 1 2 3 4 5; do
        if [ -n "$again" ]; then port=$(getenv PG_PORT); else port=$(free_port); fi
        # fsync and synchronous_commit are on (the defaults, stated so nobody turns them off)
        local run=()
        [ "$(id -u)" -eq 0 ] && run=(runuser -u postgres --)
        "${run[@]}" "$PG_BIN/postgres" -D "$pgdir/data" -p "$port" \
            -c listen_addresses=127.0.0.1 -c unix_socket_directories="$pgdir" \
            -c fsync=on -c synchronous_commit=on -c full_page_writes=on \
            -c max_connections=300 -c logging_collector=off \
            </dev/null >>"$DIR/pg.log" 2>&1 &
        local wrapper=$!
        ok=""
        for _ in $(seq 1 300); do
            if pg_isready -q -h 127.0.0.1 -p "$port" -U postgres -d postgres -t 1; then ok=1; break; fi
            alive "$wrapper" || break
            sleep 0.1
        done
        if [ -n "$ok" ]; then
            # runuser forks: the postmaster's own PID is the first line of postmaster.pid
            # (PG_WRAPPER_PID is runuser's, or the postmaster's when not root)
            pid=$(head -n 1 "$pgdir/data/postmaster.pid")
            alive "$pid" || die "PostgreSQL answers but postmaster.pid names no live process"
            setenv PG_PID "$pid"
            setenv PG_WRAPPER_PID "$wrapper"
            setenv PG_PORT "$port"
            setenv PG_SOCKET_DIR "$pgdir"
            setenv PG_DATA "$pgdir/data"
            setenv TALLY_TEST_PG "postgres://postgres@127.0.0.1:$port/postgres"
            echo "services: PostgreSQL on 127.0.0.1:$port (pid $pid)" >&2
            return 0
        fi
        if alive "$wrapper"; then
            kill -INT "$wrapper" 2>/dev/null || true
            if [ -f "$pgdir/data/postmaster.pid" ]; then kill -INT "$(head -n 1 "$pgdir/data/postmaster.pid")" 2>/dev/null || true; fi
            wait "$wrapper" 2>/dev/null || true
        fi
        if [ -n "$again" ]; then
            # the port or the shared memory of the killed server may still be held briefly
            tail -n 3 "$DIR/pg.log" | grep -q "could not bind\|Address already in use\|shared memory block" || break
            echo "services: PostgreSQL could not start again yet; retrying" >&2
            sleep 1
            continue
        fi
        tail -n 5 "$DIR/pg.log" | grep -q "could not bind\|Address already in use" || break
        echo "services: port $port was taken, trying another" >&2
    done
    tail -n 30 "$DIR/pg.log" >&2
    die "PostgreSQL did not start (log: $DIR/pg.log)"
}

start_redis() {
    command -v "$REDIS_SERVER" >/dev/null || die "no redis-server (apt-get install redis-server, or make deps-test)"
    if alive "$(getenv REDIS_PID)"; then die "Redis already runs for $DIR (pid $(getenv REDIS_PID))"; fi
    mkdir -p "$DIR/redis"
    local port pid ok again
    again=$(getenv REDIS_PORT || true) # started before in DIR (then killed): same port, same AOF
    for _try in 1 2 3 4 5; do
        if [ -n "$again" ]; then port=$again; else port=$(free_port); fi
        "$REDIS_SERVER" --bind 127.0.0.1 --port "$port" --protected-mode yes \
            --appendonly yes --appendfsync always --save "" \
            --dir "$DIR/redis" --daemonize no --logfile "" --unixsocket "" \
            </dev/null >>"$DIR/redis.log" 2>&1 &
        pid=$!
        ok=""
        for _ in $(seq 1 100); do
            if [ "$(redis-cli -h 127.0.0.1 -p "$port" ping 2>/dev/null)" = PONG ]; then ok=1; break; fi
            alive "$pid" || break
            sleep 0.1
        done
        if [ -n "$ok" ] && alive "$pid"; then
            setenv REDIS_PID "$pid"
            setenv REDIS_PORT "$port"
            setenv TALLY_TEST_REDIS "redis://127.0.0.1:$port"
            echo "services: Redis on 127.0.0.1:$port (pid $pid)" >&2
            return 0
        fi
        if alive "$pid"; then kill -TERM "$pid"; wait "$pid" 2>/dev/null || true; fi
        tail -n 5 "$DIR/redis.log" | grep -q "Address already in use" || break
        if [ -n "$again" ]; then
            echo "services: port $port is still held; retrying" >&2
            sleep 1
            continue
        fi
        echo "services: port $port was taken, trying another" >&2
    done
    tail -n 30 "$DIR/redis.log" >&2
    die "Redis did not start (log: $DIR/redis.log)"
}

start_nginx() {
    [ -x "$NGINX" ] || die "no $NGINX (apt-get install nginx-light, or make deps-test)"
    local conf="$DIR/nginx.conf"
    [ -f "$conf" ] || die "no $conf: write the configuration first (see scripts/cluster.sh)"
    if alive "$(getenv NGINX_PID)"; then die "nginx already runs for $DIR (pid $(getenv NGINX_PID))"; fi
    # loopback only: every listen directive must name 127.0.0.1:PORT
    local listens port
    listens=$(sed -n 's/^[[:space:]]*listen[[:space:]]\{1,\}\([^;[:space:]]*\).*/\1/p' "$conf")
    [ -n "$listens" ] || die "$conf has no listen directive"
    for l in $listens; do
        case "$l" in 127.0.0.1:[0-9]*) ;; *) die "$conf listens on $l: only 127.0.0.1:PORT is allowed" ;; esac
    done
    port=$(echo "$listens" | head -n 1 | sed 's/^127\.0\.0\.1://')
    grep -q '^[[:space:]]*daemon[[:space:]]\{1,\}off;' "$conf" || die "$conf must say 'daemon off;' (the PID is the one started)"
    mkdir -p "$DIR/nginx-tmp"
    "$NGINX" -t -q -e "$DIR/nginx-error.log" -c "$conf" -p "$DIR/" || die "nginx -t rejected $conf"
    "$NGINX" -e "$DIR/nginx-error.log" -c "$conf" -p "$DIR/" </dev/null >>"$DIR/nginx.out" 2>&1 &
    local pid=$! ok=""
    for _ in $(seq 1 100); do
        if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then ok=1; break; fi
        alive "$pid" || break
        sleep 0.1
    done
    if [ -z "$ok" ] || ! alive "$pid"; then
        alive "$pid" && { kill -TERM "$pid"; wait "$pid" 2>/dev/null || true; }
        tail -n 20 "$DIR/nginx-error.log" "$DIR/nginx.out" >&2 2>/dev/null || true
        die "nginx did not start on 127.0.0.1:$port"
    fi
    setenv NGINX_PID "$pid"
    setenv NGINX_PORT "$port"
    echo "services: nginx on 127.0.0.1:$port (pid $pid)" >&2
}

cmd=${1:-}
DIR=${2:-}
if [ -z "$cmd" ] || [ -z "$DIR" ]; then usage; fi
shift 2
# absolute, no trailing slash: the form start wrote into DIR/env and command lines
if [ -d "$DIR" ]; then DIR=$(cd "$DIR" && pwd); fi

case "$cmd" in
start)
    mkdir -p "$DIR"
    DIR=$(cd "$DIR" && pwd)
    # marks DIR as ours: stop removes only a directory that has it
    touch "$DIR/.tally-services"
    # the postgres user must reach DIR/pg (mktemp -d makes 0700 directories)
    chmod 711 "$DIR"
    [ $# -gt 0 ] || set -- pg redis
    for s in "$@"; do
        case "$s" in pg | postgres) ;; redis) ;; nginx) ;; *) usage ;; esac
    done
    # on failure, stop what this call started (each start_* cleans up its own failure);
    # DIR and its logs stay
    started=""
    # shellcheck disable=SC2154
    trap 'rc=$?; if [ $rc -ne 0 ]; then for s in $started; do "$0" kill "$DIR" "$s" || true; done; echo "services: start failed (logs in $DIR)" >&2; fi' EXIT
    for s in "$@"; do
        case "$s" in
        pg | postgres) start_pg; started="$started pg" ;;
        redis) start_redis; started="$started redis" ;;
        nginx) start_nginx; started="$started nginx" ;;
        esac
    done
    trap - EXIT
    ;;
env)
    [ -f "$DIR/env" ] || die "no $DIR/env (was '$0 start $DIR' run?)"
    sed -n 's/^\([A-Z_][A-Z0-9_]*\)=\(.*\)$/export \1='"'"'\2'"'"'/p' "$DIR/env"
    ;;
kill)
    [ -f "$DIR/env" ] || die "no $DIR/env"
    name=${1:-}
    sig=${2:-TERM}
    sig=${sig#SIG}
    case "$name" in
    pg | postgres)
        pid=$(getenv PG_PID)
        alive "$pid" || die "PostgreSQL does not run (pid ${pid:-none})"
        # its backends, so that a KILL waits for them too (they exit when the postmaster dies)
        kids=$(pgrep -P "$pid" || true)
        # TERM means "stop": PostgreSQL's fast shutdown is SIGINT (TERM waits for clients)
        if [ "$sig" = TERM ]; then sig=INT; fi
        stop_pid postgres "$pid" "$sig" "$DIR/"
        for k in $kids; do stop_pid "postgres child" "$k" KILL; done
        stop_pid runuser "$(getenv PG_WRAPPER_PID)" TERM "$DIR/"
        ;;
    redis)
        pid=$(getenv REDIS_PID)
        alive "$pid" || die "Redis does not run (pid ${pid:-none})"
        stop_pid redis "$pid" "$sig" "127.0.0.1:$(getenv REDIS_PORT)"
        ;;
    nginx)
        pid=$(getenv NGINX_PID)
        alive "$pid" || die "nginx does not run (pid ${pid:-none})"
        kids=$(pgrep -P "$pid" || true)
        stop_pid nginx "$pid" "$sig" "$DIR/"
        for k in $kids; do stop_pid "nginx worker" "$k" KILL; done
        ;;
    *) usage ;;
    esac
    ;;
stop)
    [ -d "$DIR" ] || { echo "services: no $DIR: nothing to stop" >&2; exit 0; }
    if [ -f "$DIR/env" ]; then
        stop_pid nginx "$(getenv NGINX_PID)" TERM "$DIR/"
        stop_pid redis "$(getenv REDIS_PID)" TERM "127.0.0.1:$(getenv REDIS_PORT)"
        # SIGINT is PostgreSQL's fast shutdown (TERM waits for clients to disconnect)
        stop_pid postgres "$(getenv PG_PID)" INT "$DIR/"
        # the runuser wrapper exits with the postmaster; make sure
        stop_pid runuser "$(getenv PG_WRAPPER_PID)" TERM "$DIR/"
        for v in NGINX_PID PG_PID; do
            p=$(getenv $v)
            if alive "$p" && ours "$p" "$DIR/"; then die "pid $p ($v) still runs; keeping $DIR"; fi
        done
        p=$(getenv REDIS_PID)
        if alive "$p" && ours "$p" "127.0.0.1:$(getenv REDIS_PORT)"; then die "pid $p (REDIS_PID) still runs; keeping $DIR"; fi
    fi
    if [ "${TALLY_KEEP_DIR:-}" = 1 ]; then
        echo "services: kept $DIR" >&2
    elif [ ! -f "$DIR/.tally-services" ]; then
        echo "services: $DIR was not made by '$0 start': not removing it" >&2
    else
        rm -rf "$DIR"
    fi
    ;;
*) usage ;;
esac
