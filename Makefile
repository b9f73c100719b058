# tally: build, run, test. See README.md.
#   make run         install missing Debian packages, build, serve http://localhost:8080
#   make test        install what tests need, run unit, API (SQLite and PostgreSQL), live,
#                    crash, browser and cluster tests (PostgreSQL and Redis started for the run)
#   make check-asan  unit, API and live tests against an AddressSanitizer+UBSan build
#   make cluster     three instances on PostgreSQL + Redis behind nginx (make cluster-stop)
#   make bench       load benchmarks with a reference run beside tally (bench/)

CC       ?= cc
BUILD    ?= build
PKGS      = libh2o-evloop jansson sqlite3 libsodium openssl libqrencode libpq hiredis libsystemd libcurl
PKG_CFLAGS := $(shell pkg-config --cflags $(PKGS) 2>/dev/null)
PKG_LIBS   := $(shell pkg-config --libs $(PKGS) 2>/dev/null)
OPT      ?= -O2
CFLAGS   += -std=c11 $(OPT) -g -Wall -Wextra -Werror -Wshadow -Wstrict-prototypes -Wno-unused-parameter \
            -D_GNU_SOURCE -DH2O_USE_LIBUV=0 -Isrc -I$(BUILD)/gen $(PKG_CFLAGS) $(SAN)
LDFLAGS  += $(SAN)
# libunistring (Unicode text rules in src/base) has no pkg-config file on Debian 12.
LDLIBS   += $(PKG_LIBS) -lwslay -lunistring -lpthread -lm

LIB_SRC  := $(sort $(wildcard src/*/*.c))
# the web app's files, compiled in (scripts/embed-web.sh): GET / works wherever the
# binary runs; --web-root still serves a directory instead
WEB_FILES := $(sort $(shell find web -type f ! -name '.*'))
LIB_OBJ  := $(LIB_SRC:%.c=$(BUILD)/obj/%.o) $(BUILD)/obj/gen/web_files.o
MAIN_OBJ := $(BUILD)/obj/src/main.o
UNIT_SRC := $(sort $(wildcard tests/unit/test_*.c))
UNIT_BIN := $(UNIT_SRC:tests/unit/%.c=$(BUILD)/tests/%)

DATA_DIR ?= ./data
LISTEN   ?= 127.0.0.1:8080

.PHONY: install uninstall deb test-packaging
.PHONY: all run test test-unit test-api test-api-pg test-live test-e2e test-crash test-cluster with-services \
        cluster cluster-stop check-asan check-valgrind deps deps-test clean bench bench-live bench-export bench-cluster \
        bench-ranked bench-store bench-pow lint fmt screenshots
.DEFAULT_GOAL := all

all: $(BUILD)/tally

# The version (the VERSION file) and the commit this build is from, for `tally --version`
# and tally_build_info: the header is rewritten only when one of them changed, so a new
# commit rebuilds one object.
VERSION    := $(shell cat VERSION)
ifndef GIT_COMMIT
GIT_COMMIT := $(shell git rev-parse --short=12 HEAD 2>/dev/null || echo unknown)
endif
.PHONY: FORCE
$(BUILD)/gen/version.h: FORCE
	@mkdir -p $(dir $@)
	@printf '#define TALLY_VERSION "%s"\n#define TALLY_COMMIT "%s"\n' '$(VERSION)' '$(GIT_COMMIT)' > $@.tmp
	@if cmp -s $@.tmp $@; then rm -f $@.tmp; else mv $@.tmp $@; fi
$(BUILD)/obj/src/base/version.o: $(BUILD)/gen/version.h

$(BUILD)/gen/web_files.c: $(WEB_FILES) scripts/embed-web.sh
	@mkdir -p $(dir $@)
	scripts/embed-web.sh $(WEB_FILES) > $@.tmp && mv $@.tmp $@
$(BUILD)/obj/gen/web_files.o: $(BUILD)/gen/web_files.c src/api/api_int.h
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS) -c $< -o $@

$(BUILD)/obj/%.o: %.c
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS) -MMD -MP -c $< -o $@

$(BUILD)/libtally.a: $(LIB_OBJ)
	@rm -f $@
	ar rcs $@ $^

$(BUILD)/tally: $(MAIN_OBJ) $(BUILD)/libtally.a
	$(CC) $(LDFLAGS) -o $@ $^ $(LDLIBS)

$(BUILD)/tally-genballots: tools/genballots.c $(BUILD)/libtally.a
	$(CC) $(CFLAGS) -o $@ $< $(BUILD)/libtally.a $(LDFLAGS) $(LDLIBS)

$(BUILD)/tests/%: tests/unit/%.c $(BUILD)/libtally.a
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS) -o $@ $< $(BUILD)/libtally.a $(LDFLAGS) $(LDLIBS) -lcriterion
$(BUILD)/tests/test_store $(BUILD)/tests/test_store_pg: tests/unit/store_helpers.h tests/unit/store_scenarios.h

-include $(LIB_OBJ:.o=.d) $(MAIN_OBJ:.o=.d)

# ---- installing: the binary, its man page, the web app, the systemd unit ----
#   make install [PREFIX=/usr/local] [DESTDIR=/tmp/root] [SYSCONFDIR=...] [SYSTEMDUNITDIR=...]
#   make deb     a Debian package (dpkg-buildpackage on a copy of the tree) in $(BUILD)/deb/
PREFIX         ?= /usr/local
BINDIR         ?= $(PREFIX)/bin
DATADIR        ?= $(PREFIX)/share
MANDIR         ?= $(DATADIR)/man
SYSCONFDIR     ?= $(if $(filter /usr,$(PREFIX)),/etc,$(PREFIX)/etc)
SYSTEMDUNITDIR ?= $(PREFIX)/lib/systemd/system

install: $(BUILD)/tally
	install -d $(DESTDIR)$(BINDIR) $(DESTDIR)$(MANDIR)/man1 $(DESTDIR)$(SYSTEMDUNITDIR) \
	    $(DESTDIR)$(SYSCONFDIR)/default $(DESTDIR)$(DATADIR)/doc/tally
	install -m 0755 $(BUILD)/tally $(DESTDIR)$(BINDIR)/tally
	install -m 0644 tally.1 $(DESTDIR)$(MANDIR)/man1/tally.1
	@# the web app, for a --web-root of one's own to start from (the binary has its copy)
	for f in $(WEB_FILES); do install -D -m 0644 $$f $(DESTDIR)$(DATADIR)/tally/$$f; done
	sed -e 's|@BINDIR@|$(BINDIR)|g' -e 's|@SYSCONFDIR@|$(SYSCONFDIR)|g' packaging/tally.service.in \
	    > $(DESTDIR)$(SYSTEMDUNITDIR)/tally.service
	chmod 0644 $(DESTDIR)$(SYSTEMDUNITDIR)/tally.service
	install -m 0644 packaging/tally.default $(DESTDIR)$(SYSCONFDIR)/default/tally
	install -m 0644 docs/openapi.yaml docs/grafana-dashboard.json README.md $(DESTDIR)$(DATADIR)/doc/tally/

uninstall:
	rm -f $(DESTDIR)$(BINDIR)/tally $(DESTDIR)$(MANDIR)/man1/tally.1 $(DESTDIR)$(SYSTEMDUNITDIR)/tally.service
	rm -rf $(DESTDIR)$(DATADIR)/tally $(DESTDIR)$(DATADIR)/doc/tally
	@echo "uninstall: $(DESTDIR)$(SYSCONFDIR)/default/tally is left in place (your settings)"

# The tree as git sees it (tracked and new files, not ignored ones), copied and built
# by dpkg-buildpackage, so the package never picks up a local build or data directory.
DEB_DIR := $(BUILD)/deb
deb:
	@command -v dpkg-buildpackage >/dev/null || { echo "make deb needs dpkg-dev and debhelper (apt-get install dpkg-dev debhelper fakeroot)"; exit 1; }
	rm -rf $(DEB_DIR) && mkdir -p $(DEB_DIR)/tally-$(VERSION)
	git ls-files -z --cached --others --exclude-standard | xargs -0 cp -P --parents -t $(DEB_DIR)/tally-$(VERSION)
	cd $(DEB_DIR)/tally-$(VERSION) && GIT_COMMIT=$(GIT_COMMIT) dpkg-buildpackage -us -uc -b -J2
	@ls $(DEB_DIR)/*.deb

deps:
	@scripts/deps.sh run

deps-test:
	@scripts/deps.sh test

run: deps
	@$(MAKE) --no-print-directory all
	$(BUILD)/tally serve --listen $(LISTEN) --data-dir $(DATA_DIR)

# Every suite runs under a deadline, so that a hung test fails the run with its output
# instead of running into CI's own limit: node's --test-timeout fails one test that takes
# longer than TEST_TIMEOUT_MS, and `timeout` ends a whole suite after its minutes (a test
# that timed out can leave handles that keep node from exiting).
TEST_TIMEOUT_MS ?= 300000
node_test = timeout -k 20 $(1)m node --test --test-timeout=$(TEST_TIMEOUT_MS)

# The PostgreSQL and Redis unit suites run when TALLY_TEST_PG / TALLY_TEST_REDIS are set
# (`make test` starts both with scripts/services.sh and exports them).
test-unit: $(UNIT_BIN)
	@set -e; for t in $(UNIT_BIN); do echo "== $$t"; timeout -k 20 10m $$t --jobs 2; done

# The API suite on the SQLite store (TALLY_TEST_PG emptied: the harness then uses SQLite).
test-api: $(BUILD)/tally
	TALLY_TEST_PG= TALLY_BIN=$(abspath $(BUILD)/tally) $(call node_test,15) --test-concurrency=2 tests/api/

# The same suite on the PostgreSQL store: each server gets a database of its own on
# TALLY_TEST_PG (a URI on which CREATE DATABASE works); without it, a PostgreSQL is
# started for this run alone (scripts/services.sh) and stopped after.
test-api-pg: $(BUILD)/tally
	@if [ -n "$$TALLY_TEST_PG" ]; then \
	    echo "TALLY_BIN=$(abspath $(BUILD)/tally) node --test --test-concurrency=2 tests/api/  (TALLY_TEST_PG=$$TALLY_TEST_PG)"; \
	    TALLY_BIN=$(abspath $(BUILD)/tally) $(call node_test,15) --test-concurrency=2 tests/api/; \
	else \
	    $(MAKE) --no-print-directory with-services SERVICES=pg WITH_SERVICES=test-api-pg; \
	fi

test-live: $(BUILD)/tally
	TALLY_TEST_PG= TALLY_BIN=$(abspath $(BUILD)/tally) $(call node_test,10) --test-concurrency=1 tests/live/

# The README's screenshots (docs/screenshots/), taken by the browser tests when asked to.
screenshots: $(BUILD)/tally
	TALLY_SCREENSHOTS=1 $(MAKE) --no-print-directory test-e2e

test-e2e: $(BUILD)/tally
	TALLY_TEST_PG= TALLY_BIN=$(abspath $(BUILD)/tally) TALLY_WEB_ROOT=$(abspath web) $(call node_test,15) --test-concurrency=2 tests/e2e/

# Several instances on PostgreSQL + Redis behind nginx (tests/cluster/; each test starts
# its own with `scripts/cluster.sh start DIR`). One file at a time: each runs a cluster.
test-cluster: $(BUILD)/tally
	@if [ -n "$$(find tests/cluster -name '*.test.mjs' 2>/dev/null | head -n 1)" ]; then \
	    echo "TALLY_BIN=$(abspath $(BUILD)/tally) node --test --test-concurrency=1 tests/cluster/"; \
	    TALLY_BIN=$(abspath $(BUILD)/tally) TALLY_WEB_ROOT=$(abspath web) TALLY_CLUSTER_SH=$(abspath scripts/cluster.sh) \
	        $(call node_test,20) --test-concurrency=1 tests/cluster/; \
	else \
	    echo "test-cluster: no tests in tests/cluster/ yet"; \
	fi

# Runs the targets in WITH_SERVICES, one after another, with PostgreSQL and Redis (or
# only SERVICES) started for the run in a mktemp directory (scripts/services.sh) and
# TALLY_TEST_PG / TALLY_TEST_REDIS exported. The services are stopped whatever happens
# (a failure, Ctrl-C); the first failing target ends the run with its exit status.
SERVICES      ?= pg redis
WITH_SERVICES ?=
with-services:
	@d=$$(mktemp -d /tmp/tally-services.XXXXXX) || exit 1; \
	trap 'scripts/services.sh stop "$$d"' EXIT; trap 'exit 130' INT; trap 'exit 143' TERM HUP; \
	scripts/services.sh start "$$d" $(SERVICES) || exit $$?; \
	. "$$d/env"; export TALLY_TEST_PG TALLY_TEST_REDIS; \
	for t in $(WITH_SERVICES); do \
	    echo "== make $$t"; \
	    $(MAKE) --no-print-directory $$t || { rc=$$?; echo "make: $$t failed (exit $$rc); stopping the services" >&2; exit $$rc; }; \
	done

# Fault tests: a full disk (a 3 MiB tmpfs: needs root, skipped otherwise), a failed
# fsync and failing allocations (TALLY_FAULT_* hooks, see src/main.c). One at a time:
# the disk test mounts a file system and the others count fsyncs and allocations.
test-crash: $(BUILD)/tally
	TALLY_TEST_PG= TALLY_BIN=$(abspath $(BUILD)/tally) $(call node_test,10) --test-concurrency=1 tests/crash/

# make install and make deb, each installed into a fresh directory tree whose systemd unit
# command is started as systemd would (tests/packaging/; make deb builds the tree anew)
test-packaging: $(BUILD)/tally
	TALLY_TEST_PG= TALLY_BIN=$(abspath $(BUILD)/tally) $(call node_test,20) --test-concurrency=1 tests/packaging/

test: deps-test
	@$(MAKE) --no-print-directory all
	@$(MAKE) --no-print-directory with-services \
	    WITH_SERVICES="test-unit test-api test-api-pg test-live test-crash test-e2e test-cluster test-packaging"

check-asan: deps-test
	@$(MAKE) --no-print-directory BUILD=build-asan OPT=-O1 \
	    SAN="-fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize-recover=undefined" \
	    all with-services WITH_SERVICES="test-unit test-api test-api-pg test-live"

# Three instances on PostgreSQL + Redis behind nginx on http://127.0.0.1:$(CLUSTER_PORT)
# (scripts/cluster.sh; state in .cluster/). `make cluster-stop` stops exactly those.
CLUSTER_PORT ?= 8090
cluster: $(BUILD)/tally
	@CLUSTER_PORT=$(CLUSTER_PORT) TALLY_BIN=$${TALLY_BIN:-$(abspath $(BUILD)/tally)} scripts/cluster.sh up

cluster-stop:
	@scripts/cluster.sh down

# The vote and auth API tests against tally under valgrind (tests/valgrind/tally.sh): a
# memory error or a definite or possible leak makes tally exit 99, which fails the test
# that stopped it; the reports are in $(VALGRIND_LOG).<pid>.
VALGRIND_LOG ?= /tmp/tally-valgrind
check-valgrind: $(BUILD)/tally
	@command -v valgrind >/dev/null || { echo "check-valgrind needs valgrind (apt-get install valgrind)"; exit 1; }
	rm -f $(VALGRIND_LOG).*
	TALLY_BIN=$(abspath tests/valgrind/tally.sh) TALLY_VALGRIND_BIN=$(abspath $(BUILD)/tally) \
	    TALLY_VALGRIND_LOG=$(VALGRIND_LOG) node --test --test-concurrency=1 tests/api/votes.test.mjs tests/api/auth.test.mjs

# durable votes/s and results reads/s beside nginx's static reply, with ratios
bench: $(BUILD)/tally
	TALLY_BIN=$(abspath $(BUILD)/tally) bench/run.sh

# 19,000 live subscribers (SSE + WebSocket) while votes arrive at 200/s
bench-live: $(BUILD)/tally
	node bench/live.mjs --bin $(abspath $(BUILD)/tally)

# a ranked poll of 100 options with 30,000 full rankings voted on and read in a loop,
# and what that does to everyone else's /healthz (bench/ranked.mjs; docs/PERFORMANCE.md)
bench-ranked: $(BUILD)/tally
	node bench/ranked.mjs --bin $(abspath $(BUILD)/tally)

# 1,000,000 ballots written through the store layer, then streamed as CSV and JSON
# while the server's RSS is sampled (issue: < 100 MiB growth)
bench-export: $(BUILD)/tally $(BUILD)/tally-genballots
	node bench/export.mjs --bin $(abspath $(BUILD)/tally) --gen $(abspath $(BUILD)/tally-genballots)

# what one durable ballot costs the writer in each candidate store design (SQLite as it
# was, lean SQLite, a journal, a journal applied to SQLite, LMDB, RocksDB), side by side
# (bench/store_shapes.c; installs liblmdb-dev and librocksdb-dev if missing)
STORE_BENCH_ARGS ?= --ballots 200000 --batch 64
bench-store: $(BUILD)/store-shapes
	$(BUILD)/store-shapes $(STORE_BENCH_ARGS)

$(BUILD)/store-shapes: bench/store_shapes.c
	@for p in liblmdb-dev librocksdb-dev; do dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "install ok installed" || \
	    { echo "bench-store: installing $$p"; DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$p; }; done
	@mkdir -p $(dir $@)
	$(CC) -std=c11 -O2 -Wall -Wextra -Werror -Wno-unused-parameter -D_GNU_SOURCE -o $@ $< -lsqlite3 -llmdb -lrocksdb -lz -lpthread

# what an anonymous device token's proof of work costs: SHA-256/s in Node and in
# Chromium running the web app's worker (bench/pow.mjs; docs/PERFORMANCE.md)
bench-pow:
	node bench/pow.mjs

# durable votes/s through nginx to 3 instances on PostgreSQL + Redis (scripts/cluster.sh),
# exactly-once checked in the store, beside pgbench running the same vote as one SQL
# statement on the same PostgreSQL; prints the ratio (bench/cluster.sh; issue: >= 8x)
bench-cluster: $(BUILD)/tally
	TALLY_BIN=$(abspath $(BUILD)/tally) bench/cluster.sh

# ---- fuzzing: libFuzzer harnesses in tests/fuzz/ (clang, Debian's libfuzzer-14) ----
#   make fuzz [FUZZ_SECONDS=60]   build each harness into build-fuzz/ and run it for
#                                 FUZZ_SECONDS on a copy of its corpus; fails on a crash
#                                 or leak (the input is left in build-fuzz/crashes/<harness>/)
FUZZ_CC      ?= clang
FUZZ_BUILD   ?= build-fuzz
FUZZ_SECONDS ?= 60
FUZZ_SAN      = -fsanitize=address,undefined -fno-sanitize-recover=undefined -fno-omit-frame-pointer
# the project's warnings are gcc's (make all); clang's differ, so -Werror only on the harnesses
FUZZ_CFLAGS   = -std=c11 -O1 -g -D_GNU_SOURCE -DH2O_USE_LIBUV=0 -Isrc -I$(BUILD)/gen $(PKG_CFLAGS) $(FUZZ_SAN)
FUZZ_LIB_OBJ := $(LIB_SRC:%.c=$(FUZZ_BUILD)/obj/%.o) $(FUZZ_BUILD)/obj/gen/web_files.o
FUZZ_NAMES   := $(patsubst tests/fuzz/%.c,%,$(sort $(wildcard tests/fuzz/fuzz_*.c)))
FUZZ_BIN     := $(FUZZ_NAMES:%=$(FUZZ_BUILD)/%)

.PHONY: fuzz fuzz-build deps-fuzz

deps-fuzz:
	@command -v $(FUZZ_CC) >/dev/null || apt-get install -y -qq clang libclang-rt-14-dev libfuzzer-14-dev

$(FUZZ_BUILD)/obj/%.o: %.c
	@mkdir -p $(dir $@)
	$(FUZZ_CC) $(FUZZ_CFLAGS) -fsanitize=fuzzer-no-link -MMD -MP -c $< -o $@

$(FUZZ_BUILD)/libtally.a: $(FUZZ_LIB_OBJ)
	@rm -f $@
	ar rcs $@ $^

$(FUZZ_BUILD)/fuzz_%: tests/fuzz/fuzz_%.c $(FUZZ_BUILD)/libtally.a
	$(FUZZ_CC) $(FUZZ_CFLAGS) -Wall -Wextra -Werror -fsanitize=fuzzer -o $@ $< $(FUZZ_BUILD)/libtally.a $(PKG_LIBS) -lwslay -lunistring -lpthread -lm

$(FUZZ_BUILD)/obj/src/base/version.o: $(BUILD)/gen/version.h
$(FUZZ_BUILD)/obj/gen/web_files.o: $(BUILD)/gen/web_files.c src/api/api_int.h
	@mkdir -p $(dir $@)
	$(FUZZ_CC) $(FUZZ_CFLAGS) -fsanitize=fuzzer-no-link -c $< -o $@

-include $(FUZZ_LIB_OBJ:.o=.d)

fuzz-build: $(FUZZ_BIN)

fuzz: deps-fuzz
	@$(MAKE) --no-print-directory fuzz-build
	@set -e; for f in $(FUZZ_NAMES); do \
	    echo "== $$f ($(FUZZ_SECONDS) s)"; \
	    rm -rf $(FUZZ_BUILD)/corpus/$$f $(FUZZ_BUILD)/crashes/$$f; \
	    mkdir -p $(FUZZ_BUILD)/corpus/$$f $(FUZZ_BUILD)/crashes/$$f; \
	    cp tests/fuzz/corpus/$$f/* $(FUZZ_BUILD)/corpus/$$f/; \
	    dict=; if [ -f tests/fuzz/$$f.dict ]; then dict=-dict=tests/fuzz/$$f.dict; fi; \
	    $(FUZZ_BUILD)/$$f -max_total_time=$(FUZZ_SECONDS) -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 \
	        $$dict -artifact_prefix=$(FUZZ_BUILD)/crashes/$$f/ $(FUZZ_BUILD)/corpus/$$f \
	        || { echo "fuzz: $$f failed; the input is in $(FUZZ_BUILD)/crashes/$$f/"; exit 1; }; \
	done

# cppcheck: varFuncNullUB is tly_log's NULL sentinel (declared `sentinel`, so the compiler
# checks it; NULL is a pointer on every platform we build for); `cppcheck-suppress` comments
# mark its false positives inside uthash's HASH_ITER.
lint: $(BUILD)/gen/version.h
	clang-tidy $(LIB_SRC) src/main.c -- $(CFLAGS)
	cppcheck --quiet --error-exitcode=1 --enable=warning,portability --std=c11 --inline-suppr \
	    --suppress=varFuncNullUB -Isrc src

fmt:
	clang-format -i $(LIB_SRC) src/main.c src/*/*.h

clean:
	rm -rf build build-asan build-fuzz
