#!/bin/sh
# tally under valgrind, for the API tests: TALLY_BIN=tests/valgrind/tally.sh (see
# `make check-valgrind`). Each process writes its report to $TALLY_VALGRIND_LOG.<pid>
# (default /tmp/tally-valgrind.<pid>) and exits 99 when valgrind found a memory error or
# a leak (definite or possible), which the harness reports as a failed stop.
here=$(dirname "$0")
exec valgrind --quiet --leak-check=full --errors-for-leak-kinds=definite,possible --error-exitcode=99 \
    --log-file="${TALLY_VALGRIND_LOG:-/tmp/tally-valgrind}.%p" \
    "${TALLY_VALGRIND_BIN:-$here/../../build/tally}" "$@"
