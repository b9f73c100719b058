# shellcheck shell=bash
# Helpers shared by scripts/services.sh and scripts/cluster.sh (sourced, not run).
# The sourcing script sets PROG (the name in its messages) and DIR (its state directory,
# holding DIR/env: KEY=value lines, the last one of a key wins).

die() { echo "$PROG: $*" >&2; exit 1; }
log() { echo "$PROG: $*" >&2; }

# A TCP port on 127.0.0.1 that nothing is bound to right now.
free_port() {
    node -e 'const s=require("net").createServer();s.listen(0,"127.0.0.1",()=>{console.log(s.address().port);s.close()})'
}

# alive PID: the process exists and has not exited. An exited process that its parent
# (PID 1, for our daemons) has not reaped yet is a zombie, which kill -0 still reaches;
# one reaped between the two looks has no /proc entry any more: gone as well.
alive() {
    [ -n "${1:-}" ] && kill -0 "$1" 2>/dev/null || return 1
    local st
    st=$(sed -n 's/^.*) \(.\).*/\1/p' "/proc/$1/stat" 2>/dev/null) || return 1
    [ -n "$st" ] && [ "$st" != Z ] && [ "$st" != X ]
}

# ours PID TEXT: the process's command line contains TEXT (so that a PID from a stale env
# file, which the system may since have given to another process, is never signalled).
ours() {
    [ -z "${2:-}" ] && return 0
    tr '\0' ' ' <"/proc/$1/cmdline" 2>/dev/null | grep -qF -- "$2"
}

# setenv KEY VALUE: sets KEY in DIR/env (replacing an earlier value).
setenv() {
    local f="$DIR/env"
    touch "$f"
    grep -v "^$1=" "$f" >"$f.tmp" || true
    printf '%s=%s\n' "$1" "$2" >>"$f.tmp"
    mv "$f.tmp" "$f"
}
getenv() { [ -f "$DIR/env" ] && sed -n "s/^$1=//p" "$DIR/env" | tail -n 1; }

# stop_pid NAME PID [SIGNAL [TEXT]]: SIGNAL (TERM) to PID if it is alive and its command
# line has TEXT; waits up to 15 s, then KILL and up to 5 s more (the caller checks
# whether it is gone).
stop_pid() {
    local name=$1 pid=$2 sig=${3:-TERM} text=${4:-}
    alive "$pid" || return 0
    if ! ours "$pid" "$text"; then
        log "pid $pid is no longer $name (its command line lacks $text); not signalling it"
        return 0
    fi
    kill "-$sig" "$pid" 2>/dev/null || return 0
    for _ in $(seq 1 150); do
        alive "$pid" || { log "stopped $name (pid $pid)"; return 0; }
        sleep 0.1
    done
    log "$name (pid $pid) ignored SIG$sig for 15 s; killing it"
    kill -KILL "$pid" 2>/dev/null || true
    for _ in $(seq 1 50); do alive "$pid" || return 0; sleep 0.1; done
    alive "$pid" && log "$name (pid $pid) survives SIGKILL"
    return 0
}
