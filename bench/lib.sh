# shellcheck shell=bash
# bench/lib.sh: helpers shared by the shell benchmarks bench/run.sh (make bench) and
# bench/cluster.sh (make bench-cluster), which source it (it is not run by itself).
# The sourcing script sets PROG, the name its messages start with ("bench",
# "bench-cluster"), before sourcing it, and defines cleanup (run on exit, see
# trap_cleanup). Sourcing it sets the settings both scripts share (below) and defines:
#   die, install_missing, require, stop_pid, trap_cleanup            setup and cleanup
#   stat_fields, proc_ticks, tree_ticks, thread_ticks, child_ticks,
#   sys_ticks, wait_idle, cores, note_busy, busy_warning             CPU from /proc
#   now, elapsed, secs_since, utc, ratio                             time and figures
#   print_header, print_tally_line                                   the first lines
#   create_poll, mint_tokens, total_votes                            the poll and voters
#   run_client, wrk_latency, wrk_socket_errors                       wrk and pgbench runs

# ---- settings (environment: see the scripts' headers) ---------------------------------
# shellcheck disable=SC2034 # used by the scripts that source this file
{
    ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
    SECS=${BENCH_SECONDS:-10}
    THREADS=${BENCH_THREADS:-2}
    CONNS=${BENCH_CONNECTIONS:-64}
    IDLE_WAIT=${BENCH_IDLE_WAIT:-30}
    TALLY_BIN=${TALLY_BIN:-$ROOT/build/tally}
    HZ=$(getconf CLK_TCK)
    CLIENT_PID= # the wrk or pgbench running now (run_client), for cleanup
    BUSY_WARN=  # the runs during which other processes were busy (note_busy)
    # Rate limits off: every vote here comes from one address, and the limits are not what
    # is measured (with them on, the same runs gave the same figures within the noise).
    TALLY_FLAGS=(--rate-limits off --log-level warn)
    TALLY_ENV=$(env | grep '^TALLY_' | grep -v '^TALLY_BIN=' | tr '\n' ' ' || true) # e.g. TALLY_BATCH_MAX=...
    TALLY_FLAGS_TEXT="${TALLY_FLAGS[*]}${TALLY_ENV:+ + environment $TALLY_ENV}"
    # everything that shapes a run: the server, the cluster and service scripts, the bench
    src_state=$(git -C "$ROOT" status --porcelain -- src scripts bench 2>/dev/null | grep -q . &&
        echo "src/, scripts/ or bench/ modified" || echo "src/, scripts/, bench/ as committed")
    COMMIT="$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown) ($src_state)"
}

die() { echo "$PROG: $*" >&2; exit 1; }

# ---- tools ---------------------------------------------------------------------------
# install_missing PKG...: installs the Debian packages with apt-get (with none, does
# nothing). Only the binaries are wanted: a policy-rc.d keeps the packages' scripts from
# starting daemons (nginx, PostgreSQL, Redis) meanwhile.
install_missing() {
    [ $# -gt 0 ] || return 0
    echo "$PROG: installing $*"
    local sudo='' policy='' rc=0
    [ "$(id -u)" -eq 0 ] || sudo=sudo
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\nexit 101\n' | $sudo tee /usr/sbin/policy-rc.d >/dev/null
        $sudo chmod +x /usr/sbin/policy-rc.d
        policy=1
    fi
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -o DPkg::Lock::Timeout=300 "$@" || rc=$?
    [ -z "$policy" ] || $sudo rm -f /usr/sbin/policy-rc.d
    [ "$rc" -eq 0 ] || exit "$rc"
}
# require TOOL...: dies unless each TOOL is on PATH and TALLY_BIN is executable
require() {
    local t
    for t in "$@"; do command -v "$t" >/dev/null || die "needs $t"; done
    [ -x "$TALLY_BIN" ] || die "no server binary at $TALLY_BIN (run make first)"
}

# ---- processes we start, and their cleanup ---------------------------------------------
stop_pid() { # PID: SIGTERM, up to 10 s to exit, then SIGKILL
    local pid=$1
    [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null || return 0
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -0 "$pid" 2>/dev/null && kill -KILL "$pid" 2>/dev/null
    wait "$pid" 2>/dev/null || true
}
# trap_cleanup SIGNAL...: the script's cleanup runs on exit; SIGNAL ends the script (130)
trap_cleanup() {
    trap cleanup EXIT
    trap 'echo "$PROG: interrupted" >&2; exit 130' "$@"
}

# ---- CPU accounting from /proc (no sysstat needed) -----------------------------------
# The fields of /proc/PID/stat are read with set --: from 3 (state) on, $12 and $13 are
# utime and stime, $14 and $15 cutime and cstime (the children it has reaped).
stat_fields() { sed 's/.*) //' "/proc/$1/stat" 2>/dev/null; } # PID (or PID/task/TID)
proc_ticks() { # PID...: utime+stime of each (all threads), summed
    local sum=0 p f
    for p in "$@"; do
        f=$(stat_fields "$p") || continue
        # shellcheck disable=SC2086 # one field a word
        set -- $f
        sum=$((sum + ${12} + ${13}))
    done
    echo $sum
}
tree_ticks() { # PID: the process, its live children, and the children it has reaped
    local f kids sum
    f=$(stat_fields "$1") || { echo 0; return; }
    # shellcheck disable=SC2086 # one field a word
    set -- "$1" $f
    sum=$((${13} + ${14} + ${15} + ${16}))
    kids=$(cat "/proc/$1/task/$1/children" 2>/dev/null || pgrep -P "$1" || true)
    # shellcheck disable=SC2086 # one PID a word
    echo $((sum + $(proc_ticks $kids)))
}
thread_ticks() { # PID: "tid=ticks" for each thread of PID
    local pid=$1 t f
    for t in "/proc/$pid/task/"*; do
        f=$(stat_fields "$pid/task/${t##*/}") || continue
        # shellcheck disable=SC2086 # one field a word
        set -- $f
        echo "${t##*/}=$((${12} + ${13}))"
    done
}
child_ticks() { # reaped children of this shell (wrk, pgbench): cutime+cstime
    # shellcheck disable=SC2046 # one field a word
    set -- $(stat_fields $$); echo $((${14} + ${15}))
}
sys_ticks() { # whole machine, all CPUs: "task irq steal" ticks (user+nice+system, irq+softirq, steal)
    awk '$1 == "cpu" { print $2 + $3 + $4, $7 + $8, $9; exit }' /proc/stat
}
wait_idle() { # up to BENCH_IDLE_WAIT s for the machine to be idle (< 10% of a CPU over 1 s)
    local waited=0 a b
    while [ "$waited" -lt "$IDLE_WAIT" ]; do
        read -r a _ < <(sys_ticks); sleep 1; read -r b _ < <(sys_ticks)
        [ $((b - a)) -lt $((HZ / 10)) ] && { [ "$waited" -eq 0 ] || echo "(waited ${waited} s for an idle machine)"; return 0; }
        waited=$((waited + 1))
    done
    [ "$IDLE_WAIT" -eq 0 ] || echo "(machine still busy after ${IDLE_WAIT} s: running anyway)"
}
cores() { awk -v t="$1" -v hz="$HZ" -v s="$2" 'BEGIN { printf "%.2f", t / hz / s }'; } # TICKS SECONDS
# note_busy RUN OTHER STEAL: remembers RUN in BUSY_WARN when other processes and steal
# took more than 0.2 cores during it; busy_warning [WHOM] prints the warning at the end
note_busy() {
    BUSY_WARN+=$(awk -v o="$2" -v st="$3" -v n="$1" \
        'BEGIN { if (o + st > 0.2) printf "%s (other processes %.2f, steal %.2f cores) ", n, o, st }')
}
# shellcheck disable=SC2120 # WHOM is optional
busy_warning() {
    [ -z "$BUSY_WARN" ] || echo "WARNING: the machine was busy with other work during: ${BUSY_WARN}- those figures understate${1:+ $1}; rerun when it is idle"
}

# ---- time and figures ------------------------------------------------------------------
now() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$2" 'BEGIN { print b - a }'; } # START END: seconds
secs_since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; } # START
utc() { date -u "$@" +%Y-%m-%dT%H:%M:%SZ; } # [date options]: now, or -r FILE's time
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.2f", a / b; else print "n/a" }'; }

# ---- the first lines of the output -----------------------------------------------------
print_header() { # NAME: the title and the machine
    echo "== tally $1 $(utc)"
    echo "machine: $(nproc) CPUs, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//'), kernel $(uname -r)"
}
# shellcheck disable=SC2120 # ABOUT THE BINARY is optional
print_tally_line() { # [ABOUT THE BINARY]: the commit, the binary and its flags
    local other=""
    [ "$(realpath "$TALLY_BIN")" = "$(realpath "$ROOT/build/tally")" ] ||
        other=" (of this work tree; TALLY_BIN=$TALLY_BIN is another build, whose commit this is not)"
    echo "tally: commit $COMMIT$other, binary of $(utc -r "$TALLY_BIN")${1:+ $1}; flags: $TALLY_FLAGS_TEXT"
}

# ---- the poll and its voters -----------------------------------------------------------
# create_poll URL DATA_DIR SECRET [WHERE]: a poll with options a, b, c created at URL with
# an owner token (tally token, signed with SECRET); sets POLL and OPTS (its option ids,
# comma-separated). The reply is left in $TMP/poll.json.
create_poll() {
    local owner
    owner=$("$TALLY_BIN" token --data-dir "$2" --secret "$3" --sub bench-owner --ttl 3600)
    curl -sf "$1/v1/polls" -H "Authorization: Bearer $owner" -H 'Content-Type: application/json' \
        -d '{"title":"bench","options":[{"text":"a"},{"text":"b"},{"text":"c"}]}' >"$TMP/poll.json" ||
        die "could not create the poll${4:+ $4}"
    read -r POLL OPTS < <(python3 -c 'import json, sys; p = json.load(open(sys.argv[1]));
print(p["poll_id"], ",".join(o["option_id"] for o in p["options"]))' "$TMP/poll.json")
}
mint_tokens() { # SECRET COUNT FILE: COUNT voter tokens for bench/votes.lua, valid 2 h
    local t0; t0=$(now)
    python3 "$ROOT/bench/mint_tokens.py" "$1" "$2" "$3" 7200
    echo "tokens: $2 voter tokens minted in $(secs_since "$t0") s"
}
total_votes() { # URL: total_votes of the poll POLL, as the instance at URL renders it
    curl -sf "$1/v1/polls/$POLL/results" |
        python3 -c 'import json, sys; print(json.load(sys.stdin)["total_votes"])'
}

# ---- wrk and pgbench -------------------------------------------------------------------
# run_client OUT FAILURE COMMAND...: runs COMMAND (stopped after BENCH_SECONDS + 60 s at
# the most) with its output in OUT and its PID in CLIENT_PID; when it fails, shows OUT and
# dies with the message FAILURE
run_client() {
    local out=$1 failure=$2; shift 2
    timeout -k 5 $((SECS + 60)) "$@" >"$out" 2>&1 &
    CLIENT_PID=$!
    wait "$CLIENT_PID" || { cat "$out" >&2; die "$failure"; }
    CLIENT_PID=
}
wrk_latency() { awk -v p="$2" '$1 == p { print $2 }' "$1"; } # FILE PERCENTILE (50%): from --latency
wrk_socket_errors() { grep -o 'Socket errors:.*' "$1" || true; } # FILE
