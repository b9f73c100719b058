#!/bin/sh
# Installs the Debian packages tally needs, only those missing.
#   scripts/deps.sh run    build and run the server
#   scripts/deps.sh test   also what the tests need
set -eu
RUN_PKGS="build-essential pkg-config libh2o-evloop-dev libwslay-dev libssl-dev zlib1g-dev libjansson-dev \
libsqlite3-dev libsodium-dev libqrencode-dev uthash-dev libpq-dev libhiredis-dev libunistring-dev libsystemd-dev \
libcurl4-openssl-dev xxd"
TEST_PKGS="libcriterion-dev sqlite3 curl chromium prometheus postgresql redis-server redis-tools nginx-light \
python3 man-db dpkg-dev debhelper fakeroot"
pkgs="$RUN_PKGS"
[ "${1:-run}" = test ] && pkgs="$pkgs $TEST_PKGS"
missing=""
for p in $pkgs; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing="$missing $p"
done
if [ -n "$missing" ]; then
    echo "deps: installing$missing"
    SUDO=""
    [ "$(id -u)" -ne 0 ] && SUDO=sudo
    $SUDO apt-get update -qq
    # The tests need promtool from the prometheus package, not its daemon: keep package
    # scripts from starting services (policy-rc.d), so nothing listens on other addresses.
    policy=""
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\nexit 101\n' | $SUDO tee /usr/sbin/policy-rc.d >/dev/null
        $SUDO chmod +x /usr/sbin/policy-rc.d
        policy=1
    fi
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends $missing || rc=$?
    [ -n "$policy" ] && $SUDO rm -f /usr/sbin/policy-rc.d
    [ "${rc:-0}" -eq 0 ] || exit "$rc"
fi
if [ "${1:-run}" = test ]; then
    if ! command -v node >/dev/null 2>&1; then
        echo "deps: installing nodejs and npm"
        DEBIAN_FRONTEND=noninteractive ${SUDO:-} apt-get install -y -qq nodejs npm
    fi
    # test tools from the npm registry, pinned by tests/package-lock.json
    cd "$(dirname "$0")/../tests"
    if [ ! -d node_modules ] || [ package-lock.json -nt node_modules ]; then
        echo "deps: npm ci in tests/"
        npm ci --no-audit --no-fund --loglevel=error
    fi
fi
