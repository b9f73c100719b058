#!/usr/bin/env bash
# bench/run.sh: the vote-path and results-read benchmarks, each beside its reference.
#
#   make bench                      # or: bench/run.sh
#   BENCH_SECONDS=20 bench/run.sh   # longer runs
#
# In one invocation, on loopback, with the same wrk settings for every run:
#   1. nginx answering POST /v1/polls/{id}/votes with a static {"status":"recorded"}
#   2. tally recording durable votes (a fresh voter token per request, bench/votes.lua)
#   3. tally serving GET /v1/polls/{id}/results (cached rendering)
#   4. nginx serving the same results bytes as a static file
# then the ratios tally/nginx, and an exactly-once check: the poll's total_votes must equal
# the 200s wrk read plus the votes committed for requests wrk abandoned in flight when its
# timer stopped it (found with GET .../votes/me for the last voters of each thread).
#
# Every run stops by itself after BENCH_SECONDS (default 10). Environment:
#   BENCH_SECONDS      seconds per run (10)
#   BENCH_THREADS      wrk -t (2)
#   BENCH_CONNECTIONS  wrk -c (64)
#   BENCH_TOKENS       voter tokens to mint (150000 x BENCH_SECONDS: more than any run uses)
#   BENCH_IDLE_WAIT    before each run, wait up to this many seconds for the machine to be
#                      idle (30); every run reports the CPU that other processes took meanwhile
#   TALLY_BIN          the server binary (build/tally)
# Installs wrk and nginx-light with apt-get if they are missing; nothing else.
# Starts tally and nginx on free loopback ports with a temporary directory, and stops them
# (by PID) and removes the directory when done, interrupted or failed.

set -euo pipefail

PROG=bench
# shellcheck source=bench/lib.sh
. "$(dirname "$0")/lib.sh" # ROOT SECS THREADS CONNS IDLE_WAIT TALLY_BIN, the helpers
TOKENS=${BENCH_TOKENS:-$((150000 * SECS))}
NGINX_BIN=/usr/sbin/nginx

# ---- tools ---------------------------------------------------------------------------
missing=()
command -v wrk >/dev/null || missing+=(wrk)
[ -x "$NGINX_BIN" ] || missing+=(nginx-light)
install_missing "${missing[@]}"
require python3 curl timeout

# ---- processes we start, and their cleanup ---------------------------------------------
TMP=$(mktemp -d /tmp/tally-bench.XXXXXX)
chmod 755 "$TMP" # nginx workers (user nobody when started as root) read www/ below it
TALLY_PID='' NGINX_PID=''

cleanup() {
    set +e
    stop_pid "$CLIENT_PID"
    stop_pid "$TALLY_PID"
    stop_pid "$NGINX_PID"
    rm -rf "$TMP"
}
trap_cleanup INT TERM

free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}
wait_http() { # URL PID: until URL answers 2xx, or fail if PID exits / 10 s pass
    for _ in $(seq 100); do
        kill -0 "$2" 2>/dev/null || die "server (pid $2) exited while starting"
        curl -sf -o /dev/null "$1" && return 0
        sleep 0.1
    done
    die "$1 did not answer within 10 s"
}

# ---- the nginx processes (CPU accounting: bench/lib.sh) ---------------------------------
nginx_pids() { echo "$NGINX_PID $(cat /proc/$NGINX_PID/task/$NGINX_PID/children 2>/dev/null)"; }

# ---- one wrk run -----------------------------------------------------------------------
# run_wrk NAME SERVER_KIND URL [wrk args...]: writes $TMP/NAME.out and sets R_* results
run_wrk() {
    local name=$1 kind=$2 url=$3; shift 3
    local spids s0 s1 w0 w1 b0 b1 q0 q1 st0 st1 th0='' th1='' started ended
    if [ "$kind" = tally ]; then spids=$TALLY_PID; else spids=$(nginx_pids); fi
    wait_idle
    if [ "$kind" = tally ]; then th0=$(thread_ticks "$TALLY_PID" || true); fi
    # shellcheck disable=SC2086 # one PID a word
    s0=$(proc_ticks $spids); w0=$(child_ticks); read -r b0 q0 st0 < <(sys_ticks); started=$(now)
    run_client "$TMP/$name.out" "wrk failed ($name)" \
        wrk -t"$THREADS" -c"$CONNS" -d"${SECS}s" --latency "$url" "$@"
    ended=$(now)
    # shellcheck disable=SC2086 # one PID a word
    s1=$(proc_ticks $spids); w1=$(child_ticks); read -r b1 q1 st1 < <(sys_ticks)
    if [ "$kind" = tally ]; then th1=$(thread_ticks "$TALLY_PID" || true); fi
    local wall; wall=$(elapsed "$started" "$ended")

    R_RPS=$(awk '/^Requests\/sec:/ { print $2 }' "$TMP/$name.out")
    R_P50=$(wrk_latency "$TMP/$name.out" 50%)
    R_P99=$(wrk_latency "$TMP/$name.out" 99%)
    R_N2XX=$(awk '/Non-2xx or 3xx responses:/ { print $NF }' "$TMP/$name.out")
    R_N2XX=${R_N2XX:-0}
    R_SOCK=$(wrk_socket_errors "$TMP/$name.out")
    R_SRV_CPU=$(cores $((s1 - s0)) "$wall")
    R_WRK_CPU=$(cores $((w1 - w0)) "$wall")
    # Loopback TCP runs in softirq, which the kernel charges both to the task it
    # interrupted (so server and wrk include theirs) and to irq in /proc/stat. "other" is
    # the machine's busy time minus server and wrk: processes that are not part of the
    # benchmark. "steal" is time the hypervisor gave to other guests.
    R_IRQ_CPU=$(cores $((q1 - q0)) "$wall")
    R_OTHER_CPU=$(cores $((b1 - b0 + q1 - q0 - (s1 - s0) - (w1 - w0))) "$wall")
    R_STEAL_CPU=$(cores $((st1 - st0)) "$wall")
    R_WALL=$wall R_THREADS= R_THREAD_US=
    if [ "$kind" = tally ]; then
        local kv tid before d comm reqs
        reqs=$(awk -v r="$R_RPS" -v w="$wall" 'BEGIN { printf "%.0f", r * w }')
        for kv in $th1; do
            tid=${kv%%=*}
            # shellcheck disable=SC2086 # one tid=ticks a word
            before=$(printf '%s\n' $th0 | awk -F= -v t="$tid" '$1 == t { print $2 }')
            d=$((${kv#*=} - ${before:-0}))
            comm=$(cat "/proc/$TALLY_PID/task/$tid/comm" 2>/dev/null || echo gone)
            [ "$tid" = "$TALLY_PID" ] && comm=loop
            R_THREADS+="$comm:$tid $(cores "$d" "$wall") "
            # CPU a request, per thread that did any (the idle worker threads do not)
            [ "$d" -gt 0 ] && R_THREAD_US+="$comm $(awk -v t="$d" -v hz="$HZ" -v n="$reqs" \
                'BEGIN { if (n > 0) printf "%.1f", t / hz * 1e6 / n; else print "n/a" }') us, "
        done
        R_THREAD_US+="all $(awk -v t="$((s1 - s0))" -v hz="$HZ" -v n="$reqs" \
            'BEGIN { if (n > 0) printf "%.1f", t / hz * 1e6 / n; else print "n/a" }') us"
    fi
    echo
    echo "---- $name"
    sed -n '/Thread Stats/,$p' "$TMP/$name.out"
    echo "CPU over the run (cores): server $R_SRV_CPU, wrk $R_WRK_CPU, other processes $R_OTHER_CPU, steal $R_STEAL_CPU (softirq in all: $R_IRQ_CPU)"
    [ -n "$R_THREADS" ] && echo "tally threads (cores): $R_THREADS"
    [ -n "$R_THREAD_US" ] && echo "tally CPU a request: $R_THREAD_US"
    note_busy "$name" "$R_OTHER_CPU" "$R_STEAL_CPU"
}

non200() { # FILE: the non-200 count votes.lua printed
    awk '/^votes:/ { for (i = 1; i <= NF; i++) if ($i == "non-200") print $(i + 1) }' "$1" | tr -d ','
}

# ---- machine -----------------------------------------------------------------------------
print_header bench
echo "tools: $(wrk -v 2>&1 | head -1 | cut -d' ' -f1-2), $("$NGINX_BIN" -v 2>&1 | cut -d' ' -f3)"
print_tally_line
echo "runs: wrk -t$THREADS -c$CONNS -d${SECS}s --latency, loopback"

# ---- tally -------------------------------------------------------------------------------
SECRET=$(python3 -c 'import secrets; print(secrets.token_hex(24))')
TPORT=$(free_port)
mkdir -p "$TMP/data"
"$TALLY_BIN" serve --listen "127.0.0.1:$TPORT" --data-dir "$TMP/data" --secret "$SECRET" \
    "${TALLY_FLAGS[@]}" >"$TMP/tally.log" 2>&1 &
TALLY_PID=$!
wait_http "http://127.0.0.1:$TPORT/readyz" "$TALLY_PID"

create_poll "http://127.0.0.1:$TPORT" "$TMP/data" "$SECRET"
mint_tokens "$SECRET" "$TOKENS" "$TMP/tokens.txt"

# ---- nginx -------------------------------------------------------------------------------
NPORT=$(free_port)
NG=$TMP/nginx
mkdir -p "$NG/www/v1/polls/$POLL" "$NG/tmp" "$NG/logs"
temp_paths=
for kind in $("$NGINX_BIN" -V 2>&1 | grep -o -- '--http-[a-z-]*-temp-path' | sed 's/--http-//; s/-temp-path//'); do
    d=${kind//-/_}; mkdir -p "$NG/tmp/$d"
    case $d in client_body) temp_paths+="client_body_temp_path $NG/tmp/$d; " ;;
               *) temp_paths+="${d}_temp_path $NG/tmp/$d; " ;; esac
done
cat >"$NG/nginx.conf" <<EOF
worker_processes 2;
pid $NG/nginx.pid;
error_log $NG/logs/error.log warn;
events { worker_connections 1024; }
http {
    access_log off;
    sendfile on;
    tcp_nopush on;
    keepalive_timeout 65;
    keepalive_requests 100000000;
    default_type application/json;
    $temp_paths
    server {
        listen 127.0.0.1:$NPORT;
        root $NG/www;
        location / {
            if (\$request_method = POST) {
                return 200 '{"status":"recorded"}';
            }
        }
    }
}
EOF
"$NGINX_BIN" -p "$NG" -e "$NG/logs/error.log" -c "$NG/nginx.conf" -g 'daemon off;' &
NGINX_PID=$!
echo '{}' >"$NG/www/ping"
wait_http "http://127.0.0.1:$NPORT/ping" "$NGINX_PID"

# ---- 1 and 2: the vote path -------------------------------------------------------------
VOTE_PATH=/v1/polls/$POLL/votes
run_wrk nginx-post nginx "http://127.0.0.1:$NPORT$VOTE_PATH" -s "$ROOT/bench/votes.lua" \
    -- "$TMP/tokens.txt" "$THREADS" "$OPTS"
N_POST_RPS=$R_RPS N_POST_P50=$R_P50 N_POST_P99=$R_P99 N_POST_CPU=$R_SRV_CPU N_POST_WCPU=$R_WRK_CPU N_POST_OCPU=$R_OTHER_CPU N_POST_ICPU=$R_IRQ_CPU
N_POST_BAD=$(non200 "$TMP/nginx-post.out")
sleep 1

# the store's own figures around the vote run (/metrics) and the bytes tally had the
# kernel write to storage (/proc/PID/io write_bytes)
metric() { awk -v m="$1" '$1 == m { printf "%.0f", $2 }' "$2"; }
curl -sf "http://127.0.0.1:$TPORT/metrics" >"$TMP/metrics.0"
IO0=$(awk '/^write_bytes:/ { print $2 }' "/proc/$TALLY_PID/io")
export BENCH_VOTES_REPORT=$TMP/votes.report
run_wrk tally-post tally "http://127.0.0.1:$TPORT$VOTE_PATH" -s "$ROOT/bench/votes.lua" \
    -- "$TMP/tokens.txt" "$THREADS" "$OPTS"
unset BENCH_VOTES_REPORT
T_POST_RPS=$R_RPS T_POST_P50=$R_P50 T_POST_P99=$R_P99 T_POST_CPU=$R_SRV_CPU T_POST_WCPU=$R_WRK_CPU T_POST_OCPU=$R_OTHER_CPU T_POST_ICPU=$R_IRQ_CPU
T_POST_THREADS=$R_THREADS T_POST_SOCK=$R_SOCK T_POST_US=$R_THREAD_US T_POST_WALL=$R_WALL
IO1=$(awk '/^write_bytes:/ { print $2 }' "/proc/$TALLY_PID/io")
curl -sf "http://127.0.0.1:$TPORT/metrics" >"$TMP/metrics.1"
T_POST_BAD=$(non200 "$TMP/tally-post.out")
grep -q 'TOKENS EXHAUSTED' "$TMP/tally-post.out" && echo "WARNING: raise BENCH_TOKENS"

# exactly-once: wait until the count stops moving (commits of the last batch), then account
prev=-1
for _ in $(seq 50); do
    TOTAL=$(total_votes "http://127.0.0.1:$TPORT"); [ "$TOTAL" = "$prev" ] && break; prev=$TOTAL; sleep 0.2
done
EXACT=$(python3 "$ROOT/bench/account.py" "$TMP/votes.report" "$TMP/tokens.txt" \
    "http://127.0.0.1:$TPORT" "$POLL" "$TOTAL") || EXACT="FAILED: $EXACT"
echo
echo "---- exactly-once"
echo "$EXACT"

# per ballot: the WAL the commits appended, what reached storage, the commits (one fsync
# of the WAL each) and checkpoints; and the backlog behind the durability point (WAL not
# yet copied back into the database) when the run ended, in bytes and in seconds of
# this run's WAL rate
curl -sf "http://127.0.0.1:$TPORT/metrics" >"$TMP/metrics.2"
STORE=$(awk -v total="$TOTAL" -v wall="$T_POST_WALL" \
    -v wal0="$(metric tally_store_wal_bytes_total "$TMP/metrics.0")" -v wal1="$(metric tally_store_wal_bytes_total "$TMP/metrics.1")" \
    -v c0="$(metric tally_store_batch_size_count "$TMP/metrics.0")" -v c1="$(metric tally_store_batch_size_count "$TMP/metrics.1")" \
    -v k0="$(metric tally_store_checkpoints_total "$TMP/metrics.0")" -v k1="$(metric tally_store_checkpoints_total "$TMP/metrics.1")" \
    -v cs0="$(awk '$1 == "tally_store_commit_seconds_sum" { print $2 }' "$TMP/metrics.0")" \
    -v cs1="$(awk '$1 == "tally_store_commit_seconds_sum" { print $2 }' "$TMP/metrics.1")" \
    -v io="$((IO1 - IO0))" -v backlog="$(metric tally_store_checkpoint_backlog_bytes "$TMP/metrics.1")" \
    -v backlog2="$(metric tally_store_checkpoint_backlog_bytes "$TMP/metrics.2")" '
    BEGIN {
        n = total > 0 ? total : 1; rate = (wal1 - wal0) / wall
        printf "WAL %.0f B/ballot, written to storage %.0f B/ballot, commits (WAL fsyncs) %.4f/ballot (%.1f ballots a commit, %.2f ms each on average), checkpoints %d; ", \
            (wal1 - wal0) / n, io / n, (c1 - c0) / n, (c1 > c0 ? n / (c1 - c0) : 0), (c1 > c0 ? (cs1 - cs0) * 1000 / (c1 - c0) : 0), k1 - k0
        printf "checkpoint backlog at the end %.1f MiB (%.2f s of this run'"'"'s WAL), %.1f MiB a few seconds later", \
            backlog / 1048576, (rate > 0 ? backlog / rate : 0), backlog2 / 1048576
    }')
echo
echo "---- the store during the vote run"
echo "$STORE"
sleep 1

# ---- 3 and 4: results reads -------------------------------------------------------------
RESULTS_PATH=/v1/polls/$POLL/results
curl -sf "http://127.0.0.1:$TPORT$RESULTS_PATH" >"$NG/www$RESULTS_PATH"
echo "results body: $(wc -c <"$NG/www$RESULTS_PATH") bytes (nginx serves the same bytes as a file)"
run_wrk tally-results tally "http://127.0.0.1:$TPORT$RESULTS_PATH"
T_GET_RPS=$R_RPS T_GET_P50=$R_P50 T_GET_P99=$R_P99 T_GET_BAD=$R_N2XX T_GET_CPU=$R_SRV_CPU T_GET_WCPU=$R_WRK_CPU T_GET_OCPU=$R_OTHER_CPU T_GET_ICPU=$R_IRQ_CPU
T_GET_THREADS=$R_THREADS
sleep 1
run_wrk nginx-file nginx "http://127.0.0.1:$NPORT$RESULTS_PATH"
N_GET_RPS=$R_RPS N_GET_P50=$R_P50 N_GET_P99=$R_P99 N_GET_BAD=$R_N2XX N_GET_CPU=$R_SRV_CPU N_GET_WCPU=$R_WRK_CPU N_GET_OCPU=$R_OTHER_CPU N_GET_ICPU=$R_IRQ_CPU

# ---- summary -----------------------------------------------------------------------------
echo
echo "== summary: wrk -t$THREADS -c$CONNS -d${SECS}s on $(nproc) CPUs (server and wrk share them)"
echo "CPU columns: cores used over the run by the server and wrk (each including the softirq work charged to it), by processes not in the benchmark (other), and softirq in all (irq)"
printf '%-34s %10s %9s %9s %8s %7s %7s %7s %7s\n' run req/s p50 p99 non-2xx server wrk other irq
row() { printf '%-34s %10s %9s %9s %8s %7s %7s %7s %7s\n' "$@"; }
row "nginx static POST (reference)" "$N_POST_RPS" "$N_POST_P50" "$N_POST_P99" "${N_POST_BAD:-?}" "$N_POST_CPU" "$N_POST_WCPU" "$N_POST_OCPU" "$N_POST_ICPU"
row "tally POST vote (durable)" "$T_POST_RPS" "$T_POST_P50" "$T_POST_P99" "${T_POST_BAD:-?}" "$T_POST_CPU" "$T_POST_WCPU" "$T_POST_OCPU" "$T_POST_ICPU"
row "nginx static file GET (reference)" "$N_GET_RPS" "$N_GET_P50" "$N_GET_P99" "$N_GET_BAD" "$N_GET_CPU" "$N_GET_WCPU" "$N_GET_OCPU" "$N_GET_ICPU"
row "tally GET results (cached)" "$T_GET_RPS" "$T_GET_P50" "$T_GET_P99" "$T_GET_BAD" "$T_GET_CPU" "$T_GET_WCPU" "$T_GET_OCPU" "$T_GET_ICPU"
echo "tally threads during votes (cores): $T_POST_THREADS"
echo "tally CPU a vote: $T_POST_US"
echo "tally store a vote: $STORE"
echo "tally threads during results (cores): $T_GET_THREADS"
[ -n "$T_POST_SOCK" ] && echo "tally votes: $T_POST_SOCK"
echo "ratio tally votes/s / nginx static POST/s:  $(ratio "$T_POST_RPS" "$N_POST_RPS")"
echo "ratio tally results/s / nginx static GET/s: $(ratio "$T_GET_RPS" "$N_GET_RPS")"
echo "exactly-once: $EXACT"
busy_warning "both servers"

case $EXACT in OK*) ;; *) exit 1 ;; esac
